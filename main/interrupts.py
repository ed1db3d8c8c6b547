"""Ctrl-C and SIGTERM end a command with one clear line, from its very first moment.

Python turns Ctrl-C into a ``KeyboardInterrupt`` traceback, and SIGTERM ends a process
silently. A command calls ``guard_startup()`` before its slow imports (PyTorch takes
seconds): until ``main()`` takes over, either signal ends it at once with one line and exit
status 130. ``main()`` then calls ``handle_interrupts()``: from there on Ctrl-C raises
``KeyboardInterrupt`` and SIGTERM raises ``Terminated`` (one), so that ``main()``'s handler
keeps what was saved, says how to continue, and exits with 130. (The training loop installs
its own handlers while it runs, and puts these back.)

This module imports nothing slow: it must load in milliseconds.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C or SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the program is, as Ctrl-C raises ``KeyboardInterrupt``."""


def _stop_during_startup(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    print(f"\ninterrupted ({name}) while starting; nothing was done", file=sys.stderr)
    raise SystemExit(INTERRUPTED)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated("SIGTERM")


def _install(handlers: dict[signal.Signals, Any]) -> None:
    if threading.current_thread() is threading.main_thread():
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def guard_startup() -> None:
    """Until ``handle_interrupts``: Ctrl-C or SIGTERM exits at once, with one line and 130."""
    _install({signal.SIGINT: _stop_during_startup, signal.SIGTERM: _stop_during_startup})


def handle_interrupts() -> None:
    """From now on Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM ``Terminated``."""
    _install({signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated})


def describe(exc: KeyboardInterrupt) -> str:
    """``terminated (SIGTERM)`` or ``interrupted``: how the command was stopped."""
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
