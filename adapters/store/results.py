"""What the store did, as values the caller audits. No store call raises for what it meets in
the store (a missing, tampered or unreachable object, a read-only volume): it says so here.

Fetch (one key): ``found`` (verified, handed out), ``missing``, ``untrusted`` (manifest
unreadable, names another key, unsigned or badly signed when a key is set, or a file whose bytes
are not the ones it names: never handed out), ``unreachable`` (the store did not answer),
``denied`` (the store refused to read).

Publish: ``published``, ``read_only`` (the store refused the write), ``unreachable``, ``failed``.

Obtain (build once per fleet): ``loaded`` (another replica's packages), ``built`` (this process
built them; ``published`` says whether the others can load them), ``untrusted`` (refused and, by
the caller's choice, not rebuilt), ``unreachable``, ``missing`` (nothing there and nothing may be
built: a read-only store), ``timeout`` (waited ``build_wait_s`` for another replica's build),
``failed`` (this process's build raised: ``error``), ``busy`` (another replica holds the build
lease and the caller chose not to wait). ``waiting`` is an event, while it lasts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapters.store.manifest import Manifest

FetchStatus = Literal["found", "missing", "untrusted", "unreachable", "denied"]
PublishStatus = Literal["published", "read_only", "unreachable", "failed"]
ObtainStatus = Literal[
    "loaded", "built", "untrusted", "unreachable", "missing", "timeout", "failed", "busy",
]
# Outcomes whose audit event is a warning.
PROBLEMS = frozenset({"untrusted", "unreachable", "denied", "read_only", "timeout", "failed"})


@dataclass(frozen=True)
class Package:
    """A verified package: its manifest and its files on this node (read them, never write)."""

    key: str
    manifest: Manifest
    files: Mapping[str, Path]

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.manifest.meta


@dataclass(frozen=True)
class Fetched:
    key: str
    status: FetchStatus
    package: Package | None = None
    detail: str = ""
    fetched_bytes: int = 0  # copied from the store into the cache by this call

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "status": self.status, "detail": self.detail,
                "fetched_bytes": self.fetched_bytes}


@dataclass(frozen=True)
class Published:
    key: str
    status: PublishStatus
    manifest: Manifest | None = None
    detail: str = ""
    uploaded_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "status": self.status, "detail": self.detail,
                "uploaded_bytes": self.uploaded_bytes}


@dataclass(frozen=True)
class StoreEvent:
    """Something the caller may audit while it happens (``waiting``, ``untrusted``, ``took_over``,
    ``lease_lost``, ``published``...)."""

    status: str
    key: str
    detail: str = ""
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "key": self.key, "detail": self.detail,
                "elapsed_s": round(self.elapsed_s, 3)}


@dataclass(frozen=True)
class Obtained:
    status: ObtainStatus
    packages: Mapping[str, Package] = field(default_factory=dict)
    fetches: Mapping[str, Fetched] = field(default_factory=dict)
    publishes: Mapping[str, Published] = field(default_factory=dict)
    events: tuple[StoreEvent, ...] = ()
    waited_s: float = 0.0
    seconds: float = 0.0
    detail: str = ""
    error: BaseException | None = None

    @property
    def published(self) -> bool:
        return bool(self.publishes) and all(p.status == "published" for p in self.publishes.values())

    @property
    def problem(self) -> bool:
        return self.status in PROBLEMS

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "detail": self.detail,
            "packages": sorted(self.packages),
            "found": {key: f.status for key, f in self.fetches.items()},
            "published": {key: p.status for key, p in self.publishes.items()},
            "events": [event.as_dict() for event in self.events],
            "waited_s": round(self.waited_s, 3),
            "seconds": round(self.seconds, 3),
            **({"error": f"{type(self.error).__name__}: {self.error}"} if self.error else {}),
        }


__all__ = [
    "PROBLEMS", "FetchStatus", "Fetched", "ObtainStatus", "Obtained", "Package", "PublishStatus",
    "Published", "StoreEvent",
]
