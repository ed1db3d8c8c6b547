"""Progress bars only where someone watches them: on a terminal or in a notebook.

Every progress bar of the project is made by ``progress_bar``. On a terminal, and in a Jupyter
notebook, it is tqdm's bar. When the output goes to a file or a pipe, a bar's redraws would end
up between the printed lines of a log (``0%| | 0/8 ... Initial training loss: 10.842``), so
there the bar draws nothing; it still counts (``bar.n``), and ``tqdm.write`` still prints its
lines.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


class _Nowhere:
    """A text stream that drops what is written to it."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def on_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default: standard error, where tqdm draws) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def in_notebook() -> bool:
    """Whether this code runs in a Jupyter kernel (where a reader watches the cell's output):
    IPython's running shell is the kernel's. (That ``ipykernel`` was imported says nothing:
    a program that runs notebooks imports it too.)"""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """tqdm's progress bar over ``iterable`` (or with ``total=``) drawn only on a terminal.

    ``enabled=False`` switches the bar off altogether (tqdm's ``disable``); off a terminal and
    outside a notebook it is drawn nowhere but keeps counting. Other keywords are tqdm's.
    """
    if enabled and "file" not in kwargs and not (on_terminal() or in_notebook()):
        kwargs["file"] = _Nowhere()
    return tqdm(iterable, disable=not enabled, **kwargs)
