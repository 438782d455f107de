"""What a store backend raises. Kept inside the store package: the store's public calls turn them
into result values (``unreachable``, ``read_only``, ``missing``), never into a crash."""

from __future__ import annotations

from adapters.errors import AdapterError


class StoreError(AdapterError):
    """Base class of the store's backend errors."""


class ObjectMissing(StoreError):
    """No object under that name."""


class StoreDenied(StoreError):
    """The store refused a write or a read: a read-only volume, a bucket without that permission."""


class StoreUnavailable(StoreError):
    """The store could not be reached or answered with an error (network, server, I/O)."""


__all__ = ["ObjectMissing", "StoreDenied", "StoreError", "StoreUnavailable"]
