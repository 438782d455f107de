"""The request scope: one way to serve a request, for a lone module and a pipeline alike.

``RequestScope(members, ...)`` is entered by ``ModuleLifecycle.request`` (one member) and
``PipelineLifecycle.request`` (every member, in order). Entering it:

1. takes every member's lock, in order (a second request waits; another asyncio task on the
   same thread is refused at once: it could only block the loop);
2. asks the states table whether ``request`` is legal for every member (WarmedUp), and checks
   the arguments, before any member is touched: refused for all or started for all;
3. lets each member apply a switch its compiler prepared in the background (another replica's
   packages replacing just-in-time blocks): here, between requests, never inside one;
4. starts each member from a fresh cache context built from its own config (identical requests
   give identical outputs; nothing of a warm-up or an earlier request leaks in);
5. decides a miss from a named shape (``on_unwarmed="fail"`` refuses before anything runs);
6. binds ``request_id`` into structlog's context variables for the block;
7. puts a call guard in front of each member's module: each call is checked against the input
   sizes warm-up saw (a miss found by sizes), runs the module's own eager path where the
   policy or a measured bucket says so, and gets the shared dynamic dims marked on aliases.

Leaving it counts cached steps and new graphs and writes one ``lifecycle.request`` event per
member (plus ``lifecycle.shape_miss`` and ``lifecycle.recompile`` where they apply). Nothing here
touches torch's process-wide state: an eager call is this module's eager path, in this thread.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from contextvars import Token
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import structlog

from adapters.calls import CallDecision, guard_calls, input_signature, signature_sizes, with_shared_dims
from adapters.compiler import OUTSIDE_BOUNDS, OutsideBounds
from lifecycle import audit
from lifecycle._buckets import BucketCoverage, ShapeMiss, canonical_shape, shape_key
from lifecycle._config import OnUnwarmed, check_on_unwarmed, check_steps
from lifecycle._errors import (
    REFUSALS,
    AuditWriteError,
    IllegalTransitionError,
    LifecycleError,
    PipelineError,
    TransitionFailedError,
    UnwarmedShapeError,
)
from lifecycle._locking import LockConflict
from lifecycle._member import Member
from lifecycle._record import emit_checked, warn_unwritten
from lifecycle._serving_state import RequestResult
from lifecycle.audit import signals
from states import Trigger, allowed_triggers, destination, explain_illegal

RequestOutcome = Literal["running", "ok", "refused", "failed"]
SHAPE_MISS_EVENT = "lifecycle.shape_miss"


class _RequestIds:
    """Request ids: a random 32-bit prefix per process and a counter (``uuid4`` asks the OS for
    random bytes on every request, a system call each). A forked child draws its own prefix."""

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


@dataclass
class RequestRecord:
    """Yielded by ``request()``; filled in when the block exits.

    Example::

        with lc.request(num_inference_steps=8) as record:
            out = pipe(**call)
        print(record.outcome, record.cached_steps, record.new_graphs, record.duration_ms)
    """

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

    def _fill(
        self, *, duration_ms: float, new_graphs: int, cached_steps: int, cfg_cached_steps: int,
        outcome: RequestOutcome,
    ) -> None:
        """Filled in by the request scope as the request ends (its one writer)."""
        self.duration_ms = duration_ms
        self.new_graphs = new_graphs
        self.cached_steps = cached_steps
        self.cfg_cached_steps = cfg_cached_steps
        self.outcome = outcome

    def _restep(self, steps: int | None) -> None:
        self.num_inference_steps = steps

    def _refused(self) -> None:
        self.outcome = "refused"


class ActiveRequest:
    """One member's part of a running request: its record, its shape decision, and the call
    guard's decision per call. Written by the scope and by its own methods only."""

    __slots__ = (
        "bound_misses", "bucket", "dims", "graphs_before", "key", "member", "miss", "policy", "record",
        "shape", "sizes", "started",
    )

    def __init__(self, member: Member, record: RequestRecord, policy: OnUnwarmed) -> None:
        self.member = member
        self.record = record
        self.policy = policy
        self.key: str | None = None
        self.shape: dict[str, Any] | None = None
        self.bucket: BucketCoverage | None = None
        self.miss: str | None = None  # None | "shape" | "signature"
        self.sizes: dict[str, list[int]] | None = None
        self.dims = member._serving_state.shared_dims
        # A compiler that checks each block call against what it compiled (and runs that block
        # eagerly when outside): the request counts its misses instead (None: it checks none).
        self.bound_misses = member._compiler.misses(member.module)
        self.started = time.perf_counter()
        self.graphs_before = member.backend.graph_count()

    def note_refresh(self, steps: int | None) -> None:
        """``refresh()`` inside the request: the rest of it runs in the new context."""
        self.record._restep(steps)

    def unwarmed_error(self) -> UnwarmedShapeError:
        member = self.member
        warmed = member._serving_state.book.warmed_keys()
        what = f"shape {self.key!r}" if self.key is not None else f"input sizes {self.sizes}"
        fix = (
            f"warm_up(run, shapes=[{self.shape!r}])"
            if self.shape is not None
            else "pass shape= to request() and warm it with warm_up(run, shapes=lc.missed_shapes())"
        )
        return UnwarmedShapeError(
            f"{member.name}: request {self.record.request_id!r} at {what} is not warmed up (warmed "
            f"buckets: {warmed or 'none'}) and on_unwarmed='fail'; nothing ran and the state stays "
            f"WarmedUp. Declare it and warm it first: {fix}, or serve it with on_unwarmed='eager'.",
            module=member.name, state=member.state, trigger="request", shape_key=self.key,
        )

    def name_shape(self, key: str, shape: dict[str, Any], *, compiles: bool) -> bool:
        """The host named the request's shape: a warm bucket serves it, else it is a miss
        (decided now, before anything runs). Returns whether it is a miss."""
        self.key, self.shape = key, shape
        self.bucket = self.member._serving_state.book.lookup(key)
        if self.bucket is None and compiles and self.bound_misses is None:
            self.miss = "shape"
        return self.miss is not None

    def complete(
        self, new_graphs: int, cached_steps: int, cfg_cached_steps: int, outcome: RequestOutcome
    ) -> None:
        """Fill in the record as the request ends."""
        self.record._fill(
            duration_ms=(time.perf_counter() - self.started) * 1000.0, new_graphs=new_graphs,
            cached_steps=cached_steps, cfg_cached_steps=cfg_cached_steps, outcome=outcome,
        )

    def note_bound_miss(self) -> None:
        """Some block call lay outside the compiled bounds (and ran eagerly, or was refused)."""
        self.miss = OUTSIDE_BOUNDS
        if self.policy == "compile":
            self.policy = "eager"  # nothing compiles inline outside the compiled bounds

    def outside_bounds_error(self, cause: BaseException) -> UnwarmedShapeError:
        """The request's typed refusal when a block was outside the packages' bounds."""
        self.miss = OUTSIDE_BOUNDS
        member = self.member
        return UnwarmedShapeError(
            f"{member.name}: request {self.record.request_id!r} at input sizes {self.sizes} lies outside "
            f"the ahead-of-time packages' bounds ({cause}) and on_unwarmed='fail'; the block was not "
            "run and the state stays WarmedUp. Declare a bucket at this size and prepare again "
            "(a new build), or serve it with on_unwarmed='eager' (its blocks run eagerly).",
            module=member.name, state=member.state, trigger="request",
        )

    def take_back(self) -> None:
        """Started, then refused before its body ran (a peer member could not start)."""
        self.record._refused()

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallDecision | None:
        """In front of each call of the member's module (outside compiled code)."""
        eager = exclusive = False
        if self.bound_misses is not None:
            if self.sizes is None:
                self.sizes = signature_sizes(input_signature(args, kwargs))
        elif self.key is not None:
            # A named shape: the miss was decided when the request started.
            if self.miss is not None:
                eager, exclusive = self.policy == "eager", self.policy == "compile"
            elif self.bucket is not None:
                eager = self.bucket.path == "eager"
        elif self.member._serving_state.book.knows_signatures():
            signature = input_signature(args, kwargs)
            bucket = self.member._serving_state.book.bucket_of(signature)
            if bucket is not None:
                if self.bucket is None:
                    self.bucket = bucket
                eager = bucket.path == "eager"
            else:
                if self.miss is None:
                    self.miss = "signature"
                    self.sizes = signature_sizes(signature)
                if self.policy == "fail":
                    raise self.unwarmed_error()
                eager, exclusive = self.policy == "eager", self.policy == "compile"
        if self.dims:
            args, kwargs = with_shared_dims(self.dims, args, kwargs)
        elif not (eager or exclusive):
            return None
        return CallDecision(args, kwargs, eager, exclusive)


