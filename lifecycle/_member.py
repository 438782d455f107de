"""What the warm-up and the request scope may use of a lifecycle: a ``Member``.

``ModuleLifecycle`` is the one implementation; the warm-up (``lifecycle._warmup``) and the
request scope (``lifecycle._serving``) are written against this protocol, so neither imports the
lifecycle, and the pipeline drives its members through the very same code as a lone module.
Everything here is read-only, or a method through which the lifecycle applies a result.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from adapters import BackendAdapter
from adapters.compiler import Compiler
from lifecycle._config import ServingPolicy
from lifecycle._locking import OwnerLock
from lifecycle._serving_state import RequestResult, ServingState
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

    # The plumbing, private to the package. The serving state is read here and written by its
    # lifecycle only: the request scope hands its results to the methods below.
    _serving_state: ServingState
    _lock: OwnerLock
    # The fields every audit event of this lifecycle starts from (never mutate it).
    _base: dict[str, Any]
    # The one compiler of this lifecycle (picked by the backend from the plan).
    _compiler: Compiler

    def _audit_fields(self) -> dict[str, Any]: ...

    def _request_boundary(self) -> None: ...

    def _request_started(self, active: object) -> None: ...

    def _request_cancelled(self) -> None: ...

    def _request_ended(self, result: RequestResult) -> int: ...


__all__ = ["Member"]
