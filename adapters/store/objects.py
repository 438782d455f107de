"""The few operations the store needs from a place that holds objects by name, and the factory
that picks the local or the fsspec implementation for a location.

Names are ``/``-separated and relative to the store's root. Every operation raises only the
store's own errors (``ObjectMissing``, ``StoreDenied``, ``StoreUnavailable``)."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Protocol

from adapters.store.location import StoreLocation


class Objects(Protocol):
    """Objects by name. ``publish_*`` is atomic: a reader sees the old object, or the whole new
    one, never part of one; ``create`` publishes only if the name is free (exclusive)."""

    description: str

    def read(self, name: str, limit: int) -> bytes:
        """The object's bytes; ``StoreUnavailable`` if it is larger than ``limit``."""
        ...

    def read_into(self, name: str, sink: IO[bytes]) -> None:
        """Stream the object into ``sink`` (which may refuse by raising)."""
        ...

    def local_path(self, name: str) -> Path | None:
        """The object's file when the store is a local folder (no copy needed), else None."""
        ...

    def publish_file(self, name: str, source: Path) -> None: ...

    def publish_bytes(self, name: str, data: bytes) -> None: ...

    def create(self, name: str, data: bytes) -> bool:
        """Publish ``data`` only if nothing has the name; False when something has."""
        ...

    def list(self, folder: str) -> list[str]:
        """Names of the objects directly in ``folder`` (their last part); [] when there is none."""
        ...

    def exists(self, name: str) -> bool: ...

    def delete(self, name: str) -> None:
        """Remove the object; a missing one is no error."""
        ...


def open_objects(location: StoreLocation) -> Objects:
    """The objects of ``location`` (nothing is read or written yet)."""
    if location.local:
        from adapters.store.local import LocalObjects

        return LocalObjects(location.path)
    from adapters.store.remote import FsspecObjects

    return FsspecObjects(location)


__all__ = ["Objects", "open_objects"]