class RequestScope:
    """``with RequestScope(members, ...) as records``: one request over ``members`` (see the
    module docstring). ``records`` holds each member's ``RequestRecord``, in order."""

    __slots__ = (
        "_actives", "_guards", "_locked", "_refusing", "_token", "members", "on_unwarmed", "pipeline",
        "request_id", "shape", "steps",
    )

    def __init__(
        self,
        members: Sequence[Member],
        *,
        steps: int | None,
        request_id: str | None,
        shape: Any,
        on_unwarmed: str | None,
        pipeline: bool = False,
    ) -> None:
        self.members = members
        self.steps = steps
        self.request_id = request_id or new_request_id()
        self.shape = shape
        self.on_unwarmed = on_unwarmed
        self.pipeline = pipeline
        self._locked: list[Member] = []
        self._actives: list[ActiveRequest] = []
        self._guards: list[guard_calls] = []
        self._token: Mapping[str, Token[Any]] | None = None
        self._refusing: list[AbstractContextManager[Any]] = []

    # ------------------------------------------------------------------ entering
    def __enter__(self) -> list[RequestRecord]:
        signals.requests(signals.REQUEST_STARTED, [m.name for m in self.members], self.request_id)
        try:
            self._lock_all()
            checked = self._check_all()
            for member in self.members:  # legal, locked, none running: a switch may apply here
                member._request_boundary()
            self._begin_all(*checked)
            self._token = structlog.contextvars.bind_contextvars(request_id=self.request_id)
            for active in self._actives:
                if active.member.policy.compile:
                    guard = guard_calls(active.member.module, active)
                    guard.__enter__()
                    self._guards.append(guard)
                if active.bound_misses is not None and active.policy == "fail":
                    # The compiler decides per block call: outside its bounds the block is
                    # refused rather than run eagerly.
                    refusing = active.member._compiler.refusing(True)
                    refusing.__enter__()
                    self._refusing.append(refusing)
        except BaseException:
            self._unwind()
            raise
        return [active.record for active in self._actives]

    def _lock_all(self) -> None:
        for member in self.members:
            try:
                member._lock.acquire()
            except LockConflict as exc:
                error = IllegalTransitionError(
                    module=member.name, state=member.state, trigger=Trigger.REQUEST, reason=str(exc),
                    allowed=allowed_triggers(member.policy, member.state),
                )
                _refuse(member, self.steps, self.request_id, error)
                raise error from None
            self._locked.append(member)

    def _check_all(self) -> tuple[dict[str, Any] | None, list[OnUnwarmed]]:
        """Legality and arguments for every member, before any is touched."""
        shape: dict[str, Any] | None = None
        policies: list[OnUnwarmed] = []
        for member in self.members:
            try:
                state = member.state
                if destination(member.policy, state, Trigger.REQUEST) is None:
                    reason = (
                        "a pipeline serves requests only when every member is WarmedUp; call "
                        "prepare(run) on the PipelineLifecycle first"
                        if self.pipeline else explain_illegal(member.policy, state, Trigger.REQUEST)
                    )
                    raise IllegalTransitionError(
                        module=member.name, state=state, trigger=Trigger.REQUEST, reason=reason,
                        allowed=allowed_triggers(member.policy, state),
                    )
                active = member._serving_state.active
                if active is not None:
                    raise IllegalTransitionError(
                        module=member.name, state=state, trigger=Trigger.REQUEST,
                        reason=f"request {active.record.request_id!r} is already running in this "
                        "thread and requests do not nest (one cache context serves one request)",
                        allowed=(Trigger.REFRESH,),
                    )
                check_steps(self.steps, module=member.name, state=state, trigger=Trigger.REQUEST)
                if self.shape is not None and shape is None:
                    shape = canonical_shape(self.shape, module=member.name)
                policies.append(
                    member.serving.on_unwarmed if self.on_unwarmed is None
                    else check_on_unwarmed(self.on_unwarmed, module=member.name)
                )
            except LifecycleError as exc:
                _refuse(member, self.steps, self.request_id, exc)
                raise
        return shape, policies

    def _begin_all(self, shape: dict[str, Any] | None, policies: list[OnUnwarmed]) -> None:
        key = shape_key(shape) if shape is not None else None
        for member, policy in zip(self.members, policies, strict=True):
            try:
                member._serving_state.context.fresh(self.steps)
            except Exception as exc:
                error = TransitionFailedError(
                    f"{member.name}: the request could not start: refreshing cache-dit's context failed "
                    f"({type(exc).__name__}: {exc}); the state stays WarmedUp and no request ran. "
                    "Call refresh() to retry, or reset() and prepare(run) again.",
                    module=member.name, state=member.state, trigger=Trigger.REQUEST,
                )
                _refuse(member, self.steps, self.request_id, error)
                self._cancel_started(member, error)
                raise error from exc
            steps = self.steps or member._serving_state.context.serving_steps
            record = RequestRecord(self.request_id, steps, shape=key)
            active = ActiveRequest(member, record, policy)
            member._request_started(active)
            self._actives.append(active)
            if shape is not None and key is not None:
                if active.name_shape(key, shape, compiles=member.policy.compile):
                    if policy == "fail":
                        refusal = active.unwarmed_error()
                        self._actives.pop()
                        _finish(active, refusal)
                        self._cancel_started(member, refusal)
                        raise refusal

    def _cancel_started(self, member: Member, cause: LifecycleError) -> None:
        """Members started before ``member`` could not start: take them back, audited refused."""
        while self._actives:
            active = self._actives.pop()
            active.member._request_cancelled()
            active.take_back()
            reason = (
                PipelineError(
                    f"pipeline request {self.request_id!r} refused: member {member.name!r} could not "
                    f"start ({cause})", member=member.name, state=member.state,
                )
                if self.pipeline else cause
            )
            _refuse(active.member, active.record.num_inference_steps, self.request_id, reason, refused=True)

    # ------------------------------------------------------------------ leaving
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        lost: AuditWriteError | None = None
        refused: UnwarmedShapeError | None = None
        if isinstance(exc, OutsideBounds):
            for active in self._actives:
                if active.bound_misses is not None and active.policy == "fail":
                    refused = active.outside_bounds_error(exc)
                    break
        try:
            self._close_scope()
            for active in self._actives:
                lost = _finish(active, refused or exc) or lost
            self._actives = []
        finally:
            self._release()
        if refused is not None:
            raise refused from exc
        if lost is not None and exc is None:
            raise lost

    def _close_scope(self) -> None:
        """Everything the scope put around the block, taken back in reverse."""
        while self._refusing:
            self._refusing.pop().__exit__(None, None, None)
        while self._guards:
            self._guards.pop().__exit__(None, None, None)
        if self._token is not None:
            structlog.contextvars.reset_contextvars(**self._token)
            self._token = None

    def _unwind(self) -> None:
        self._close_scope()
        self._release()

    def _release(self) -> None:
        while self._locked:
            self._locked.pop()._lock.release()
        signals.requests(signals.REQUEST_ENDED, [m.name for m in self.members], self.request_id)


