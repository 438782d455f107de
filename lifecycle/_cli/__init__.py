"""``python -m lifecycle`` / ``dit-lifecycle``: demo, graph, audit verify, audit show.

This module only holds the entry point; the commands live in ``lifecycle._cli.commands`` and are
imported inside ``main``, so that a Ctrl-C at any point of start-up (importing structlog or
torch) prints one line and exits 130 instead of a traceback. ``graph`` and ``audit`` never
import torch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

PROG = "dit-lifecycle"
INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def interrupted() -> int:
    """Say so in one line and return the exit status for Ctrl-C."""
    try:
        sys.stderr.write(f"{PROG}: interrupted\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed
        pass
    return INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 2 usage, 130 interrupted)."""
    try:
        from lifecycle._cli.commands import run

        return run(argv)
    except KeyboardInterrupt:
        return interrupted()


def __getattr__(name: str) -> Any:
    if name == "build_parser":
        from lifecycle._cli.commands import build_parser

        return build_parser
    raise AttributeError(f"module 'lifecycle._cli' has no attribute {name!r}")


__all__ = ["INTERRUPTED", "PROG", "build_parser", "interrupted", "main"]
