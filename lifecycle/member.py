"""What the warm-up and the request scope may use of a lifecycle: a ``Member``.

``ModuleLifecycle`` is the one implementation; the warm-up (``lifecycle.warmup``) and the
request scope (``lifecycle.serving``) are written against this protocol, so neither imports the
lifecycle, and the pipeline drives its members through the very same code as a lone module.
Everything here is read-only or a method of the object that owns the field.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from adapters import BackendAdapter
from adapters.calls import SharedDims
from adapters.compiler import Compiler
from lifecycle.buckets import BucketBook
from lifecycle.config import ServingPolicy
from lifecycle.context import CacheContext
from lifecycle.counters import ServingCounters
from lifecycle.locking import OwnerLock
from states import LifecyclePolicy, State


class Member(Protocol):
    """One lifecycle, as the warm-up and the request scope see it."""

    @property
    def name(self) -> str: ...

    @property
    def policy(self) -> LifecyclePolicy: ...

    @property
    def module(self) -> nn.Module: ...

    @property
    def state(self) -> State: ...

    @property
    def backend(self) -> BackendAdapter: ...

    @property
    def serving(self) -> ServingPolicy: ...

    # The plumbing, private to the package: each object owns its fields.
    _context: CacheContext
    _book: BucketBook
    _counters: ServingCounters
    _lock: OwnerLock
    # Whether the buckets share dynamic graphs (decided before the compile), and the dims the
    # latest warm-up marked dynamic.
    _shares_graphs: bool
    _shared_dims: SharedDims
    # The fields every audit event of this lifecycle starts from (never mutate it).
    _base: dict[str, Any]
    # The one compiler of this lifecycle (picked by the backend from the plan).
    _compiler: Compiler

    def _audit_fields(self) -> dict[str, Any]: ...


__all__ = ["Member"]
