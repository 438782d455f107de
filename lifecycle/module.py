"""``ModuleLifecycle``: one transformer's walk Loaded -> CacheMounted -> Compiled -> WarmedUp.

Every trigger is fired on the policy's transitions machine (``lifecycle.machine``), which decides
legality from the states table. The work runs in the machine's ``before`` callback, so work that
raises leaves the state unchanged; the commit hook (``lifecycle.commit``) agrees before the state
moves; the audit event is written from the machine's ``after`` / ``on_exception`` callbacks.

The jobs around it live in small objects: warm-up steering and coverage (``lifecycle.warmup``),
request serving (``lifecycle.serving``), compile artifacts and their save rule
(``adapters.artifact_session``), module sharing and holds (``lifecycle.holds``), the lock whose
owner is a (thread, asyncio task) pair (``lifecycle.locking``).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import structlog
from torch import nn

from adapters import BackendAdapter, CacheDitAdapter, get_backend
from adapters.artifact_session import ArtifactSession
from adapters.artifacts import ArtifactKey, ArtifactReport, build_key
from adapters.errors import AdapterError
from adapters.protocols import CacheAdapter
from lifecycle import audit
from lifecycle import shapes as _shapes
from lifecycle.commit import CommitHook, LocalCommit
from lifecycle.errors import (
    AuditWriteError,
    IllegalTransitionError,
    InvalidConfigError,
    LifecycleError,
    PeerFailedError,
    RankDivergenceError,
    TransitionFailedError,
    UnsupportedModuleError,
    translate_adapter_error,
)
from lifecycle.holds import CACHE_MOUNTS, COMPILED, SHARES
from lifecycle.locking import LockConflict, OwnerLock
from lifecycle.machine import Attempt, MachineError, StateHolder, events_for, fire
from lifecycle.record import Outcome, TransitionRecord, emit_checked, warn_unwritten
from lifecycle.serving import RequestRecord, RequestServer
from lifecycle.warmup import MAX_WARMUP_RUNS, WarmupCoverageWarning, WarmupSteering
from states import LifecyclePolicy, State, Trigger, allowed_triggers, destination, explain_illegal

WarmupRun = Callable[[nn.Module], object]
HISTORY_LIMIT = 10_000
_REFUSALS = (IllegalTransitionError, InvalidConfigError, UnsupportedModuleError)
_WARMED_UP = State.WARMED_UP.value
_STATES: dict[str, State] = {state.value: state for state in State}

__all__ = [
    "HISTORY_LIMIT",
    "MAX_WARMUP_RUNS",
    "ModuleLifecycle",
    "RequestRecord",
    "TransitionRecord",
    "TransitionStep",
    "WarmupCoverageWarning",
    "WarmupRun",
]


# Triggers whose work takes the module out of service while it runs (probes answer not ready).
_UNREADY_WHILE_RUNNING = frozenset({Trigger.RESET, Trigger.INVALIDATE, Trigger.WARM_UP})
# Read on every trigger: a module constant is a third of the cost of an enum class attribute.
_LOADED = State.LOADED
_RESET = Trigger.RESET


class TransitionStep:
    """One trigger attempt, run by the machine's callbacks (``lifecycle.machine.Attempt``).

    The work gets it: ``extra`` holds fields for the audit event, ``on_undo`` registers how to take
    the work back should the commit hook refuse the commit (a peer rank failed).
    """

    __slots__ = (
        "after_error", "done", "extra", "lc", "source", "started", "trigger", "undo", "voted",
        "work", "worked",
    )

    def __init__(self, lc: ModuleLifecycle, trigger: Trigger, work: Callable[[TransitionStep], None]) -> None:
        self.lc = lc
        self.trigger = trigger
        self.work = work
        self.source = _STATES[lc._holder.state]  # the step is part of the lifecycle
        self.started = time.perf_counter()
        self.extra: dict[str, Any] = {}
        self.undo: list[Callable[[], None]] | None = None  # made on first use: several works add none
        self.voted = self.worked = self.done = False
        self.after_error: BaseException | None = None

    def on_undo(self, undo: Callable[[], None]) -> None:
        if self.undo is None:
            self.undo = [undo]
        else:
            self.undo.append(undo)

    # ------------------------------------------------------------------ machine callbacks
    def run(self) -> None:
        lc = self.lc
        trigger = self.trigger
        if lc.serving.active is not None:
            lc.serving.guard(trigger)
        if trigger in _UNREADY_WHILE_RUNNING:
            lc._unready_for = trigger
        if self.source is _LOADED and trigger is not _RESET:
            lc.check_sharing(trigger)
        self.work(self)
        self.worked = self.voted = True
        if trigger is _RESET:
            # An unmount cannot be undone: commit, then tell the caller what the others did.
            try:
                failed = lc.commit.agree(lc.name, trigger._value_, self.source, None)
            except BaseException as exc:
                self.after_error = exc
                return
            if failed:
                self.after_error = lc.commit.committed_anyway(lc.name, _LOADED, failed)
            return
        failed = lc.commit.agree(lc.name, trigger._value_, self.source, None)
        if failed:
            text = "; ".join(f"rank {rank} ({what})" for rank, what in sorted(failed.items()))
            raise PeerFailedError(f"failed on {text}", failed)

    def committed(self) -> None:
        self.done = True
        lc = self.lc
        lc._unready_for = None
        dest = lc.state
        lost = lc.record(self.trigger, self.source, dest, "ok", self.started, None, self.extra)
        if self.after_error is not None:
            if lost is not None:
                warn_unwritten(audit.TRANSITION_EVENT, lc.name, lost, self.after_error)
            raise self.after_error
        if lost is not None:
            raise AuditWriteError(
                f"{lc.name}: {self.trigger.value} succeeded and the state is now {dest.value}, but "
                f"its audit event could not be written ({type(lost).__name__}: {lost}). The "
                "lifecycle keeps working; fix the audit sink.",
                module=lc.name, state=dest, trigger=self.trigger,
            ) from lost

    def aborted(self, error: BaseException) -> None:
        if self.lc._unready_for is self.trigger:
            self.lc._unready_for = None
        if self.done:  # raised after the commit (a lost audit write, a reset's late verdict)
            raise error
        lc = self.lc
        trigger, source = self.trigger, self.source
        if self.worked and self.undo is not None:
            for undo in reversed(self.undo):
                undo()
        if isinstance(error, MachineError):
            error = IllegalTransitionError(
                module=lc.name, state=source, trigger=trigger,
                reason=explain_illegal(lc.policy, source, trigger),
                allowed=allowed_triggers(lc.policy, source),
            )
        if isinstance(error, _REFUSALS):
            lost = lc.record(trigger, source, source, "refused", self.started, error, self.extra)
            if not self.voted:
                self.voted = True
                lc.commit.agree(lc.name, trigger.value, source, error)
            if lost is not None:
                warn_unwritten(audit.TRANSITION_EVENT, lc.name, lost, error)
            raise error
        nested = isinstance(error, TransitionFailedError) and error.module is not None
        cause = error.__cause__ if nested and error.__cause__ is not None else error
        failed: Mapping[int, str] | None = None
        vote_error: BaseException | None = None
        if not self.voted:
            self.voted = True
            try:
                failed = lc.commit.agree(lc.name, trigger.value, source, cause)
            except BaseException as exc:
                vote_error = exc
        elif isinstance(error, PeerFailedError):
            failed = error.failed_ranks
        lost = lc.record(trigger, source, source, "failed", self.started, cause, self.extra)
        if isinstance(cause, (KeyboardInterrupt, SystemExit)):
            raise cause
        if vote_error is not None:
            raise vote_error
        if isinstance(cause, RankDivergenceError):
            raise cause from None
        typed = lc.commit.failure(lc.name, trigger, source, cause, failed)
        if lost is not None:
            warn_unwritten(audit.TRANSITION_EVENT, lc.name, lost, typed)
        raise typed from cause


class ModuleLifecycle:
    """An explicit, audited lifecycle for one transformer module.

    Thread-safe: every trigger and every request holds the lifecycle's lock (re-entrant for its
    owner, a thread or an asyncio task), so transitions and requests on one lifecycle run one at a
    time; other lifecycles are not blocked (lifecycles sharing one module share its lock). Inside
    its own ``request`` the owner may call ``refresh`` (a new cache context for the rest of that
    request); any other trigger, or a nested ``request``, is refused at once.
    """

    def __init__(
        self,
        module: nn.Module,
        name: str = "transformer",
        policy: LifecyclePolicy | None = None,
        backend: str | BackendAdapter = "auto",
        cache_config: Any = None,
        compile_options: Mapping[str, Any] | None = None,
        *,
        cache_adapter: CacheAdapter | None = None,
        artifact_dir: str | os.PathLike[str] | None = None,
        commit: CommitHook | None = None,
        on_unwarmed: str = _shapes.DEFAULT_ON_UNWARMED,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidConfigError(f"name must be a non-empty str, got {name!r}")
        if not isinstance(module, nn.Module):
            raise UnsupportedModuleError(
                f"{name}: ModuleLifecycle manages a torch.nn.Module, got {type(module).__name__}; "
                "pass the transformer itself (e.g. pipe.transformer)",
                module=name,
            )
        policy = LifecyclePolicy() if policy is None else policy
        if not isinstance(policy, LifecyclePolicy):
            raise InvalidConfigError(
                f"{name}: policy must be a states.LifecyclePolicy, got {type(policy).__name__}",
                module=name,
            )
        self.name = name
        self.policy = policy
        self.module_id = uuid.uuid4().hex[:12]
        self._module = module
        self.commit: CommitHook = commit if commit is not None else LocalCommit()
        self._holder = StateHolder()
        self._events = events_for(policy)
        # The trigger whose work is running now, when it makes the module unfit to serve (a
        # reset, an invalidate, a re-warm-up): ``ready`` answers False from its first moment.
        self._unready_for: Trigger | None = None
        self._seq = 0
        # Each record as a plain tuple, made a TransitionRecord when ``history`` is read: one is
        # appended per trigger, and reads are rare. The latest HISTORY_LIMIT only: a host that
        # refreshes per request would otherwise grow it for as long as it serves (the audit
        # keeps every one).
        self._history: deque[tuple[Any, ...]] = deque(maxlen=HISTORY_LIMIT)
        loaded = State.LOADED
        if artifact_dir is not None and not isinstance(artifact_dir, (str, os.PathLike)):
            raise InvalidConfigError(
                f"{name}: artifact_dir must be a directory path (str or PathLike), got "
                f"{type(artifact_dir).__name__}", module=name, state=loaded,
            )
        try:
            self.backend: BackendAdapter = get_backend(backend)
        except AdapterError as exc:
            raise translate_adapter_error(exc, module=name, state=loaded) from exc
        if cache_adapter is None:
            cache_adapter = CacheDitAdapter()
        elif not isinstance(cache_adapter, CacheAdapter):
            raise InvalidConfigError(
                f"{name}: cache_adapter must implement adapters.CacheAdapter (mount, refresh, "
                f"unmount, summary, ...), got {type(cache_adapter).__name__}; leave it None for "
                "cache-dit's",
                module=name, state=loaded,
            )
        self.cache: CacheAdapter = cache_adapter
        # Declared serving buckets and what a request at an unwarmed shape does (lifecycle.shapes);
        # the shape options ("dynamic_buckets", "measure_paths") never reach torch.compile.
        shape_options, compile_options = _shapes.split_options(compile_options, module=name)
        self.shapes = _shapes.ShapeBook(_shapes.check_policy(on_unwarmed, module=name), shape_options)
        try:
            self.compile_options: dict[str, Any] = self.backend.validate_options(compile_options or {})
            if policy.compile:
                self.backend.validate_for_module(module, self.compile_options)
            self.cache_config: Any = self.cache.validate_config(cache_config) if policy.cache_dit else None
            check_config = getattr(self.cache, "validate_for_module", None)
            if policy.cache_dit and callable(check_config):
                check_config(module, self.cache_config)
        except AdapterError as exc:
            raise translate_adapter_error(exc, module=name, state=loaded) from exc
        self.artifacts = (
            ArtifactSession(artifact_dir) if artifact_dir is not None and policy.compile else None
        )
        self._serving_steps: int | None = getattr(self.cache_config, "num_inference_steps", None)
        self._compiles = 0
        self._compile_s = 0.0
        self.steering = WarmupSteering(self)
        self.serving = RequestServer(self)
        self._base: dict[str, Any] = {
            "module": name,
            "module_id": self.module_id,
            "backend": self.backend.name,
            "policy": policy.as_dict(),
            **self.commit.audit_fields(),
        }
        self._refuse_host_compiled(module)
        # Lifecycles over one module share its lock (lifecycle.holds); registered last, so a
        # construction that failed above leaves no trace.
        self._share = SHARES.join(module, self)
        self._lock: OwnerLock = self._share.lock
        self._mount_hold = CACHE_MOUNTS.hold(module)
        self._compiled_hold = COMPILED.hold(module)
        self.check_sharing(None)

    # ------------------------------------------------------------------ read-only views
    @property
    def state(self) -> State:
        return _STATES[self._holder.state]

    @property
    def ready(self) -> bool:
        """True only while WarmedUp and serving from the lifecycle's own cache context: a
        readiness probe's answer. Lock-free, so a probe never waits on a compile; liveness must
        not depend on it."""
        return (
            self._holder.state == _WARMED_UP
            and self._unready_for is None
            and not self.steering.context_steered
            and self.shapes.all_warm()  # every declared bucket warm
        )

    @property
    def module(self) -> nn.Module:
        """The module to call now. Mounting and compiling happen in place, so this is always the
        object passed in: a pipeline that holds it keeps working."""
        return self._module

    @property
    def history(self) -> tuple[TransitionRecord, ...]:
        """The latest ``HISTORY_LIMIT`` trigger attempts, oldest first."""
        with self._lock:
            return tuple(TransitionRecord._make(record) for record in self._history)

    @property
    def serving_steps(self) -> int | None:
        """The step count a request serves when it names none."""
        return self._serving_steps

    @property
    def lock(self) -> OwnerLock:
        """This lifecycle's lock (shared by every lifecycle over the same module)."""
        return self._lock

    def allowed_triggers(self) -> tuple[Trigger, ...]:
        return allowed_triggers(self.policy, self.state)

    def can(self, trigger: Trigger) -> bool:
        """Whether the table makes ``trigger`` legal now."""
        return destination(self.policy, self.state, trigger) is not None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            cache_summary = (
                self.cache.summary(self._module).as_dict()
                if self.policy.cache_dit and self.state is not State.LOADED
                else None
            )
            return {
                "module": self.name,
                "state": self.state.value,
                "backend": self.backend.name,
                "compiles": self._compiles,
                "compile_s": self._compile_s,
                "warmup_s": self.steering.warmup_s,
                "recompiles_since_warmup": self.serving.recompiles_since_warmup,
                "requests": self.serving.requests,
                "warmup_covered_cached_branch": self.steering.covered,
                "cache": cache_summary,
                "artifacts": self.artifacts.statuses() if self.artifacts is not None else None,
                "shapes": self.shapes.stats(),
            }

    def __repr__(self) -> str:
        return f"ModuleLifecycle({self.name!r}, state={self.state.value}, policy={self.policy})"

    # ------------------------------------------------------------------ audit
    def audit_fields(self) -> dict[str, Any]:
        """The fields every audit event of this lifecycle starts from (one place: a distributed
        lifecycle's rank and world size come in through its commit hook). A copy."""
        return dict(self._base)

    @property
    def base_fields(self) -> Mapping[str, Any]:
        """``audit_fields()`` without the copy, for building events (never mutate it)."""
        return self._base

    def record(
        self,
        trigger: Trigger,
        source: State,
        dest: State,
        outcome: Outcome,
        started: float,
        error: BaseException | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Exception | None:
        """Append to ``history`` and write the transition event; return the sink's error, if any."""
        seq = self._seq = self._seq + 1
        duration_ms = (time.perf_counter() - started) * 1000.0
        error_text = f"{type(error).__name__}: {error}" if error is not None else None
        self._history.append((seq, trigger, source, dest, outcome, duration_ms, error_text))
        # ``_value_`` (enum's own slot) rather than ``.value``: the property costs ~0.3 us a read.
        fields = {
            **self._base, "trigger": trigger._value_, "source": source._value_, "dest": dest._value_,
            "outcome": outcome, "duration_ms": round(duration_ms, 3), "seq": seq,
        }
        if extra:
            fields.update(extra)
        if error is not None:
            fields["error"] = error_text
            fields["error_type"] = type(error).__name__
        return emit_checked(audit.TRANSITION_EVENT, outcome, fields)

    def _refuse(self, error: LifecycleError, trigger: Trigger) -> LifecycleError:
        """Audit a refusal decided before any trigger fired (prepare's arguments, a busy lock)."""
        source = self.state
        lost = self.record(trigger, source, source, "refused", time.perf_counter(), error)
        if lost is not None:
            warn_unwritten(audit.TRANSITION_EVENT, self.name, lost, error)
        return error

    # ------------------------------------------------------------------ the machinery
    @contextmanager
    def hold(self, trigger: Trigger) -> Iterator[None]:
        """Hold this lifecycle's lock for ``trigger``; another asyncio task of the owner's thread
        is refused (audited) instead of deadlocking the loop."""
        self._acquire(trigger)
        try:
            yield
        finally:
            self._lock.release()

    def _acquire(self, trigger: Trigger, steps: int | None = None, request_id: str | None = None) -> None:
        try:
            self._lock.acquire()
        except LockConflict as exc:
            error = IllegalTransitionError(
                module=self.name, state=self.state, trigger=trigger, reason=str(exc),
                allowed=allowed_triggers(self.policy, self.state),
            )
            if trigger is Trigger.REQUEST:
                self.serving.refuse(steps, request_id, error)
                raise error from None
            raise self._refuse(error, trigger) from None

    def fire(self, trigger: Trigger, attempt: Attempt) -> None:
        """Fire ``trigger`` on the machine with ``attempt`` (the caller holds the lock)."""
        fire(self._events, self._holder, trigger, attempt)

    def transition(self, trigger: Trigger, work: Callable[[TransitionStep], None]) -> None:
        """Run ``work`` as ``trigger``: legal per the table, the state moves only if it succeeds.
        (For this module's triggers and ``PipelineLifecycle``'s joint warm-up.)"""
        self._acquire(trigger)
        try:
            fire(self._events, self._holder, trigger, TransitionStep(self, trigger, work))
        finally:
            self._lock.release()

    def _invalid(self, trigger: Trigger, message: str) -> InvalidConfigError:
        return InvalidConfigError(
            f"{self.name}: {message}", module=self.name, state=self.state, trigger=trigger
        )

    def check_steps(self, trigger: Trigger, steps: object) -> None:
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
            raise self._invalid(trigger, f"num_inference_steps must be a positive int, got {steps!r}")

    def check_callable(self, trigger: Trigger, run: object) -> None:
        if not callable(run):
            raise self._invalid(
                trigger,
                f"warm-up needs a callable run(module) that makes representative forward calls, "
                f"got {type(run).__name__}",
            )

    def check_prepare(self, run: object, num_inference_steps: object) -> None:
        """``prepare``'s arguments, checked before anything moves; a refusal is audited."""
        try:
            if self.state is not State.WARMED_UP:
                self.check_callable(Trigger.WARM_UP, run)
            self.check_steps(Trigger.REFRESH, num_inference_steps)
        except InvalidConfigError as exc:
            trigger = exc.trigger if isinstance(exc.trigger, Trigger) else Trigger.WARM_UP
            raise self._refuse(exc, trigger) from None

    def set_serving_steps(self, steps: int | None) -> None:
        if steps is not None:
            self._serving_steps = steps

    # ------------------------------------------------------------------ sharing
    def _compatible(self, other: object) -> bool:
        return (
            isinstance(other, ModuleLifecycle)
            and other.policy == self.policy
            and type(other.cache) is type(self.cache)
            and _same(other.cache_config, self.cache_config)
            and _same(other.compile_options, self.compile_options)
        )

    def check_sharing(self, trigger: Trigger | None) -> None:
        """Refuse to drive a module another lifecycle drives differently (issue 14, defect 5).

        Lifecycles over one module share it only when they would drive it the same way (same
        policy, cache adapter, cache config and compile options); then their state is the
        module's and their requests run one at a time on its shared lock. Otherwise, while the
        other one is past Loaded, this one is refused: its outputs would silently be the other's
        (a cache-less lifecycle serving cache-dit's cached steps, say)."""
        if not self.policy.cache_dit and self.cache.is_mounted(self._module):
            raise UnsupportedModuleError(
                f"{self.name}: the module has cache-dit mounted (by the host or another lifecycle) "
                "but this lifecycle's policy disables Cache-DiT, so it would serve cached steps; "
                "unmount it first (cache_dit.disable_cache) or use LifecyclePolicy(cache_dit=True)",
                module=self.name, state=self.state, trigger=trigger,
            )
        if not self._share.shared:
            return
        for other in SHARES.others(self._module, self):
            driving = isinstance(other, ModuleLifecycle) and other.state is not State.LOADED
            if driving and isinstance(other, ModuleLifecycle) and not self._compatible(other):
                raise InvalidConfigError(
                    f"{self.name}: the module is already driven by lifecycle {other.name!r} "
                    f"(state {other.state.value}, policy {other.policy}) with another policy, cache "
                    "or compile configuration; two lifecycles share a module only when configured "
                    f"alike. Call reset() on {other.name!r} first, give this lifecycle its own "
                    "module, or construct it with the same arguments",
                    module=self.name, state=self.state, trigger=trigger,
                )

    def _refuse_host_compiled(self, module: nn.Module) -> None:
        """A module the host compiled in place is refused, never compiled or mounted over
        (issue 14, defect 8): mounting cache-dit now would leave that code on the unwrapped path."""
        if COMPILED.holders(module):
            return  # compiled by another lifecycle: adopted at compile()
        compiled = getattr(module, "_compiled_call_impl", None) is not None or any(
            getattr(sub, "_compiled_call_impl", None) is not None for sub in module.modules()
        )
        if compiled:
            raise UnsupportedModuleError(
                f"{self.name}: the module was already compiled in place by the host "
                "(module.compile() or a block's); the lifecycle compiles it itself, after mounting "
                "cache-dit. Pass it uncompiled (set module._compiled_call_impl = None), or do not "
                "manage it with a lifecycle",
                module=self.name, state=State.LOADED,
            )

    # ------------------------------------------------------------------ triggers
    def mount_cache(self) -> None:
        """Loaded -> CacheMounted: wrap the module with cache-dit (before any compile)."""
        self.transition(Trigger.MOUNT_CACHE, self._mount)

    def _mount(self, step: TransitionStep) -> None:
        module = self._module
        with self._mount_hold.acquire(self.module_id) as first:
            if not first:
                # Another lifecycle over this module mounted it (configured alike): adopt it.
                self.cache.refresh(module, self.cache_config, self._serving_steps)
                step.extra["adopted"] = "lifecycle"
            elif self.cache.is_mounted(module):
                # The host mounted it (e.g. with a BlockAdapter): adopt it, explicitly, with this
                # lifecycle's config; reset() unmounts it.
                self.cache.refresh(module, self.cache_config, self._serving_steps)
                step.extra["adopted"] = "host"
            else:
                try:
                    self.cache.check_supported(module)
                except AdapterError as exc:
                    raise translate_adapter_error(
                        exc, module=self.name, state=self.state, trigger=Trigger.MOUNT_CACHE
                    ) from exc
                self.cache.mount(module, self.cache_config)
        adopted = step.extra.get("adopted")
        step.on_undo(lambda: self._release_cache_mount(unmount=adopted is None))
        step.extra["cache_config"] = self.cache.describe_config(self.cache_config)

    def compile(self) -> None:
        """-> Compiled: compile the (cache-wrapped) module in place on the backend."""
        self.transition(Trigger.COMPILE, self._compile)

    def _compile(self, step: TransitionStep) -> None:
        started = time.perf_counter()
        with self._compiled_hold.acquire(self.module_id) as first:
            if first:
                if self.artifacts is not None:
                    self._report_artifacts(self.artifacts.before_compile(self._artifact_key), step.extra)
                self.backend.compile(self._module, self.compile_options)
                self._compiles += 1
            step.extra["reused_compiled"] = not first
        step.on_undo(self._release_compiled)
        self._compile_s += time.perf_counter() - started
        step.extra["compile_backend"] = str(self.compile_options.get("backend"))
        reproducible = self.backend.reproducibility(self.compile_options)
        if reproducible is not None:  # compile_options={"reproducible": True}
            step.extra["reproducible"] = reproducible

    def warm_up(self, run: Callable[..., object], shapes: Any = None) -> None:
        """-> WarmedUp: call ``run(module)``; with cache-dit mounted and compile on, the warm-up
        runs under a steered cache context until it has covered the cached-step branch.

        ``shapes``: serving buckets to warm (declared now, or again): ``run(module, shape)`` makes
        one warm-up call at a shape, each bucket in its own steered context. From WarmedUp this
        adds buckets (``warm_up(run, shapes=lc.missed_shapes())``). Without ``shapes``, a
        lifecycle with declared buckets warms them all again (after ``invalidate``)."""

        def work(step: TransitionStep) -> None:
            self.check_callable(Trigger.WARM_UP, run)
            planned = _shapes.check_shapes(shapes, module=self.name) if shapes is not None else None
            call_at = _shapes.call_at_shape(run, self._module)
            _shapes.run_warmup([self], call_at, planned, [step.extra], max_runs=MAX_WARMUP_RUNS)

        self.transition(Trigger.WARM_UP, work)

    def coverage(self) -> list[dict[str, Any]]:
        """Per declared bucket: warmed, graphs, seconds, covered, the path serving it (compiled or
        eager, with the timings that chose it), and the first-request ratio once served."""
        with self._lock:
            return self.shapes.coverage()

    def missed_shapes(self) -> list[dict[str, Any]]:
        """Shapes that requests named and no bucket covers: ``warm_up(run, shapes=...)`` them."""
        with self._lock:
            return self.shapes.missed_shapes()

    def refresh(self, num_inference_steps: int | None = None) -> None:
        """Same state, fresh cache-dit context from this lifecycle's config (and step count)."""

        def work(step: TransitionStep) -> None:
            self.check_steps(Trigger.REFRESH, num_inference_steps)
            before = self._serving_steps
            steps = num_inference_steps if num_inference_steps is not None else before
            self.cache.refresh(self._module, self.cache_config, steps)
            self._serving_steps = steps
            self.steering.context_steered = False
            step.extra["num_inference_steps"] = steps
            step.on_undo(lambda: self._restore_steps(before))
            active = self.serving.active
            if active is not None:
                # Refresh inside one's own request: the rest of it runs in the new context.
                active.record.num_inference_steps = steps
                step.extra["request_id"] = active.record.request_id

        self.transition(Trigger.REFRESH, work)

    def _restore_steps(self, steps: int | None) -> None:
        self._serving_steps = steps
        self.cache.refresh(self._module, self.cache_config, steps)

    def invalidate(self) -> None:
        """WarmedUp -> the state before it: weights changed, so warm up again before serving."""
        def work(step: TransitionStep) -> None:
            self.steering.reset()
            self.shapes.cool()  # every bucket must be warmed again; the plan stays

        self.transition(Trigger.INVALIDATE, work)

    def reset(self) -> None:
        """-> Loaded: unmount cache-dit and drop compiled code; the original forward runs again."""

        def work(step: TransitionStep) -> None:
            # Unmount first: it is the step that can fail, and nothing has changed yet if it does.
            # Either is undone only by the last lifecycle holding it (a shared module).
            self._release_cache_mount()
            self._release_compiled()
            self.steering.reset()
            self.steering.context_steered = False
            self.serving.recompiles_since_warmup = 0
            self.shapes.forget()

        self.transition(Trigger.RESET, work)

    def _release_cache_mount(self, *, unmount: bool = True) -> None:
        if self.policy.cache_dit:
            with self._mount_hold.release(self.module_id) as last:
                if unmount and last and self.cache.is_mounted(self._module):
                    self.cache.unmount(self._module)

    def _release_compiled(self) -> None:
        with self._compiled_hold.release(self.module_id) as last:
            if last:
                self.backend.decompile(self._module)

    def prepare(
        self, run: Callable[..., object], num_inference_steps: int | None = None, shapes: Any = None
    ) -> None:
        """Walk the legal path to WarmedUp, skipping what is done. Idempotent and thread-safe:
        concurrent callers wait on the lock, and all but the first find the work done.

        ``shapes``: the declared serving buckets, e.g. ``[{"height": 1024, "width": 1024}]``;
        ``run(module, shape)`` then makes one warm-up call at a shape. Already WarmedUp, the
        buckets not warm yet are warmed (WarmedUp -> WarmedUp)."""
        with self.hold(Trigger.WARM_UP):
            self.check_prepare(run, num_inference_steps)
            planned = None
            if shapes is not None:
                try:
                    planned = _shapes.check_shapes(shapes, module=self.name)
                except InvalidConfigError as exc:
                    raise self._refuse(exc, Trigger.WARM_UP) from None
            self.set_serving_steps(num_inference_steps)
            _shapes.choose_sharing(self, planned)  # several buckets before compile: shared graphs
            if self.state is State.WARMED_UP and planned is not None:
                cold = [s for s in planned if self.shapes.lookup(s) is None]
                if cold:
                    self.check_callable(Trigger.WARM_UP, run)
                    self.warm_up(run, shapes=cold)
                return
            for trigger in self.remaining_path():
                if trigger is Trigger.WARM_UP:
                    self.warm_up(run, shapes=planned)
                elif trigger is Trigger.MOUNT_CACHE:
                    self.mount_cache()
                else:
                    self.compile()

    async def aprepare(self, run: WarmupRun, num_inference_steps: int | None = None) -> None:
        """``prepare`` in a worker thread, so an event loop keeps serving meanwhile."""
        import asyncio

        await asyncio.to_thread(self.prepare, run, num_inference_steps)

    def remaining_path(self) -> list[Trigger]:
        """The triggers from here to WarmedUp along the policy's path, read from the table."""
        path = self.policy.path
        state = self.state
        steps: list[Trigger] = []
        here = path.index(state)
        for source, dest in zip(path[here:], path[here + 1 :], strict=False):
            steps.extend(
                t for t in (Trigger.MOUNT_CACHE, Trigger.COMPILE, Trigger.WARM_UP)
                if destination(self.policy, source, t) is dest
            )
        return steps

    # ------------------------------------------------------------------ warm-up and artifacts
    def restore_serving_context(self, reason: str) -> None:
        """Rebuild cache-dit's context from this lifecycle's config and serving step count."""
        started = time.perf_counter()
        self.cache.refresh(self._module, self.cache_config, self._serving_steps)
        # Debug level, for operators who want to see it; the refresh trigger has its own
        # transition event, and every lifecycle.request implies a refresh on entry. Built only
        # when it would be written: it follows every warm-up.
        if not audit.debug_enabled():
            return
        audit.logger().debug(
            audit.CACHE_REFRESH_EVENT,
            **self._base,
            reason=reason,
            num_inference_steps=self._serving_steps,
            duration_ms=round((time.perf_counter() - started) * 1000.0, 3),
        )

    def _artifact_key(self) -> ArtifactKey:
        return build_key(
            self._module,
            compile_options=self.compile_options,
            cache_config=self.cache_config,
            cache_version=_cache_version(self.cache) if self.policy.cache_dit else None,
            policy=self.policy.as_dict(),
        )

    def save_artifacts(self, extra: dict[str, Any]) -> None:
        """At WarmedUp: save what this compile added (the session's rule decides)."""
        if self.artifacts is not None:
            report = self.artifacts.after_warmup()
            if report is not None:
                self._report_artifacts(report, extra)

    def _report_artifacts(self, report: ArtifactReport, extra: dict[str, Any]) -> None:
        """Audit one load or save; stale, corrupt and failed are warnings, never errors."""
        extra[f"artifacts_{report.action}"] = report.status
        outcome = "refused" if report.problem else "ok"
        lost = emit_checked("lifecycle.artifacts", outcome, {**self._base, **report.as_dict()})
        if lost is not None:
            warn_unwritten("lifecycle.artifacts", self.name, lost)

    # ------------------------------------------------------------------ serving
    @contextmanager
    def request(
        self,
        num_inference_steps: int | None = None,
        request_id: str | None = None,
        shape: Any = None,
        on_unwarmed: str | None = None,
    ) -> Iterator[RequestRecord]:
        """Serve one request from a fresh cache context; the yielded record is filled in on exit.

        - Legal only where the table allows ``request`` (WarmedUp); elsewhere
          ``IllegalTransitionError`` naming ``prepare``.
        - The context is rebuilt from this lifecycle's own cache config (and
          ``num_inference_steps`` when given), so identical requests give identical outputs and
          nothing of the warm-up or an earlier request leaks in.
        - One request at a time per lifecycle: the lock is held for the whole block, so a
          request or transition from another thread waits for it to end; another asyncio task
          on the same thread is refused at once (it could only block the loop).
        - Inside the block the owner may call ``refresh()``: the rest of the request runs in the
          new context. Any other trigger and a nested ``request()`` raise
          ``IllegalTransitionError`` at once.
        - An exception from the block is recorded (outcome ``failed``) and propagates unchanged;
          the state stays WarmedUp.
        - ``new_graphs`` reads dynamo's process-wide graph count: graphs compiled meanwhile for
          another module (e.g. the other Wan 2.2 transformer in the same pipeline call) count too.
        - ``shape``: the request's shape as the host's call arguments (``{"height": 512,
          "width": 512}``); without it, each transformer call is checked against the input sizes
          warm-up saw. A shape no warm-up covered is a ``lifecycle.shape_miss``, handled by
          ``on_unwarmed`` (this request) or the lifecycle's policy: ``"eager"`` runs without
          compiling, ``"fail"`` raises ``UnwarmedShapeError`` before the transformer runs
          (audited refused), ``"compile"`` compiles inline (audited as a recompile).
        """
        self._acquire(Trigger.REQUEST, num_inference_steps, request_id)
        try:
            key = _shapes.key_or_none(shape)
            active = self.serving.begin(num_inference_steps, request_id, key)
            try:
                shape_info = _shapes.begin_request(self, shape, on_unwarmed, active.record.request_id)
            except LifecycleError as exc:
                self.serving.cancel(active, exc)
                raise
            error: BaseException | None = None
            token = structlog.contextvars.bind_contextvars(request_id=active.record.request_id)
            try:
                with _shapes.ServingGuard(self, shape_info, active.record.request_id):
                    yield active.record
            except BaseException as exc:
                error = exc
                raise
            finally:
                structlog.contextvars.reset_contextvars(**token)
                self.serving.end(active, error)
                record = active.record
                _shapes.end_request(
                    self, shape_info, record.request_id, record.duration_ms, record.new_graphs, error
                )
        finally:
            self._lock.release()


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # e.g. configs holding tensors
        return False


def _cache_version(cache: CacheAdapter) -> str | None:
    version = getattr(cache, "version", None)
    return str(version()) if callable(version) else None
