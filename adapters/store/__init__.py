"""Compile artifacts on a store shared by a fleet: a local folder, a shared volume or an object
store (fsspec), built once by one replica under a lease, fetched by the others into a local cache,
and handed out only when their bytes and (with a key) their signed manifest verify.

One job a module: ``location`` (parse ``artifact_dir``), ``objects``/``local``/``remote`` (objects
by name, atomic publish), ``manifest`` and ``signing`` (what a package is, who vouches for it),
``cache`` (a node's verified copies), ``lease`` (one builder per key), ``packages`` (publish,
fetch, list), ``once`` (build once, the others wait and load), ``results`` (what happened, as values).
Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from adapters.store.cache import LocalCache, default_cache_dir
from adapters.store.location import StoreLocation
from adapters.store.manifest import FileEntry, Manifest
from adapters.store.once import NewPackage, obtain
from adapters.store.packages import PackageStore
from adapters.store.results import (
    PROBLEMS,
    Fetched,
    FetchStatus,
    Obtained,
    ObtainStatus,
    Package,
    Published,
    PublishStatus,
    StoreEvent,
)


def open_store(
    artifact_dir: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    signing_key: bytes | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    read_only: bool = False,
) -> PackageStore:
    """``PackageStore(StoreLocation.parse(artifact_dir, storage_options), ...)``: checks everything
    that can be checked without the network; raises ``InvalidOptions`` naming the option."""
    location = StoreLocation.parse(artifact_dir, storage_options)
    return PackageStore(location, signing_key=signing_key, cache_dir=cache_dir, read_only=read_only)


__all__ = [
    "PROBLEMS", "FetchStatus", "Fetched", "FileEntry", "LocalCache", "Manifest", "NewPackage",
    "ObtainStatus", "Obtained", "Package", "PackageStore", "PublishStatus", "Published", "StoreEvent",
    "StoreLocation", "default_cache_dir", "obtain", "open_store",
]
