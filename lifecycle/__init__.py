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
    "DistributedLifecycle": "lifecycle._distributed",
    "DistributedTransitionError": "lifecycle._errors",
    "PeerFailedError": "lifecycle._errors",
    "RankDivergenceError": "lifecycle._errors",
    "AuditWriteError": "lifecycle._errors",
    "AuditWriteWarning": "lifecycle._errors",
    "BackendUnavailableError": "lifecycle._errors",
    "IllegalTransitionError": "lifecycle._errors",
    "InvalidConfigError": "lifecycle._errors",
    "LifecycleError": "lifecycle._errors",
    "TransitionFailedError": "lifecycle._errors",
    "UnsupportedModuleError": "lifecycle._errors",
    "UnwarmedShapeError": "lifecycle._errors",
    "PipelineError": "lifecycle._errors",
    "CompilePlan": "lifecycle._config",
    "ServingPolicy": "lifecycle._config",
    "ModuleLifecycle": "lifecycle._module",
    "RequestRecord": "lifecycle._serving",
    "TransitionRecord": "lifecycle._record",
    "WarmupCoverageWarning": "lifecycle._warmup",
    "PipelineLifecycle": "lifecycle._pipeline",
}

if TYPE_CHECKING:
    from lifecycle._config import CompilePlan, ServingPolicy
    from lifecycle._distributed import DistributedLifecycle
    from lifecycle._errors import (
        AuditWriteError,
        AuditWriteWarning,
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
    from lifecycle._module import ModuleLifecycle, RequestRecord, TransitionRecord, WarmupCoverageWarning
    from lifecycle._pipeline import PipelineLifecycle


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
    "AuditWriteError",
    "AuditWriteWarning",
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
