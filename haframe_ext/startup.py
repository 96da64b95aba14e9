"""Ctrl-C while the ``haframe`` command starts: one line and exit code 130, not a traceback from inside torch's
import."""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["guard_startup", "end_startup_guard"]

PROG = "haframe"


def _interrupted(signum, frame) -> None:
    """The SIGINT handler while the command imports: a half-done import cannot be unwound cleanly (it ends in 20-90
    lines, a RecursionError or a misleading ImportError), so say one line and leave at once."""
    os.write(2, f"{PROG}: interrupted\n".encode())
    os._exit(130)


def _is_console() -> bool:
    """Whether this process is the ``haframe`` console script or ``python -m haframe_ext.cli`` (a library user's
    own program keeps its own Ctrl-C)."""
    argv = getattr(sys, "orig_argv", None) or sys.argv
    return os.path.basename(sys.argv[0]) == PROG or list(argv[1:3]) == ["-m", "haframe_ext.cli"]


def guard_startup() -> None:
    """Install the one-line handler when this process is the command (called before the heavy imports)."""
    if _is_console() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)


def end_startup_guard() -> None:
    """Give Ctrl-C back to Python (a KeyboardInterrupt the command turns into exit 130) once the imports are done."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
