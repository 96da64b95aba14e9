"""The ``haframe`` command: argument parsing and dispatch (:mod:`.parser`), what each subcommand does, and what only
the commands use (comparing methods, the demo, the quick bench, figures, the hierarchy report)."""

from .parser import build_parser, main

__all__ = ["main", "build_parser"]
