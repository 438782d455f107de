"""dit-lifecycle: an explicit, audited lifecycle for diffusion-transformer modules.

Loaded -> CacheMounted -> Compiled -> WarmedUp, in that order only, so that warm-up compiles
the path real requests take; every request starts from a fresh cache context.

The package is lazy: ``lifecycle.audit`` and the ``graph``/``audit`` CLI commands never import
torch; the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from states import LifecyclePolicy, State, Trigger

# public name -> the submodule that defines it
_LAZY: dict[str, str] = {
    "DistributedLifecycle": "lifecycle.distributed",
    "DistributedTransitionError": "lifecycle.errors",
    "PeerFailedError": "lifecycle.errors",
    "RankDivergenceError": "lifecycle.errors",
    "AuditWriteError": "lifecycle.errors",
    "AuditWriteWarning": "lifecycle.errors",
    "BackendUnavailableError": "lifecycle.errors",
    "IllegalTransitionError": "lifecycle.errors",
    "InvalidConfigError": "lifecycle.errors",
    "LifecycleError": "lifecycle.errors",
    "TransitionFailedError": "lifecycle.errors",
    "UnsupportedModuleError": "lifecycle.errors",
    "UnwarmedShapeError": "lifecycle.errors",
    "PipelineError": "lifecycle.errors",
    "CompilePlan": "lifecycle.config",
    "ServingPolicy": "lifecycle.config",
    "ModuleLifecycle": "lifecycle.module",
    "RequestRecord": "lifecycle.serving",
    "TransitionRecord": "lifecycle.record",
    "WarmupCoverageWarning": "lifecycle.warmup",
    "PipelineLifecycle": "lifecycle.pipeline",
}

if TYPE_CHECKING:
    from lifecycle.config import CompilePlan, ServingPolicy
    from lifecycle.distributed import DistributedLifecycle
    from lifecycle.errors import (
        BackendUnavailableError,
        DistributedTransitionError,
        IllegalTransitionError,
        InvalidConfigError,
        LifecycleError,
        PeerFailedError,
        PipelineError,
        RankDivergenceError,
        TransitionFailedError,
        UnsupportedModuleError,
        UnwarmedShapeError,
    )
    from lifecycle.module import ModuleLifecycle, RequestRecord, TransitionRecord, WarmupCoverageWarning
    from lifecycle.pipeline import PipelineLifecycle


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        # A submodule (``lifecycle.audit``) reached as an attribute.
        try:
            return importlib.import_module(f"lifecycle.{name}")
        except ModuleNotFoundError as exc:
            raise AttributeError(f"module 'lifecycle' has no attribute {name!r}") from exc
    value = getattr(importlib.import_module(target), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "BackendUnavailableError",
    "CompilePlan",
    "DistributedLifecycle",
    "DistributedTransitionError",
    "IllegalTransitionError",
    "InvalidConfigError",
    "LifecycleError",
    "LifecyclePolicy",
    "ModuleLifecycle",
    "PeerFailedError",
    "PipelineError",
    "PipelineLifecycle",
    "RankDivergenceError",
    "RequestRecord",
    "ServingPolicy",
    "State",
    "TransitionFailedError",
    "TransitionRecord",
    "Trigger",
    "UnsupportedModuleError",
    "UnwarmedShapeError",
    "WarmupCoverageWarning",
]
