"""Ctrl-C and SIGTERM end a command with one clear line, from its very first moment.

Python turns Ctrl-C into a ``KeyboardInterrupt`` traceback, and SIGTERM ends a process
silently. A command calls ``guard_startup(__name__)`` before its slow imports (PyTorch takes
seconds): until ``main()`` takes over, either signal ends it at once with one line and exit
status 130. It then runs ``main()`` through ``run_command``: from there on Ctrl-C raises
``KeyboardInterrupt`` and SIGTERM raises ``Terminated`` (one), so that ``main()``'s handler
keeps what was saved, says how to continue, and exits with 130; an interrupt that ``main()``
does not handle ends the command with one line too. (The training loop installs
its own handlers while it runs, and puts these back.)

This module imports nothing slow: it must load in milliseconds.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C or SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the program is, as Ctrl-C raises ``KeyboardInterrupt``."""


def _stop_during_startup(signum: int, frame: Any) -> None:
    """Exit at once: nothing was done yet. (``os._exit``, not ``SystemExit``: an exception
    raised here could land in a library's ``except:`` around one of its imports and be lost.)"""
    name = signal.Signals(signum).name
    print(f"\ninterrupted ({name}) while starting; nothing was done", file=sys.stderr)
    sys.stderr.flush()
    os._exit(INTERRUPTED)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated("SIGTERM")


def _install(handlers: dict[signal.Signals, Any]) -> None:
    """Install ``handlers`` (in the main thread only; a signal the process was started to
    ignore, as ``nohup`` and background jobs are, stays ignored)."""
    if threading.current_thread() is threading.main_thread():
        for signum, handler in handlers.items():
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, handler)


def guard_startup(name: str = "__main__") -> None:
    """Until ``handle_interrupts``: Ctrl-C or SIGTERM exits at once, with one line and 130.

    A command's module passes its ``__name__``: only the program itself is guarded, and
    importing the module changes nothing."""
    if name == "__main__":
        _install({signal.SIGINT: _stop_during_startup, signal.SIGTERM: _stop_during_startup})


def handle_interrupts() -> None:
    """From now on Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM ``Terminated``."""
    _install({signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated})


def describe(exc: KeyboardInterrupt) -> str:
    """``terminated (SIGTERM)`` or ``interrupted``: how the command was stopped."""
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"


def run_command(main: Callable[[], int]) -> int:
    """``main()`` under ``handle_interrupts``; returns its exit status (130 when stopped)."""
    handle_interrupts()
    try:
        return main()
    except KeyboardInterrupt as exc:
        print(f"\n{describe(exc)}", file=sys.stderr)
        return INTERRUPTED


def stopped(exc: KeyboardInterrupt, what: str) -> int:
    """A command's end on Ctrl-C or SIGTERM: how it was stopped and ``what`` stands now (one
    line); returns the exit status 130."""
    print(f"\n{describe(exc)}: {what}", file=sys.stderr)
    return INTERRUPTED


def failed(exc: BaseException) -> int:
    """A command's end on an expected failure: its one ``error:`` line; returns 2."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


def stopped_or_failed(exc: BaseException, what: str) -> int:
    """A command's end on Ctrl-C or SIGTERM (``stopped``, with ``what`` stands now: 130) or on
    an expected failure (``failed``: 2)."""
    return stopped(exc, what) if isinstance(exc, KeyboardInterrupt) else failed(exc)
