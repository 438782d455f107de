"""A store of packages: publish a package's files and its (signed) manifest, fetch a package as
verified local files, list keys, and hand out the build lease for a key.

Layout under the store's root::

    manifests/<key>.json     the manifest, published last, in one atomic write
    blobs/<sha256>           each file, by content (published before any manifest names it)
    leases/<key>.lock        file lease (a local folder or shared volume)
    leases/<key>/<n>.json    lease objects (an object store)

A fetch never writes into the store, so a read-only store (a ReadOnlyMany volume, an image layer,
a bucket the replica may only read) loads prebuilt packages. A fetched file is handed out only
after its bytes hashed to the SHA-256 its manifest names and, when a signing key is set, the
manifest's signature verified: from a remote store through the local cache; from a local folder
in place, unless a signing key is set (then through the cache too, so the bytes checked are the
bytes loaded even if someone can write the shared folder).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from adapters.store import signing
from adapters.store.cache import LocalCache, Mismatch, check_cache_dir, file_sha256
from adapters.store.errors import ObjectMissing, StoreDenied, StoreError, StoreUnavailable
from adapters.store.lease import FileLease, Lease, ObjectLease
from adapters.store.location import StoreLocation
from adapters.store.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, ManifestInvalid, check_name
from adapters.store.objects import Objects, open_objects
from adapters.store.results import Fetched, FetchStatus, Package, Published

MANIFESTS = "manifests"
BLOBS = "blobs"
MANIFEST_SUFFIX = ".json"


def _manifest_name(key: str) -> str:
    return f"{MANIFESTS}/{key}{MANIFEST_SUFFIX}"


def _blob_name(sha256: str) -> str:
    return f"{BLOBS}/{sha256}"


class PackageStore:
    """Packages in one location.

    Args:
        location: a parsed ``artifact_dir`` (``StoreLocation.parse``).
        signing_key: ``artifact_signing_key``: manifests are signed with it on publish and must
            verify on fetch; None trusts a package by its SHA-256 alone.
        cache_dir: where remote files are kept on this node (default: the user's cache).
        read_only: never write into the store (a fetch never does anyway; this also refuses
            publishing and leases, for a replica that must only load).
    """

    def __init__(
        self,
        location: StoreLocation,
        *,
        signing_key: bytes | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        read_only: bool = False,
    ) -> None:
        from adapters.errors import InvalidOptions

        if not isinstance(location, StoreLocation):
            raise InvalidOptions(
                f"a store needs a StoreLocation (StoreLocation.parse(artifact_dir)), got "
                f"{type(location).__name__}"
            )
        if not isinstance(read_only, bool):
            raise InvalidOptions(f"read_only must be True or False, got {read_only!r}")
        self.location = location
        self.read_only = read_only
        self._key = signing.check_key(signing_key)
        self.cache = LocalCache(check_cache_dir(cache_dir))
        self.objects: Objects = open_objects(location)

    def child(self, name: str) -> PackageStore:
        """The same store's folder ``name`` (``aot``, ``jit``): same key, cache and mode."""
        store = PackageStore(self.location.child(name), signing_key=self._key, read_only=self.read_only)
        store.cache = self.cache
        return store

    @property
    def signed(self) -> bool:
        return self._key is not None

    def __repr__(self) -> str:
        flags = "".join([", signed" if self.signed else "", ", read-only" if self.read_only else ""])
        return f"PackageStore({self.location!r}{flags})"

    # ------------------------------------------------------------------------------ publish
    def publish(
        self, key: str, files: Mapping[str, Path], meta: Mapping[str, Any] | None = None
    ) -> Published:
        """Upload ``files`` (name -> local file) by content, then the manifest naming them with
        ``meta`` (JSON values; signed with the rest). Never raises for what the store does."""
        check_name(key, "key")
        for name in files:
            check_name(name, "file name")
        if self.read_only:
            return Published(key, "read_only", detail="the store was opened read-only")
        entries: dict[str, FileEntry] = {}
        uploaded = 0
        try:
            for name, path in files.items():
                sha, size = file_sha256(Path(path))
                entries[name] = FileEntry(sha, size)
                blob = _blob_name(sha)
                if not self._blob_intact(blob, sha, size):
                    self.objects.publish_file(blob, Path(path))
                    uploaded += size
            manifest = Manifest(key, entries, dict(meta or {}), _publisher())
            if self._key is not None:
                manifest = Manifest(key, entries, manifest.meta, manifest.published_by,
                                    signing.sign(self._key, manifest.document()))
            self.objects.publish_bytes(_manifest_name(key), manifest.to_bytes())
        except StoreDenied as exc:
            return Published(key, "read_only", detail=str(exc), uploaded_bytes=uploaded)
        except StoreUnavailable as exc:
            return Published(key, "unreachable", detail=str(exc), uploaded_bytes=uploaded)
        except (StoreError, OSError, TypeError, ValueError) as exc:  # a local file, bad meta
            return Published(key, "failed", detail=f"{type(exc).__name__}: {exc}",
                             uploaded_bytes=uploaded)
        return Published(key, "published", manifest, uploaded_bytes=uploaded)

    def _blob_intact(self, blob: str, sha256: str, size: int) -> bool:
        """Whether the store already holds these bytes under ``blob``: a local file is hashed (a
        tampered one is replaced by the publish that repairs it); a remote one is uploaded again
        (publishing is rare: once per build), so a rebuild always repairs what was refused."""
        in_place = self.objects.local_path(blob)
        if in_place is None:
            return False
        try:
            return file_sha256(in_place) == (sha256, size)
        except OSError:
            return False

    # -------------------------------------------------------------------------------- fetch
    def read_manifest(self, key: str) -> tuple[FetchStatus, Manifest | None, str]:
        """The manifest for ``key``, parsed and its signature checked; no file is fetched."""
        check_name(key, "key")
        try:
            data = self.objects.read(_manifest_name(key), MAX_MANIFEST_BYTES)
        except ObjectMissing:
            return "missing", None, f"no manifest for {key}"
        except StoreDenied as exc:
            return "denied", None, str(exc)
        except StoreError as exc:
            return "unreachable", None, str(exc)
        try:
            manifest = Manifest.from_bytes(data)
        except ManifestInvalid as exc:
            return "untrusted", None, f"manifest unreadable: {exc}"
        if manifest.key != key:
            return "untrusted", None, f"manifest names key {manifest.key!r}, not {key!r}"
        if self._key is not None:
            if manifest.signature is None:
                return "untrusted", None, "manifest is not signed and a signing key is set"
            if not signing.verify(self._key, manifest.document(), manifest.signature):
                return "untrusted", None, "manifest signature does not verify with this key"
        return "found", manifest, ""

    def fetch(self, key: str) -> Fetched:
        """The package for ``key`` as verified local files (see the module docstring)."""
        status, manifest, detail = self.read_manifest(key)
        if manifest is None:
            return Fetched(key, status, detail=detail)
        files: dict[str, Path] = {}
        fetched = 0
        try:
            for name, entry in manifest.files.items():
                path, copied = self._file(entry)
                files[name] = path
                fetched += copied
        except Mismatch as exc:
            return Fetched(key, "untrusted", detail=f"{name}: {exc}", fetched_bytes=fetched)
        except ObjectMissing as exc:
            return Fetched(key, "missing", detail=f"{name}: {exc}", fetched_bytes=fetched)
        except StoreDenied as exc:
            return Fetched(key, "denied", detail=str(exc), fetched_bytes=fetched)
        except (StoreError, OSError) as exc:
            return Fetched(key, "unreachable", detail=f"{type(exc).__name__}: {exc}",
                           fetched_bytes=fetched)
        return Fetched(key, "found", Package(key, manifest, files), fetched_bytes=fetched)

    def _file(self, entry: FileEntry) -> tuple[Path, int]:
        """A verified local file with ``entry``'s bytes, and how many bytes were copied for it."""
        blob = _blob_name(entry.sha256)
        in_place = self.objects.local_path(blob) if self._key is None else None
        if in_place is not None:
            try:
                if file_sha256(in_place) != (entry.sha256, entry.size):
                    raise Mismatch(f"{in_place} does not hash to the SHA-256 its manifest names")
            except FileNotFoundError as exc:
                raise ObjectMissing(f"{in_place}: no such file") from exc
            return in_place, 0
        cached = self.cache.get(entry.sha256, entry.size)
        if cached is not None:
            return cached, 0

        def stream(sink: IO[bytes]) -> None:
            self.objects.read_into(blob, sink)

        return self.cache.fill(entry.sha256, entry.size, stream), entry.size

    # --------------------------------------------------------------------------------- list
    def keys(self) -> tuple[str, ...] | None:
        """The keys with a manifest (None when the store cannot be listed)."""
        try:
            names = self.objects.list(MANIFESTS)
        except StoreError:
            return None
        return tuple(name[: -len(MANIFEST_SUFFIX)] for name in names if name.endswith(MANIFEST_SUFFIX))

    # -------------------------------------------------------------------------------- lease
    def lease(self, key: str, *, ttl_s: float = 30.0, clock_skew_s: float = 5.0) -> Lease:
        """The build lease for ``key`` (not taken yet): a file lock on a local folder, lease
        objects on a remote store. ``ttl_s`` and ``clock_skew_s`` apply to lease objects."""
        check_name(key, "key")
        if self.location.local:
            return FileLease(self.location.path, key)
        return ObjectLease(self.objects, key, ttl_s=ttl_s, clock_skew_s=clock_skew_s)


def _publisher() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


__all__ = ["BLOBS", "MANIFESTS", "PackageStore"]
