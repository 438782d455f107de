"""Objects as files in a local folder (a node disk or a shared volume: NFS, a ReadWriteMany or
ReadOnlyMany volume). Publishing writes a unique temporary name in the target folder, syncs it,
then renames it over the final name (atomic on POSIX, NFS included); an exclusive create links
the temporary file to the final name, which fails if the name is taken."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO

from adapters.store.errors import ObjectMissing, StoreDenied, StoreError, StoreUnavailable

_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_CHUNK = 1 << 20


def _classify(exc: OSError, what: str) -> StoreError:
    if isinstance(exc, FileNotFoundError):
        return ObjectMissing(f"{what}: no such file")
    if exc.errno in _DENIED:
        return StoreDenied(f"{what}: {exc.strerror or exc}")
    return StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}")


class LocalObjects:
    """Objects under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)

    def _path(self, name: str) -> Path:
        return self.root / name

    def read(self, name: str, limit: int) -> bytes:
        path = self._path(name)
        try:
            with path.open("rb") as handle:
                data = handle.read(limit + 1)
        except OSError as exc:
            raise _classify(exc, str(path)) from exc
        if len(data) > limit:
            raise StoreUnavailable(f"{path}: larger than {limit} bytes")
        return data

    def read_into(self, name: str, sink: IO[bytes]) -> None:
        path = self._path(name)
        try:
            with path.open("rb") as handle:
                shutil.copyfileobj(handle, sink, _CHUNK)
        except OSError as exc:
            raise _classify(exc, str(path)) from exc

    def local_path(self, name: str) -> Path | None:
        return self._path(name)

    def _staged(self, final: Path, write: IO[bytes] | bytes | Path) -> Path:
        """A synced temporary file beside ``final`` holding the content."""
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                if isinstance(write, bytes):
                    handle.write(write)
                elif isinstance(write, Path):
                    with write.open("rb") as source:
                        shutil.copyfileobj(source, handle, _CHUNK)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def _publish(self, name: str, content: bytes | Path) -> None:
        final = self._path(name)
        try:
            tmp = self._staged(final, content)
            try:
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise _classify(exc, str(final)) from exc

    def publish_file(self, name: str, source: Path) -> None:
        self._publish(name, source)

    def publish_bytes(self, name: str, data: bytes) -> None:
        self._publish(name, data)

    def create(self, name: str, data: bytes) -> bool:
        final = self._path(name)
        try:
            tmp = self._staged(final, data)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise _classify(exc, str(final)) from exc
        return True

    def list(self, folder: str) -> list[str]:
        path = self._path(folder)
        try:
            return sorted(entry.name for entry in path.iterdir()
                          if not entry.name.startswith(".") and entry.is_file())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _classify(exc, str(path)) from exc

    def exists(self, name: str) -> bool:
        try:
            return self._path(name).is_file()
        except OSError as exc:
            raise _classify(exc, str(self._path(name))) from exc

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink(missing_ok=True)
        except OSError as exc:
            raise _classify(exc, str(self._path(name))) from exc


__all__ = ["LocalObjects"]
