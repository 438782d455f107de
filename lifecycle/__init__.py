"""dit-lifecycle: an explicit, audited lifecycle for diffusion-transformer modules.

Loaded -> CacheMounted -> Compiled -> WarmedUp, in that order only, so that warm-up compiles
the path real requests take; every request starts from a fresh cache context.
"""

from lifecycle.distributed import (
    DistributedLifecycle,
    DistributedTransitionError,
    PeerFailedError,
    RankDivergenceError,
)
from lifecycle.errors import (
    BackendUnavailableError,
    IllegalTransitionError,
    InvalidConfigError,
    LifecycleError,
    TransitionFailedError,
    UnsupportedModuleError,
)
from lifecycle.module import (
    ModuleLifecycle,
    RequestRecord,
    TransitionRecord,
    WarmupCoverageWarning,
)
from lifecycle.pipeline import PipelineError, PipelineLifecycle
from states import LifecyclePolicy, State, Trigger

__all__ = [
    "BackendUnavailableError",
    "DistributedLifecycle",
    "DistributedTransitionError",
    "IllegalTransitionError",
    "InvalidConfigError",
    "LifecycleError",
    "LifecyclePolicy",
    "ModuleLifecycle",
    "PipelineError",
    "PipelineLifecycle",
    "PeerFailedError",
    "RankDivergenceError",
    "RequestRecord",
    "State",
    "TransitionFailedError",
    "TransitionRecord",
    "Trigger",
    "UnsupportedModuleError",
    "WarmupCoverageWarning",
]
