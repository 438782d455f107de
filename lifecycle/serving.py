"""Request serving: one request at a time per lifecycle, each from a fresh cache context.

``RequestServer`` (one per lifecycle) begins a request where the states table has the
``request`` trigger (WarmedUp: the table decides, nothing here re-types the rule; a request
does not move the state, so it needs no machine event and costs a dict lookup), rebuilds
cache-dit's context from the lifecycle's config, and ends it by counting cached steps and new
graphs. Every event is built from the lifecycle's ``audit_fields()`` (so a
distributed lifecycle's ``rank`` is in every event). The shape key is the seam for declared
shape buckets: a request names its shape, the server may check it before the transformer runs.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from lifecycle import audit
from lifecycle.errors import (
    AuditWriteError,
    IllegalTransitionError,
    InvalidConfigError,
    LifecycleError,
    TransitionFailedError,
    UnsupportedModuleError,
    UnwarmedShapeError,
)
from lifecycle.record import emit_checked, warn_unwritten
from states import Trigger, allowed_triggers, destination, explain_illegal

if TYPE_CHECKING:
    from lifecycle.module import ModuleLifecycle

RequestOutcome = Literal["running", "ok", "refused", "failed"]


class _RequestIds:
    """Request ids: a random 32-bit prefix per process and a counter (``uuid4`` asks the OS for
    random bytes on every request, a system call each: 2 us of a ~30 us request). A forked child
    draws its own prefix, so parent and child never hand out the same id."""

    def __init__(self) -> None:
        self._reseed()
        register = getattr(os, "register_at_fork", None)  # POSIX only
        if register is not None:
            register(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._counter = itertools.count()

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):06x}"


new_request_id = _RequestIds().new
_REFUSALS = (IllegalTransitionError, InvalidConfigError, UnsupportedModuleError, UnwarmedShapeError)


@dataclass
class RequestRecord:
    """Yielded by ``request()``; filled in when the block exits."""

    request_id: str
    num_inference_steps: int | None
    cached_steps: int = 0
    # Steps whose unconditional (classifier-free guidance) call was cached, when cache-dit
    # counts the two calls of a guided step separately (Wan: enable_separate_cfg).
    cfg_cached_steps: int = 0
    new_graphs: int = 0
    duration_ms: float = 0.0
    outcome: RequestOutcome = "running"
    # The request's shape key, when the host gave one (declared shape buckets).
    shape: Any = None


@dataclass
class ActiveRequest:
    """A request between ``begin`` and ``end``/``cancel``."""

    record: RequestRecord
    started: float
    graphs_before: int


class RequestServer:
    """Serves one lifecycle's requests (the caller holds the lifecycle's lock throughout)."""

    def __init__(self, lifecycle: ModuleLifecycle) -> None:
        self.lifecycle = lifecycle
        self.active: ActiveRequest | None = None
        self.requests = 0
        self.recompiles_since_warmup = 0

    def guard(self, trigger: Trigger) -> None:
        """Inside its own request the owner may only refresh: anything else would wait on itself
        or change the module under the request."""
        if self.active is not None and trigger is not Trigger.REFRESH:
            lc = self.lifecycle
            raise IllegalTransitionError(
                module=lc.name,
                state=lc.state,
                trigger=trigger,
                reason=f"request {self.active.record.request_id!r} is running in this thread; "
                f"call {trigger.value}() after its block ends",
                allowed=(Trigger.REFRESH,),
            )

    def begin(self, steps: int | None, request_id: str | None, shape: Any = None) -> ActiveRequest:
        """Start a request: legal only where the table has ``request`` (its legality is read from
        the table, like every trigger's); a fresh context; the clock starts. A refused or failed
        start is a ``lifecycle.request`` event (requests have no transition event)."""
        lc = self.lifecycle
        try:
            state = lc.state
            if destination(lc.policy, state, Trigger.REQUEST) is None:
                raise IllegalTransitionError(
                    module=lc.name, state=state, trigger=Trigger.REQUEST,
                    reason=explain_illegal(lc.policy, state, Trigger.REQUEST),
                    allowed=allowed_triggers(lc.policy, state),
                )
            if self.active is not None:
                raise IllegalTransitionError(
                    module=lc.name,
                    state=state,
                    trigger=Trigger.REQUEST,
                    reason=f"request {self.active.record.request_id!r} is already running in this "
                    "thread and requests do not nest (one cache context serves one request)",
                    allowed=(Trigger.REFRESH,),
                )
            lc.check_steps(Trigger.REQUEST, steps)
            record = RequestRecord(
                request_id or new_request_id(), steps or lc.serving_steps, shape=shape
            )
            if lc.policy.cache_dit:
                self._fresh_context(record)
        except BaseException as exc:
            self.refuse(steps, request_id, exc)
            raise
        active = self.active = ActiveRequest(record, time.perf_counter(), lc.backend.graph_count())
        return active

    def _fresh_context(self, record: RequestRecord) -> None:
        lc = self.lifecycle
        try:
            lc.cache.refresh(lc.module, lc.cache_config, record.num_inference_steps)
        except Exception as exc:
            raise TransitionFailedError(
                f"{lc.name}: the request could not start: refreshing cache-dit's context failed "
                f"({type(exc).__name__}: {exc}); the state stays WarmedUp and no request ran. "
                "Call refresh() to retry, or reset() and prepare(run) again.",
                module=lc.name,
                state=lc.state,
                trigger=Trigger.REQUEST,
            ) from exc
        lc.steering.context_steered = False

    def end(self, active: ActiveRequest, error: BaseException | None) -> None:
        """Fill in the record and audit it. A lost audit write raises ``AuditWriteError`` after a
        request that succeeded; after one that failed, the body's exception is kept (and noted)."""
        lc = self.lifecycle
        self.active = None
        lc.backend.synchronize()
        record = active.record
        record.duration_ms = (time.perf_counter() - active.started) * 1000.0
        record.new_graphs = max(0, lc.backend.graph_count() - active.graphs_before)
        if lc.policy.cache_dit:
            summary = lc.cache.summary(lc.module)
            record.cached_steps = summary.cached_steps
            record.cfg_cached_steps = summary.cfg_cached_steps
        # A request refused mid-way at an unwarmed shape (on_unwarmed="fail") ran nothing.
        refused = isinstance(error, UnwarmedShapeError)
        record.outcome = "ok" if error is None else "refused" if refused else "failed"
        self.requests += 1
        fields = self._fields(record.request_id, record.num_inference_steps)
        fields.update(
            cached_steps=record.cached_steps,
            cfg_cached_steps=record.cfg_cached_steps,
            new_graphs=record.new_graphs,
            duration_ms=round(record.duration_ms, 3),
            outcome=record.outcome,
        )
        if record.shape is not None:
            fields["shape"] = record.shape
        if error is not None:
            fields["error"] = f"{type(error).__name__}: {error}"
        lost = emit_checked(audit.REQUEST_EVENT, record.outcome, fields)
        if record.new_graphs and lc.policy.compile:
            self.recompiles_since_warmup += record.new_graphs
            lost = lost or emit_checked(
                audit.RECOMPILE_EVENT,
                "refused",
                {
                    **lc.audit_fields(),
                    "request_id": record.request_id,
                    "new_graphs": record.new_graphs,
                    "recompiles_since_warmup": self.recompiles_since_warmup,
                },
            )
        if lost is not None:
            if error is not None:
                warn_unwritten(audit.REQUEST_EVENT, lc.name, lost, error)
                return
            raise AuditWriteError(
                f"{lc.name}: request {record.request_id!r} was served (outcome ok) but its audit "
                f"event could not be written ({type(lost).__name__}: {lost}); the state stays "
                "WarmedUp. Fix the audit sink.",
                module=lc.name,
                state=lc.state,
                trigger=Trigger.REQUEST,
            ) from lost

    def cancel(self, active: ActiveRequest, reason: LifecycleError) -> None:
        """Take back a begun request before its body ran (a pipeline peer could not start):
        audited as refused, nothing ran."""
        self.active = None
        active.record.outcome = "refused"
        self.refuse(active.record.num_inference_steps, active.record.request_id, reason, refused=True)

    def refuse(
        self, steps: int | None, request_id: str | None, error: BaseException, *, refused: bool = False
    ) -> None:
        """Audit a request that never ran: refused (not legal now, bad arguments) or failed (legal,
        but starting it raised)."""
        lc = self.lifecycle
        outcome = "refused" if refused or isinstance(error, _REFUSALS) else "failed"
        fields = self._fields(request_id, steps)
        fields.update(
            cached_steps=0, new_graphs=0, duration_ms=0.0, outcome=outcome,
            error=f"{type(error).__name__}: {error}",
        )
        lost = emit_checked(audit.REQUEST_EVENT, outcome, fields)
        if lost is not None:
            warn_unwritten(audit.REQUEST_EVENT, lc.name, lost, error)

    def _fields(self, request_id: str | None, steps: int | None) -> dict[str, Any]:
        lc = self.lifecycle
        return {
            **lc.base_fields,
            "request_id": request_id,
            "num_inference_steps": steps,
            "state": lc.state.value,
        }