def _finish(active: ActiveRequest, error: BaseException | None) -> AuditWriteError | None:
    """Fill in the record and audit it. Returns an ``AuditWriteError`` when a request that
    succeeded could not be audited (the caller raises it after releasing the locks)."""
    member = active.member
    member.backend.synchronize()
    record = active.record
    new_graphs = max(0, member.backend.graph_count() - active.graphs_before)
    cached = cfg_cached = 0
    if member.policy.cache_dit:
        summary = member._serving_state.context.cache.summary(member.module)
        cached, cfg_cached = summary.cached_steps, summary.cfg_cached_steps
    # A request refused mid-way at an unwarmed shape (on_unwarmed="fail") ran nothing.
    refused = isinstance(error, UnwarmedShapeError)
    outcome: RequestOutcome = "ok" if error is None else "refused" if refused else "failed"
    active.complete(new_graphs, cached, cfg_cached, outcome)
    if active.bound_misses is not None:
        if (member._compiler.misses(member.module) or 0) > active.bound_misses:
            active.note_bound_miss()
    miss: ShapeMiss | None = None
    if active.miss is not None:
        miss = ShapeMiss(
            record.request_id, active.key, active.shape, active.policy, active.miss,
            record.duration_ms, record.new_graphs, active.sizes,
        )
    served = (
        (active.bucket.key, record.duration_ms / 1000.0)
        if miss is None and active.bucket is not None and error is None else None
    )
    # The request's result, applied by its lifecycle.
    recompiles = member._request_ended(
        RequestResult(record.new_graphs, member.policy.compile, miss, served)
    )
    fields = _fields(member, record.request_id, record.num_inference_steps)
    fields.update(
        cached_steps=record.cached_steps,
        cfg_cached_steps=record.cfg_cached_steps,
        new_graphs=record.new_graphs,
        duration_ms=round(record.duration_ms, 3),
        outcome=record.outcome,
    )
    if record.shape is not None:
        fields["shape"] = record.shape
    if active.bucket is not None:
        fields["bucket"] = active.bucket.key
    if error is not None:
        fields["error"] = f"{type(error).__name__}: {error}"
    lost = emit_checked(audit.REQUEST_EVENT, record.outcome, fields)
    if record.new_graphs and member.policy.compile:
        lost = lost or emit_checked(audit.RECOMPILE_EVENT, "refused", {
            **member._audit_fields(), "request_id": record.request_id, "new_graphs": record.new_graphs,
            "recompiles_since_warmup": recompiles,
        })
    if miss is not None:
        outcome = "refused" if refused else "ok" if error is None else "failed"
        lost = lost or emit_checked(
            SHAPE_MISS_EVENT, "refused" if outcome != "failed" else "failed",
            {**member._audit_fields(), **miss.as_dict(), "outcome": outcome},
        )
    if lost is None:
        return None
    if error is not None:
        warn_unwritten(audit.REQUEST_EVENT, member.name, lost, error)
        return None
    failure = AuditWriteError(
        f"{member.name}: request {record.request_id!r} was served (outcome ok) but its audit "
        f"event could not be written ({type(lost).__name__}: {lost}); the state stays "
        "WarmedUp. Fix the audit sink.",
        module=member.name, state=member.state, trigger=Trigger.REQUEST,
    )
    failure.__cause__ = lost
    return failure


