"""The errors of ahead-of-time compiled blocks."""

from __future__ import annotations

from typing import Literal

from adapters.errors import AdapterError

Status = Literal["ok", "missing", "stale", "corrupt"]


class AotError(AdapterError):
    """Base class of ahead-of-time compile errors."""


class AotUnsupported(AotError):
    """This module, device or call cannot be compiled ahead of time (the message says why)."""


class AotBuildFailed(AotError):
    """Export or AOTInductor compile of one block kind failed; ``kind`` names it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class AotPackageError(AotError):
    """A package cannot be used: ``status`` is ``missing``, ``stale`` or ``corrupt``."""

    def __init__(self, kind: str, status: Status, message: str) -> None:
        super().__init__(f"{kind}: package {status}: {message}")
        self.kind = kind
        self.status = status


class AotBindError(AotError):
    """Binding failed; every block was left (or put back) eager."""


