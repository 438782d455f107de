"""Warm-up steering and coverage: make warm-up reach cache-dit's cached-step branch, then hand
the first request the lifecycle's own serving context.

``WarmupSteering`` (one per lifecycle) steers the module's cache context for a warm-up (cache
from the 2nd step, never twice in a row) and restores the serving context afterwards;
``lifecycle.shapes.run_warmup`` runs a warm-up under every member's steering until all members
have covered the cached branch (at most ``MAX_WARMUP_RUNS`` rounds a bucket). One member is a
``ModuleLifecycle.warm_up``; several are a pipeline's joint warm-up (``warm_up_together``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from lifecycle import audit
from lifecycle.errors import TransitionFailedError
from lifecycle.record import emit_checked, warn_unwritten
from states import Trigger

if TYPE_CHECKING:
    from lifecycle.module import ModuleLifecycle, TransitionStep

# The warm-up calls run at most this many rounds while cache-dit's context is steered towards
# its cached branch; a warm-up that makes one denoising step needs three.
MAX_WARMUP_RUNS = 4

class WarmupCoverageWarning(UserWarning):
    """Warm-up could not reach cache-dit's cached-step branch: the first real request may compile."""


class WarmupSteering:
    """Steers one lifecycle's cache context during warm-up and restores its serving context."""

    def __init__(self, lifecycle: ModuleLifecycle) -> None:
        self.lifecycle = lifecycle
        # Whether the last warm-up reached the cached branch (None: no warm-up since reset).
        self.covered: bool | None = None
        # True while the steered warm-up context is the module's context (restoring the serving
        # one failed): the lifecycle is not ready until a refresh or a request replaces it.
        self.context_steered = False
        self.warmup_s = 0.0

    @property
    def steers(self) -> bool:
        """Steering matters only with cache-dit and compile: graphs a warm-up misses compile later."""
        policy = self.lifecycle.policy
        return policy.cache_dit and policy.compile

    def steer(self) -> bool:
        """Steer the context for one warm-up bucket; True when it steers (then the cache says
        whether the context reached the cached branch). ``restore()`` must follow
        (``lifecycle.shapes`` steers every member of a warm-up together)."""
        if not self.steers:
            return False
        lc = self.lifecycle
        self.context_steered = True
        lc.cache.refresh_for_warmup(lc.module, lc.cache_config)
        return True

    def restore(self) -> None:
        """A warm-up is an earlier request: never let its context serve the first real one.
        If this raises, ``context_steered`` stays True and ``ready`` stays False (defect 7)."""
        lc = self.lifecycle
        if lc.policy.cache_dit:
            lc.restore_serving_context("after_warmup")
            self.context_steered = False

    def reset(self) -> None:
        self.covered = None


def warm_up_together(
    members: Sequence[ModuleLifecycle],
    call_at: Callable[[Any], object],
    *,
    shapes: list[dict[str, Any]] | None = None,
) -> None:
    """One ``warm_up`` transition per member around one shared warm-up: member i's work enters
    member i+1's transition, the innermost runs the calls. A failure fails every member's warm-up
    (each stays, each audits ``failed`` with the same cause); each member audits its own fields."""
    extras: list[dict[str, Any]] = []

    def work_of(index: int) -> Callable[[TransitionStep], None]:
        def work(step: TransitionStep) -> None:
            extras.append(step.extra)
            if index + 1 < len(members):
                members[index + 1].transition(Trigger.WARM_UP, work_of(index + 1))
            else:
                from lifecycle import shapes as _shapes  # shapes imports this module

                _shapes.run_warmup(members, call_at, shapes, extras, max_runs=MAX_WARMUP_RUNS)

        return work

    members[0].transition(Trigger.WARM_UP, work_of(0))


def _call_warmup(call_at: Callable[[Any], object], shape: Any) -> None:
    try:
        call_at(shape)
    except RuntimeError as exc:
        if _is_shape_mismatch(exc):
            raise TransitionFailedError(
                "the warm-up ran the transformer at more than one input shape in one cache "
                f"context ({exc}): cache-dit compared a cached residual of one shape with another. "
                "Warm each shape in its own context: declare them with "
                "prepare(run, shapes=[...]), or warm up at one shape per warm_up(run)"
            ) from exc
        raise


def _is_shape_mismatch(exc: BaseException) -> bool:
    """A size mismatch raised inside cache-dit's cached blocks (issue 20, item 5)."""
    if "must match the size of tensor" not in str(exc):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if "cache_dit" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _warn_uncovered(member: ModuleLifecycle, runs: int) -> None:
    message = (
        f"{member.name}: warm-up did not reach cache-dit's cached-step branch after {runs} "
        "run(s) of the warm-up callable; the first real request may compile new graphs. "
        "Make the warm-up call the transformer at least once per run, with the shapes of "
        "real requests."
    )
    warnings.warn(message, WarmupCoverageWarning, stacklevel=6)
    fields = {**member.audit_fields(), "covered": False, "warmup_runs": runs, "message": message}
    error = emit_checked(audit.WARMUP_COVERAGE_EVENT, "refused", fields)
    if error is not None:
        warn_unwritten(audit.WARMUP_COVERAGE_EVENT, member.name, error)