def _refuse(
    member: Member, steps: int | None, request_id: str | None, error: BaseException, *, refused: bool = False
) -> None:
    """Audit a request that never ran: refused (not legal now, bad arguments) or failed (legal,
    but starting it raised)."""
    outcome = "refused" if refused or isinstance(error, REFUSALS) else "failed"
    fields = _fields(member, request_id, steps)
    fields.update(
        cached_steps=0, new_graphs=0, duration_ms=0.0, outcome=outcome,
        error=f"{type(error).__name__}: {error}",
    )
    lost = emit_checked(audit.REQUEST_EVENT, outcome, fields)
    if lost is not None:
        warn_unwritten(audit.REQUEST_EVENT, member.name, lost, error)


def _fields(member: Member, request_id: str | None, steps: int | None) -> dict[str, Any]:
    return {
        **member._base, "request_id": request_id, "num_inference_steps": steps,
        "state": member.state.value,
    }


def refuse_trigger_inside_request(member: Member, trigger: Trigger) -> None:
    """Inside its own request the owner may only refresh: anything else would wait on itself or
    change the module under the request."""
    active = member._serving_state.active
    if active is not None and trigger is not Trigger.REFRESH:
        raise IllegalTransitionError(
            module=member.name, state=member.state, trigger=trigger,
            reason=f"request {active.record.request_id!r} is running in this thread; "
            f"call {trigger.value}() after its block ends",
            allowed=(Trigger.REFRESH,),
        )



__all__ = [
    "SHAPE_MISS_EVENT",
    "ActiveRequest",
    "RequestRecord",
    "RequestScope",
    "new_request_id",
    "refuse_trigger_inside_request",
]
