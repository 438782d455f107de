"""Objects in an fsspec filesystem (S3, GCS, ...). On an object store a publish is one put of the
final object (a multipart upload appears only when completed), so a reader never sees part of
one; elsewhere (sftp, ...) it is a temporary name moved over the final one. An exclusive create is
a conditional put (``If-None-Match: *``, fsspec's ``mode="create"``).

fsspec and botocore raise many types; each is turned into the store's own errors here.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import IO, Any

from adapters.store.errors import ObjectMissing, StoreDenied, StoreError, StoreUnavailable
from adapters.store.location import EXTRA, StoreLocation

# Where one put is atomic and final (no rename on these stores; a copy is a put too).
_ATOMIC_PUT = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})
_CHUNK = 1 << 20


def _classify(exc: BaseException, what: str) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return ObjectMissing(f"{what}: not found")
    if isinstance(exc, PermissionError):
        return StoreDenied(f"{what}: permission denied ({exc})")
    return StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}")


class FsspecObjects:
    """Objects under ``location.root`` of an fsspec filesystem (created on first use)."""

    def __init__(self, location: StoreLocation) -> None:
        self.location = location
        self.description = location.url
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            try:
                import fsspec
            except ImportError as exc:  # checked at parse; a changed environment lands here
                raise StoreUnavailable(f"fsspec is not installed: {EXTRA}") from exc
            try:
                self._fs = fsspec.filesystem(self.location.protocol, **self.location.storage_options)
            except Exception as exc:
                raise StoreUnavailable(
                    f"cannot open {self.location.protocol} with artifact_storage_options: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        return self._fs

    def _path(self, name: str) -> str:
        return f"{self.location.root}/{name}"

    def read(self, name: str, limit: int) -> bytes:
        path = self._path(name)
        try:
            # One ranged GET: a file handle pins the ETag it saw first and fails (FileExpired)
            # when a small object such as a lease is replaced between its HEAD and its GET.
            data: bytes = self.fs.cat_file(path, start=0, end=limit + 1)
        except Exception as exc:
            raise _classify(exc, path) from exc
        if len(data) > limit:
            raise StoreUnavailable(f"{path}: larger than {limit} bytes")
        return data

    def read_into(self, name: str, sink: IO[bytes]) -> None:
        path = self._path(name)
        try:
            with self.fs.open(path, "rb", block_size=8 * _CHUNK) as handle:
                shutil.copyfileobj(handle, sink, _CHUNK)
        except Exception as exc:
            raise _classify(exc, path) from exc

    def local_path(self, name: str) -> Path | None:
        return None

    def _invalidate(self, path: str) -> None:
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate(path)

    def publish_file(self, name: str, source: Path) -> None:
        path = self._path(name)
        try:
            if self.location.protocol in _ATOMIC_PUT:
                self.fs.put_file(str(source), path)
            else:
                tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                self.fs.put_file(str(source), tmp)
                self.fs.mv(tmp, path)
            self._invalidate(path)
        except Exception as exc:
            raise _classify(exc, path) from exc

    def publish_bytes(self, name: str, data: bytes) -> None:
        path = self._path(name)
        try:
            if self.location.protocol in _ATOMIC_PUT:
                self.fs.pipe_file(path, data)
            else:
                tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
            self._invalidate(path)
        except Exception as exc:
            raise _classify(exc, path) from exc

    def create(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except Exception as exc:
            raise _classify(exc, path) from exc
        finally:
            self._invalidate(path)
        return True

    def list(self, folder: str) -> list[str]:
        path = self._path(folder)
        try:
            self._invalidate(path)
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise _classify(exc, path) from exc
        names = []
        for entry in entries:
            if entry.get("type") == "file":
                base = str(entry["name"]).rstrip("/").rpartition("/")[2]
                if not base.startswith("."):
                    names.append(base)
        return sorted(names)

    def exists(self, name: str) -> bool:
        path = self._path(name)
        try:
            self._invalidate(path)
            return bool(self.fs.exists(path))
        except Exception as exc:
            raise _classify(exc, path) from exc

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise _classify(exc, path) from exc
        finally:
            self._invalidate(path)


__all__ = ["FsspecObjects"]
