"""A node's local copies of remote package files, by content: ``<cache_dir>/blobs/<sha256>``.

A file enters only after its bytes hashed to the SHA-256 the manifest names (written under a
temporary name, renamed when they match), and is re-hashed each time it is handed out, so a
file changed on the node is caught too. Several processes of one node may fill the same entry at
once: each writes its own temporary file and the renames replace like with like.

``cache_dir`` defaults to ``$XDG_CACHE_HOME/dit-lifecycle`` (``~/.cache/dit-lifecycle``). Where
that cannot be created (a read-only home in a container), a folder under the system's temporary
directory is used instead. Nothing is evicted: the operator sizes or cleans the folder.

The cache also keeps per-node notes on a file (``mark``/``marked``), e.g. that a package's
native code passed its check on this host, so a shared (possibly read-only, signed) manifest is
never rewritten for that."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from adapters.errors import InvalidOptions

APP = "dit-lifecycle"
_CHUNK = 1 << 20


class Mismatch(Exception):
    """Bytes that are not the ones the manifest names (size or SHA-256)."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / APP


def file_sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class _Hashing:
    """A write-only sink that hashes what passes and refuses more than ``limit`` bytes."""

    def __init__(self, handle: IO[bytes], limit: int) -> None:
        self.handle, self.limit = handle, limit
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise Mismatch(f"more than the {self.limit} bytes the manifest names")
        self.digest.update(data)
        return self.handle.write(data)


def check_cache_dir(cache_dir: object) -> Path | None:
    if cache_dir is None:
        return None
    if not isinstance(cache_dir, (str, os.PathLike)) or not os.fspath(cache_dir):
        raise InvalidOptions(
            f"cache_dir must be a non-empty folder path (str or PathLike), got {cache_dir!r}"
        )
    return Path(os.fspath(cache_dir))


class LocalCache:
    def __init__(self, directory: Path | None = None) -> None:
        self.requested = directory
        self._directory: Path | None = None

    @property
    def directory(self) -> Path:
        """The folder in use (created on first use; see the module docstring for the fallback)."""
        if self._directory is None:
            wanted = self.requested or default_cache_dir()
            try:
                (wanted / "blobs").mkdir(parents=True, exist_ok=True)
                self._directory = wanted
            except OSError:
                if self.requested is not None:
                    raise
                fallback = Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}"
                (fallback / "blobs").mkdir(parents=True, exist_ok=True)
                self._directory = fallback
        return self._directory

    def path(self, sha256: str) -> Path:
        return self.directory / "blobs" / sha256

    def get(self, sha256: str, size: int) -> Path | None:
        """The cached file, re-verified; None when absent (a file that no longer matches is removed)."""
        path = self.path(sha256)
        try:
            if not path.is_file():
                return None
            if file_sha256(path) == (sha256, size):
                return path
            path.unlink(missing_ok=True)
        except OSError:
            return None
        return None

    def fill(self, sha256: str, size: int, stream: Callable[[Any], None]) -> Path:
        """Write what ``stream(sink)`` writes, keep it if it matches; raises ``Mismatch`` (nothing
        kept) or what ``stream`` raises."""
        final = self.path(sha256)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{sha256[:16]}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                sink = _Hashing(handle, size)
                stream(sink)
                handle.flush()
                os.fsync(handle.fileno())
            if (sink.digest.hexdigest(), sink.size) != (sha256, size):
                raise Mismatch(
                    f"{sink.size} bytes with SHA-256 {sink.digest.hexdigest()[:16]}..., the manifest "
                    f"names {size} bytes with {sha256[:16]}..."
                )
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return final

    def mark(self, sha256: str, note: str) -> None:
        """Record ``note`` about a file on this node (best effort)."""
        try:
            notes = self.directory / "notes"
            notes.mkdir(exist_ok=True)
            (notes / f"{sha256}.{hashlib.sha256(note.encode()).hexdigest()[:16]}").touch()
        except OSError:
            pass

    def marked(self, sha256: str, note: str) -> bool:
        try:
            name = f"{sha256}.{hashlib.sha256(note.encode()).hexdigest()[:16]}"
            return (self.directory / "notes" / name).is_file()
        except OSError:
            return False


__all__ = ["LocalCache", "Mismatch", "check_cache_dir", "default_cache_dir", "file_sha256"]
