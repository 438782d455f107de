"""``ModuleLifecycle``: one transformer's walk Loaded -> CacheMounted -> Compiled -> WarmedUp.

Every trigger is fired on the policy's transitions machine (``lifecycle.machine``), which decides
legality from the states table. The work runs in the machine's ``before`` callback, so work that
raises leaves the state unchanged; the commit hook (``lifecycle.commit``) agrees before the state
moves; the audit event is written from the machine's ``after`` / ``on_exception`` callbacks.

The lifecycle owns its fields and is their one writer. The jobs around it are objects that
return results or own their own data: the warm-up (``lifecycle.warmup``) returns a
``WarmupResult`` that the lifecycle applies to itself; buckets and misses are a ``BucketBook``
(``lifecycle.buckets``); the cache context is a ``CacheContext`` (``lifecycle.context``); a
request is a ``RequestScope`` (``lifecycle.serving``), the same one a pipeline uses; the prepare
walk is ``lifecycle.walk``'s, the same one a pipeline uses.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from types import MappingProxyType
from typing import Any, cast

from torch import nn

from adapters import BackendAdapter, CacheDitAdapter, get_backend
from adapters import _torch_internals as internals
from adapters.artifact_session import ArtifactSession
from adapters.artifacts import ArtifactKey, ArtifactReport, build_key
from adapters.calls import SharedDims
from adapters.compiler import Compiler, CompileReport, Example
from adapters.errors import AdapterError
from adapters.protocols import CacheAdapter
from lifecycle import audit, walk
from lifecycle.buckets import BucketBook
from lifecycle.commit import CommitHook, LocalCommit
from lifecycle.config import CompilePlan, ServingPolicy, check_not_moved
from lifecycle.context import CacheContext
from lifecycle.counters import ServingCounters
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
from lifecycle.machine import MachineError, StateHolder, events_for
from lifecycle.record import Outcome, TransitionRecord, emit_checked, warn_unwritten
from lifecycle.serving import RequestRecord, RequestScope, refuse_trigger_inside_request
from lifecycle.warmup import MAX_WARMUP_RUNS, MemberWarmup, WarmupCoverageWarning, call_at_shape
from states import LifecyclePolicy, State, Trigger, allowed_triggers, destination, explain_illegal

WarmupRun = Callable[..., object]
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


# The plan an ahead-of-time compile falls back to when no trusted package can serve the blocks.
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
        self.source = _STATES[lc._holder.state]
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
        if lc._counters.active is not None:
            refuse_trigger_inside_request(lc, trigger)
        if trigger in _UNREADY_WHILE_RUNNING:
            lc._set_unready(trigger)
        if self.source is _LOADED and trigger is not _RESET:
            lc._check_sharing(trigger)
        self.work(self)
        self.worked = self.voted = True
        commit = lc._commit
        if not commit.votes:  # a single process: the local outcome is the outcome
            return
        if trigger is _RESET:
            # An unmount cannot be undone: commit, then tell the caller what the others did.
            try:
                failed = commit.agree(lc.name, trigger._value_, self.source, None)
            except BaseException as exc:
                self.after_error = exc
                return
            if failed:
                self.after_error = commit.committed_anyway(lc.name, _LOADED, failed)
            return
        failed = commit.agree(lc.name, trigger._value_, self.source, None)
        if failed:
            text = "; ".join(f"rank {rank} ({what})" for rank, what in sorted(failed.items()))
            raise PeerFailedError(f"failed on {text}", failed)

    def committed(self) -> None:
        self.done = True
        lc = self.lc
        if lc._unready_for is not None:
            lc._set_unready(None)
        dest = _STATES[lc._holder.state]
        lost = lc._record(self.trigger, self.source, dest, "ok", self.started, None, self.extra)
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
            self.lc._set_unready(None)
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
            lost = lc._record(trigger, source, source, "refused", self.started, error, self.extra)
            if not self.voted:
                self.voted = True
                lc._commit.agree(lc.name, trigger.value, source, error)
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
                failed = lc._commit.agree(lc.name, trigger.value, source, cause)
            except BaseException as exc:
                vote_error = exc
        elif isinstance(error, PeerFailedError):
            failed = error.failed_ranks
        lost = lc._record(trigger, source, source, "failed", self.started, cause, self.extra)
        if isinstance(cause, (KeyboardInterrupt, SystemExit)):
            raise cause
        if vote_error is not None:
            raise vote_error
        if isinstance(cause, RankDivergenceError):
            raise cause from None
        typed = lc._commit.failure(lc.name, trigger, source, cause, failed)
        if lost is not None:
            warn_unwritten(audit.TRANSITION_EVENT, lc.name, lost, typed)
        raise typed from cause


class ModuleLifecycle:
    """An explicit, audited lifecycle for one transformer module.

    Thread-safe: every trigger and every request holds the lifecycle's lock (re-entrant for its
    owner, a thread or an asyncio task), so transitions and requests on one lifecycle run one at a
    time; other lifecycles are not blocked (lifecycles sharing one module share its lock). Inside
    its own ``request`` the owner may call ``refresh`` (a new cache context for the rest of that
    request); any other trigger, or a nested ``request``, is refused at once. Reads (``ready``,
    ``state``, ``coverage()``, ``missed_shapes()``, ``history``, ``stats()``) never take that lock:
    they return consistent snapshots while a request or a compile runs.

    Args:
        module: the transformer (an ``nn.Module``), mounted and compiled in place.
        name: the name in every audit event and error.
        policy: which accelerations apply (``LifecyclePolicy``: cache-dit and/or compile).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"npu"`` or a ``BackendAdapter``.
        cache_config: a ``cache_dit.DBCacheConfig`` (default: ``DBCacheConfig()``).
        compile_options: torch.compile's own keyword arguments, passed to torch unchanged.
        compile_plan: how to compile (``CompilePlan``).
        serving: how to serve (``ServingPolicy``).
        cache_adapter: a ``CacheAdapter`` (default: cache-dit's).
        artifact_dir: keep compile artifacts there and load them on the next start.

    Raises:
        UnsupportedModuleError: not an ``nn.Module``, or one the host compiled itself.
        InvalidConfigError: a bad argument (the message names it and the fix).
        BackendUnavailableError: the backend's runtime or device is missing.

    Example::

        lc = ModuleLifecycle(pipe.transformer, name="transformer", backend="cuda",
                             cache_config=cache_dit.DBCacheConfig(), compile_plan=CompilePlan())
        lc.prepare(lambda module: denoise(module, warmup_inputs, steps=2), num_inference_steps=28)
        with lc.request(num_inference_steps=28, request_id="r-1"):
            latents = denoise(lc.module, inputs, steps=28)
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
        compile_plan: CompilePlan | None = None,
        serving: ServingPolicy | None = None,
        cache_adapter: CacheAdapter | None = None,
        artifact_dir: str | os.PathLike[str] | None = None,
        commit: CommitHook | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidConfigError(f"name must be a non-empty str, got {name!r}")
        if not isinstance(module, nn.Module):
            raise UnsupportedModuleError(
                f"{name}: ModuleLifecycle manages a torch.nn.Module, got {type(module).__name__}; "
                "pass the transformer itself (e.g. pipe.transformer)",
                module=name,
            )
        loaded = State.LOADED
        policy = LifecyclePolicy() if policy is None else policy
        compile_plan = CompilePlan() if compile_plan is None else compile_plan
        serving = ServingPolicy() if serving is None else serving
        for value, kind, argument in (
            (policy, LifecyclePolicy, "policy"),
            (compile_plan, CompilePlan, "compile_plan"),
            (serving, ServingPolicy, "serving"),
        ):
            if not isinstance(value, kind):
                raise InvalidConfigError(
                    f"{name}: {argument} must be a {kind.__name__}, got {type(value).__name__}",
                    module=name, state=loaded,
                )
        if artifact_dir is not None and not isinstance(artifact_dir, (str, os.PathLike)):
            raise InvalidConfigError(
                f"{name}: artifact_dir must be a directory path (str or PathLike), got "
                f"{type(artifact_dir).__name__}", module=name, state=loaded,
            )
        if artifact_dir is not None and not os.fspath(artifact_dir):
            raise InvalidConfigError(
                f"{name}: artifact_dir is empty (an unset environment variable?); pass a directory "
                "path to keep compile artifacts, or None to keep none",
                module=name, state=loaded,
            )
        check_not_moved(compile_options, module=name)
        self._name = name
        self._policy = policy
        self._plan = compile_plan
        self._serving = serving
        self._module_id = uuid.uuid4().hex[:12]
        self._module = module
        self._commit: CommitHook = commit if commit is not None else LocalCommit()
        self._holder = StateHolder()
        self._events = events_for(policy)
        # The trigger whose work is running now, when it makes the module unfit to serve (a
        # reset, an invalidate, a re-warm-up): ``ready`` answers False from its first moment.
        self._unready_for: Trigger | None = None
        self._seq = 0
        # Each record as a plain tuple, made a TransitionRecord when ``history`` is read: one is
        # appended per trigger, and reads are rare. The latest HISTORY_LIMIT only (the audit
        # keeps every one). Its own lock: reads never wait for a request.
        self._history: deque[tuple[Any, ...]] = deque(maxlen=HISTORY_LIMIT)
        self._history_lock = threading.Lock()
        try:
            internals.check()
            self._backend: BackendAdapter = get_backend(backend)
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
        self._cache: CacheAdapter = cache_adapter
        try:
            # The host's mapping, copied once and never changed; the adapter applies its
            # defaults to its own copy.
            self._compile_options: dict[str, Any] = dict(compile_options or {}) if isinstance(
                compile_options, Mapping) or compile_options is None else compile_options
            self._torch_options = self._backend.validate_options(self._compile_options)
            if policy.compile:
                self._backend.validate_plan(compile_plan, self._torch_options)
                self._backend.validate_for_module(module, self._torch_options, compile_plan)
            self._cache_config: Any = self._cache.validate_config(cache_config) if policy.cache_dit else None
            check_config = getattr(self._cache, "validate_for_module", None)
            if policy.cache_dit and callable(check_config):
                check_config(module, self._cache_config)
            self._artifacts = (
                ArtifactSession(artifact_dir) if artifact_dir is not None and policy.compile else None
            )
            # The one compiler this lifecycle calls, picked and configured by the backend.
            self._compiler: Compiler = self._backend.compiler(
                compile_plan if policy.compile else CompilePlan(), self._torch_options, artifact_dir
            )
            # What the compiler keeps for this process only goes with the lifecycle.
            weakref.finalize(self, self._compiler.close)
        except AdapterError as exc:
            raise translate_adapter_error(exc, module=name, state=loaded) from exc
        self._base: dict[str, Any] = {
            "module": name,
            "module_id": self._module_id,
            "backend": self._backend.name,
            "policy": policy.as_dict(),
            **self._commit.audit_fields(),
        }
        self._context = CacheContext(
            module, self._cache, self._cache_config, enabled=policy.cache_dit, base_fields=self._base
        )
        self._book = BucketBook()
        self._counters = ServingCounters()
        # Whether the buckets share dynamic graphs: decided before the compile (never written
        # into compile_options), and the dims the latest warm-up marked dynamic.
        self._shares_graphs = False
        self._shared_dims: SharedDims = {}
        # What the latest compile reports on each coverage row (e.g. packages loaded or built).
        self._compile_row: dict[str, Any] = {}
        self._compiles = 0
        self._compile_s = 0.0
        self._warmup_s = 0.0
        self._covered: bool | None = None
        self._refuse_host_compiled(module)
        # Lifecycles over one module share its lock (lifecycle.holds); registered last, so a
        # construction that failed above leaves no trace.
        self._share = SHARES.join(module, self)
        self._lock: OwnerLock = self._share.lock
        self._mount_hold = CACHE_MOUNTS.hold(module)
        self._compiled_hold = COMPILED.hold(module)
        self._check_sharing(None)

    # ------------------------------------------------------------------ configuration (read-only)
    @property
    def name(self) -> str:
        return self._name

    @property
    def policy(self) -> LifecyclePolicy:
        return self._policy

    @property
    def compile_plan(self) -> CompilePlan:
        return self._plan

    @property
    def serving(self) -> ServingPolicy:
        return self._serving

    @property
    def compile_options(self) -> Mapping[str, Any]:
        """torch.compile's arguments as the host passed them (read-only)."""
        return MappingProxyType(self._compile_options)

    @property
    def cache_config(self) -> Any:
        return self._cache_config

    @property
    def backend(self) -> BackendAdapter:
        return self._backend

    @property
    def cache(self) -> CacheAdapter:
        return self._cache

    @property
    def module_id(self) -> str:
        """This lifecycle's id in the audit (12 hex digits)."""
        return self._module_id

    # ------------------------------------------------------------------ read-only views
    @property
    def state(self) -> State:
        """Where the module is now (``Loaded``, ``CacheMounted``, ``Compiled``, ``WarmedUp``);
        read without a lock.

        Example::

            if lc.state is State.LOADED:
                lc.prepare(run)
        """
        return _STATES[self._holder.state]

    @property
    def ready(self) -> bool:
        """True only while WarmedUp, serving from the lifecycle's own cache context, with every
        bucket of the plan warm: a readiness probe's answer. Reads single values, takes no lock,
        never raises; liveness must not depend on it.

        Example::

            status = 200 if lc.ready else 503   # a readiness probe
        """
        return (
            self._holder.state == _WARMED_UP
            and self._unready_for is None
            and not self._context.steered
            and self._book.all_warm
        )

    @property
    def module(self) -> nn.Module:
        """The module to call now. Mounting and compiling happen in place, so this is always the
        object passed in: a pipeline that holds it keeps working.

        Example::

            with lc.request():
                out = lc.module(x)
        """
        return self._module

    @property
    def history(self) -> tuple[TransitionRecord, ...]:
        """The latest ``HISTORY_LIMIT`` trigger attempts, oldest first.

        Example::

            for record in lc.history:
                print(record.trigger, record.outcome, record.dest)
        """
        with self._history_lock:
            records = tuple(self._history)
        return tuple(TransitionRecord._make(record) for record in records)

    def allowed_triggers(self) -> tuple[Trigger, ...]:
        """The triggers the table makes legal in the current state.

        Example::

            if Trigger.COMPILE in lc.allowed_triggers():
                lc.compile()
        """
        return allowed_triggers(self._policy, self.state)

    def can(self, trigger: Trigger) -> bool:
        """Whether the table makes ``trigger`` legal now.

        Args:
            trigger: the ``Trigger`` to check.

        Example::

            if lc.can(Trigger.INVALIDATE):
                lc.invalidate()
        """
        return destination(self._policy, self.state, trigger) is not None

    def coverage(self) -> list[dict[str, Any]]:
        """Per bucket: warmed, graphs, seconds, covered, the path serving it (compiled or eager,
        with the timings that chose it), and the first-request ratio once served; with
        ahead-of-time blocks, whether they were compiled, loaded or fell back.

        Example::

            cold = [row for row in lc.coverage() if not row["warmed"]]
        """
        rows = self._book.coverage()
        if self._compile_row:
            for row in rows:
                row.update(self._compile_row)
        return rows

    def missed_shapes(self) -> list[dict[str, Any]]:
        """Shapes that requests named and no bucket covers: ``warm_up(run, shapes=...)`` them.

        Example::

            if lc.missed_shapes():
                lc.warm_up(run, shapes=lc.missed_shapes())
        """
        return self._book.missed_shapes()

    def stats(self) -> dict[str, Any]:
        """Compiles, seconds, recompiles since warm-up, requests, cache, artifacts, buckets.

        Example::

            stats = lc.stats()
            print(stats["state"], stats["compiles"], stats["recompiles_since_warmup"])
        """
        state = self.state
        cache_summary = None
        if self._policy.cache_dit and state is not State.LOADED:
            try:
                cache_summary = self._cache.summary(self._module).as_dict()
            except Exception:  # a context being rebuilt by a request: report none, never raise
                cache_summary = None
        shapes = self._book.stats()
        shapes.update(
            on_unwarmed=self._serving.on_unwarmed,
            shared_graphs=self._shares_graphs,
            shared_dims={f"{name}[{dim}]": list(bounds) for (name, dim), bounds in self._shared_dims.items()},
        )
        return {
            "module": self._name,
            "state": state.value,
            "backend": self._backend.name,
            "compile_plan": self._plan.as_dict(),
            "compiles": self._compiles,
            "compile_s": self._compile_s,
            "warmup_s": self._warmup_s,
            "recompiles_since_warmup": self._counters.recompiles_since_warmup,
            "serving_steps": self._context.serving_steps,
            "requests": self._counters.requests,
            "warmup_covered_cached_branch": self._covered,
            "cache": cache_summary,
            "artifacts": self._artifacts.statuses() if self._artifacts is not None else None,
            "compiler": self._compiler.describe(),
            "shapes": shapes,
        }

    def __repr__(self) -> str:
        return f"ModuleLifecycle({self._name!r}, state={self.state.value}, policy={self._policy})"

    # ------------------------------------------------------------------ the Member protocol
    @property
    def _serving_steps(self) -> int | None:
        return self._context.serving_steps

    def _audit_fields(self) -> dict[str, Any]:
        """The fields every audit event of this lifecycle starts from (a distributed
        lifecycle's rank and world size come in through its commit hook). A copy."""
        return dict(self._base)

    # ------------------------------------------------------------------ audit
    def _record(
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
        with self._history_lock:
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
        # emit_checked(), inline: one call less on every transition.
        try:
            audit.emit(audit.TRANSITION_EVENT, outcome, fields)
        except Exception as exc:  # a host's sink may raise anything (OSError on a full disk)
            return exc
        return None

    def _refuse(self, error: LifecycleError, trigger: Trigger) -> LifecycleError:
        """Audit a refusal decided before any trigger fired (prepare's arguments, a busy lock)."""
        source = self.state
        lost = self._record(trigger, source, source, "refused", time.perf_counter(), error)
        if lost is not None:
            warn_unwritten(audit.TRANSITION_EVENT, self._name, lost, error)
        return error

    def _set_unready(self, trigger: Trigger | None) -> None:
        self._unready_for = trigger

    # ------------------------------------------------------------------ the machinery
    @contextmanager
    def _hold(self, trigger: Trigger) -> Iterator[None]:
        """Hold this lifecycle's lock for ``trigger``; another asyncio task of the owner's thread
        is refused (audited) instead of deadlocking the loop."""
        self._acquire(trigger)
        try:
            yield
        finally:
            self._lock.release()

    def _acquire(self, trigger: Trigger) -> None:
        try:
            self._lock.acquire()
        except LockConflict as exc:
            raise self._busy(trigger, exc) from None

    def _busy(self, trigger: Trigger, conflict: LockConflict) -> LifecycleError:
        """Another asyncio task of the owner's thread holds the lock: refused, audited."""
        error = IllegalTransitionError(
            module=self._name, state=self.state, trigger=trigger, reason=str(conflict),
            allowed=allowed_triggers(self._policy, self.state),
        )
        return self._refuse(error, trigger)

    def _transition(self, trigger: Trigger, work: Callable[[TransitionStep], None]) -> None:
        """Run ``work`` as ``trigger``: legal per the table, the state moves only if it succeeds."""
        try:
            self._lock.acquire()
        except LockConflict as exc:
            raise self._busy(trigger, exc) from None
        try:
            self._events[trigger].trigger(self._holder, attempt=TransitionStep(self, trigger, work))
        finally:
            self._lock.release()

    def _invalid(self, trigger: Trigger, message: str) -> InvalidConfigError:
        return InvalidConfigError(
            f"{self._name}: {message}", module=self._name, state=self.state, trigger=trigger
        )

    def _check_steps(self, trigger: Trigger, steps: object) -> None:
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
            raise self._invalid(trigger, f"num_inference_steps must be a positive int, got {steps!r}")

    def _check_callable(self, trigger: Trigger, run: object) -> None:
        if not callable(run):
            raise self._invalid(
                trigger,
                f"warm-up needs a callable run(module) that makes representative forward calls, "
                f"got {type(run).__name__}",
            )

    def _remaining_path(self) -> list[Trigger]:
        """The triggers from here to WarmedUp along the policy's path, read from the table."""
        path = self._policy.path
        state = self.state
        steps: list[Trigger] = []
        here = path.index(state)
        for source, dest in zip(path[here:], path[here + 1 :], strict=False):
            steps.extend(
                t for t in (Trigger.MOUNT_CACHE, Trigger.COMPILE, Trigger.WARM_UP)
                if destination(self._policy, source, t) is dest
            )
        return steps

    def _decide_sharing(self, planned: list[dict[str, Any]] | None) -> None:
        """Before a prepare walks: two or more buckets declared before the compile share dynamic
        graphs (``ServingPolicy.share_bucket_graphs``), unless compile_options sets ``dynamic``.
        Once compiled, the choice stands (a later plan cannot change the graphs)."""
        if not self._policy.compile or self.state in (State.COMPILED, State.WARMED_UP):
            return
        self._shares_graphs = bool(
            self._serving.share_bucket_graphs
            and "dynamic" not in self._compile_options
            and planned is not None
            and len(planned) >= 2
        )

    # ------------------------------------------------------------------ sharing a module
    def _compatible(self, other: object) -> bool:
        return (
            isinstance(other, ModuleLifecycle)
            and other._policy == self._policy
            and other._plan == self._plan
            and other._serving == self._serving
            and type(other._cache) is type(self._cache)
            and _same(other._cache_config, self._cache_config)
            and _same(other._compile_options, self._compile_options)
        )

    def _check_sharing(self, trigger: Trigger | None) -> None:
        """Refuse to drive a module another lifecycle drives differently.

        Lifecycles over one module share it only when they would drive it the same way (same
        policy, plan, serving policy, cache adapter, cache config and compile options); then
        their state is the module's and their requests run one at a time on its shared lock.
        Otherwise, while the other one is past Loaded, this one is refused: its outputs would
        silently be the other's (a cache-less lifecycle serving cache-dit's cached steps, say)."""
        if not self._policy.cache_dit and self._cache.is_mounted(self._module):
            raise UnsupportedModuleError(
                f"{self._name}: the module has cache-dit mounted (by the host or another lifecycle) "
                "but this lifecycle's policy disables Cache-DiT, so it would serve cached steps; "
                "unmount it first (cache_dit.disable_cache) or use LifecyclePolicy(cache_dit=True)",
                module=self._name, state=self.state, trigger=trigger,
            )
        if not self._share.shared:
            return
        for other in SHARES.others(self._module, self):
            driving = isinstance(other, ModuleLifecycle) and other.state is not State.LOADED
            if driving and isinstance(other, ModuleLifecycle) and not self._compatible(other):
                raise InvalidConfigError(
                    f"{self._name}: the module is already driven by lifecycle {other.name!r} "
                    f"(state {other.state.value}, policy {other.policy}) with another policy, plan, "
                    "cache or compile configuration; two lifecycles share a module only when "
                    f"configured alike. Call reset() on {other.name!r} first, give this lifecycle "
                    "its own module, or construct it with the same arguments",
                    module=self._name, state=self.state, trigger=trigger,
                )

    def _refuse_host_compiled(self, module: nn.Module) -> None:
        """A module the host compiled in place is refused, never compiled or mounted over:
        mounting cache-dit now would leave that code on the unwrapped path."""
        if COMPILED.holders(module):
            return  # compiled by another lifecycle: adopted at compile()
        if internals.is_compiled(module):
            raise UnsupportedModuleError(
                f"{self._name}: the module was already compiled in place by the host "
                "(module.compile() or a block's); the lifecycle compiles it itself, after mounting "
                "cache-dit. Pass it uncompiled (set module._compiled_call_impl = None), or do not "
                "manage it with a lifecycle",
                module=self._name, state=State.LOADED,
            )

    # ------------------------------------------------------------------ triggers
    def mount_cache(self) -> None:
        """Loaded -> CacheMounted: wrap the module with cache-dit (before any compile).

        Raises:
            IllegalTransitionError: outside Loaded, or with Cache-DiT off.
            UnsupportedModuleError: cache-dit cannot wrap the module.
            TransitionFailedError: the mount failed (the state stays Loaded).

        Example::

            lc.mount_cache()
            assert lc.state is State.CACHE_MOUNTED
        """
        self._transition(Trigger.MOUNT_CACHE, self._mount)

    def _mount(self, step: TransitionStep) -> None:
        module = self._module
        with self._mount_hold.acquire(self._module_id) as first:
            if not first:
                # Another lifecycle over this module mounted it (configured alike): adopt it.
                self._context.fresh()
                step.extra["adopted"] = "lifecycle"
            elif self._cache.is_mounted(module):
                # The host mounted it (e.g. with a BlockAdapter): adopt it, explicitly, with this
                # lifecycle's config; reset() unmounts it.
                self._context.fresh()
                step.extra["adopted"] = "host"
            else:
                try:
                    self._cache.check_supported(module)
                except AdapterError as exc:
                    raise translate_adapter_error(
                        exc, module=self._name, state=self.state, trigger=Trigger.MOUNT_CACHE
                    ) from exc
                self._cache.mount(module, self._cache_config)
        adopted = step.extra.get("adopted")
        step.on_undo(lambda: self._release_cache_mount(unmount=adopted is None))
        step.extra["cache_config"] = self._cache.describe_config(self._cache_config)

    def compile(self, examples: Sequence[Example] | None = None) -> None:
        """-> Compiled: compile the (cache-wrapped) module in place on the backend, as the
        ``CompilePlan`` says. Legal only after ``mount_cache`` while Cache-DiT is on.

        ``examples``: zero-argument callables that each run the module once (one per serving
        bucket), for a compiler that builds from real calls (ahead-of-time blocks). Without them
        such a compiler defers: the next ``warm_up`` passes its own calls first.
        ``prepare(run, shapes=...)`` passes one per declared bucket.

        Raises:
            IllegalTransitionError: the table does not allow ``compile`` in this state.
            InvalidConfigError: ``examples`` is not a sequence of callables.
            TransitionFailedError: the backend's compile failed (the state is unchanged).

        Example::

            lc.mount_cache()
            lc.compile(examples=[lambda: run(lc.module, shape) for shape in shapes])
            lc.warm_up(run, shapes=shapes)
        """
        if examples is not None:
            examples = self._check_examples(examples)
        self._transition(Trigger.COMPILE, lambda step: self._compile(step, examples))

    def _check_examples(self, examples: object) -> list[Example]:
        items = list(examples) if isinstance(examples, Sequence) and not isinstance(examples, str) else []
        if not items or not all(callable(example) for example in items):
            raise self._refuse(self._invalid(
                Trigger.COMPILE,
                f"compile(examples=...) takes a non-empty list of zero-argument callables that each "
                f"run the module once, got {examples!r}; e.g. "
                "[lambda: run(lc.module, shape) for shape in shapes]",
            ), Trigger.COMPILE)
        return items

    def _examples(
        self, run: WarmupRun, target: object, planned: Sequence[dict[str, Any] | None] | None
    ) -> list[Example]:
        """The warm-up callable's calls, one per bucket: what a compile from real calls builds from."""
        call_at = call_at_shape(run, target)
        shapes: list[dict[str, Any] | None] = list(planned or self._book.declared_shapes()) or [None]
        return [partial(call_at, shape) for shape in shapes]

    def _compile_for(self, run: WarmupRun, target: object, planned: list[dict[str, Any]] | None) -> None:
        """The prepare walk's compile, from the warm-up callable's calls (one per bucket)."""
        examples = self._examples(run, target, planned)
        self._transition(Trigger.COMPILE, lambda step: self._compile(step, examples))

    def _compile_kwargs(self) -> dict[str, Any]:
        """torch.compile's arguments for this compile: the validated options, plus
        ``dynamic=True`` when the buckets share graphs (never written back)."""
        return {**self._torch_options, "dynamic": True} if self._shares_graphs else dict(self._torch_options)

    def _compile(self, step: TransitionStep, examples: Sequence[Example] | None = None) -> None:
        started = time.perf_counter()
        kwargs = self._compile_kwargs()
        with self._compiled_hold.acquire(self._module_id) as first:
            if first:
                if self._artifacts is not None:
                    self._report_artifacts(self._artifacts.before_compile(self._artifact_key), step.extra)
                self._apply_compile(self._compiler.compile(self._module, examples, kwargs), step.extra)
                self._compiles += 1
            step.extra["reused_compiled"] = not first
        step.on_undo(self._release_compiled)
        self._compile_s += time.perf_counter() - started
        step.extra["compile_backend"] = str(kwargs.get("backend"))
        step.extra["compile_plan"] = self._plan.as_dict()
        if self._shares_graphs:
            step.extra["shared_graphs"] = True
        reproducible = self._backend.reproducibility(self._plan, kwargs)
        if reproducible is not None:
            step.extra["reproducible"] = reproducible

    def _apply_compile(self, report: CompileReport, extra: dict[str, Any]) -> None:
        if report.ran_examples:
            # The examples ran the host's callable: the next call starts afresh.
            self._context.fresh()
        self._compile_row = dict(report.row)
        extra.update(report.fields)

    def warm_up(self, run: WarmupRun, shapes: Any = None) -> None:
        """-> WarmedUp: call ``run(module)``; with cache-dit mounted and compile on, the warm-up
        runs under a steered cache context until it has covered the cached-step branch.

        ``shapes``: serving buckets to warm (declared now, or again): ``run(module, shape)`` makes
        one warm-up call at a shape, each bucket in its own steered context. From WarmedUp this
        adds buckets (``warm_up(run, shapes=lc.missed_shapes())``). Without ``shapes``, a
        lifecycle with declared buckets warms them all again (after ``invalidate``).

        A warm-up that fails leaves the state as it was and the buckets it was asked to warm
        cold (``ready`` is False until they are warmed).

        Args:
            run: the warm-up callable, ``run(module)`` (or ``run(module, shape)`` with ``shapes``).
            shapes: the serving buckets to warm, e.g. ``[{"height": 1024, "width": 1024}]``.

        Raises:
            IllegalTransitionError: the table does not allow ``warm_up`` in this state.
            InvalidConfigError: ``run`` is not callable, or ``shapes`` is malformed.
            TransitionFailedError: the warm-up call raised (the state is unchanged).

        Example::

            lc.warm_up(run, shapes=[{"height": 512, "width": 512}, {"height": 1024, "width": 1024}])
        """
        if shapes is None:
            # The transition takes the lock itself: a warm-up is on the per-transition cost's
            # hot path, and a plain one has no argument to refuse before it.
            walk.warm_together([self], run, self._module, None)
            return
        with self._hold(Trigger.WARM_UP):
            walk.warm_together([self], run, self._module, walk.check_shapes_audited([self], shapes))

    def _warmup_step(
        self,
        step: TransitionStep,
        run: object,
        plan: list[dict[str, Any] | None],
        inner: Callable[[], list[MemberWarmup]],
        index: int,
        target: object = None,
    ) -> None:
        """This member's part of a (joint) warm-up (``target``: what ``run`` is called with,
        the module by default): ``run`` must be callable; the declared
        buckets it is asked to warm are part of the plan from now on (cold until a warm-up
        succeeds; the implicit bucket joins the plan only when its warm-up did); ``inner`` runs
        the warm-up (or the next member's transition), and its result for this member is
        applied here."""
        self._check_callable(Trigger.WARM_UP, run)
        if plan[0] is not None or len(plan) > 1:
            self._book.declare([shape for shape in plan if shape is not None])
        if self._compiler.pending:
            # A compile deferred until real calls come: the warm-up's, one per bucket.
            examples = self._examples(cast(WarmupRun, run), self._module if target is None else target, plan)
            self._apply_compile(
                self._compiler.compile(self._module, examples, self._compile_kwargs()), step.extra
            )
        else:
            # Weights replaced since the compile (invalidate after a LoRA fuse, say): the compiled
            # code reads the new tensors from here on.
            step.extra.update(self._compiler.rebind(self._module))
        results = inner()
        # The warm-up succeeded: its result becomes this lifecycle's.
        result = results[index]
        extra = step.extra
        self._book.apply_warmup(result.buckets)
        self._shared_dims = result.shared_dims
        self._covered = result.covered
        self._warmup_s += result.seconds
        self._counters.warmed()
        extra.update(result.fields)
        if self._artifacts is not None:
            report = self._artifacts.after_warmup()
            if report is not None:
                self._report_artifacts(report, extra)

    def refresh(self, num_inference_steps: int | None = None) -> None:
        """Same state, a fresh cache-dit context from this lifecycle's config (and step count).
        Inside one's own request: the rest of that request runs in the new context.

        Args:
            num_inference_steps: the step count of the new context (default: as before).

        Raises:
            IllegalTransitionError: the table does not allow ``refresh`` in this state.
            InvalidConfigError: ``num_inference_steps`` is not a positive int.

        Example::

            with lc.request(num_inference_steps=28):
                lc.refresh(num_inference_steps=50)   # the rest runs 50 steps
        """

        def work(step: TransitionStep) -> None:
            self._check_steps(Trigger.REFRESH, num_inference_steps)
            before = self._context.refresh(num_inference_steps)
            steps = self._context.serving_steps
            step.extra["num_inference_steps"] = steps
            step.on_undo(lambda: self._context.undo_refresh(before))
            active = self._counters.active
            if active is not None:
                active.note_refresh(steps)
                step.extra["request_id"] = active.record.request_id

        self._transition(Trigger.REFRESH, work)

    def invalidate(self) -> None:
        """WarmedUp -> the state before it: weights changed, so warm up again before serving.
        Every bucket of the plan must be warmed again; compiled code is kept.

        Raises:
            IllegalTransitionError: not WarmedUp, or inside a request.

        Example::

            lc.invalidate()          # after loading new weights (a LoRA fuse, say)
            lc.prepare(run)          # warms every bucket again
        """

        def work(step: TransitionStep) -> None:
            self._covered = None
            self._book.cool()

        self._transition(Trigger.INVALIDATE, work)

    def reset(self) -> None:
        """-> Loaded: unmount cache-dit and drop compiled code; the original forward runs again.

        Raises:
            IllegalTransitionError: the table does not allow ``reset`` in this state (or inside
                a request).
            TransitionFailedError: the unmount failed (nothing changed).

        Example::

            lc.reset()
            assert lc.state is State.LOADED
        """

        def work(step: TransitionStep) -> None:
            # Unmount first: it is the step that can fail, and nothing has changed yet if it does.
            # Either is undone only by the last lifecycle holding it (a shared module).
            self._release_cache_mount()
            self._release_compiled()
            self._compiler.close()
            self._covered = None
            self._context.forget()
            self._counters.warmed()
            self._book.forget()
            self._shares_graphs = False
            self._shared_dims = {}

        self._transition(Trigger.RESET, work)

    def _release_cache_mount(self, *, unmount: bool = True) -> None:
        if self._policy.cache_dit:
            with self._mount_hold.release(self._module_id) as last:
                if unmount and last and self._cache.is_mounted(self._module):
                    self._cache.unmount(self._module)

    def _release_compiled(self) -> None:
        with self._compiled_hold.release(self._module_id) as last:
            if last:
                self._compiler.restore(self._module)
                self._compile_row = {}

    def prepare(
        self, run: WarmupRun, num_inference_steps: int | None = None, shapes: Any = None
    ) -> None:
        """Walk the legal path to WarmedUp, skipping what is done. Idempotent and thread-safe:
        concurrent callers wait on the lock, and all but the first find the work done.

        ``shapes``: the declared serving buckets, e.g. ``[{"height": 1024, "width": 1024}]``;
        ``run(module, shape)`` then makes one warm-up call at a shape. Already WarmedUp, the
        buckets not warm yet are warmed (WarmedUp -> WarmedUp).

        Args:
            run: the warm-up callable, ``run(module)`` (or ``run(module, shape)`` with ``shapes``).
            num_inference_steps: the serving step count of the cache context.
            shapes: the declared serving buckets.

        Raises:
            InvalidConfigError: a bad argument (audited, nothing moved).
            IllegalTransitionError: a trigger the table refuses on the way.
            TransitionFailedError: a transition failed (the state is where that one started).

        Example::

            lc.prepare(lambda module: module(torch.zeros(1, 8)), num_inference_steps=28)
            assert lc.ready
        """
        with self._hold(Trigger.WARM_UP):
            walk.prepare([self], run, self._module, num_inference_steps, shapes)

    async def aprepare(
        self, run: WarmupRun, num_inference_steps: int | None = None, shapes: Any = None
    ) -> None:
        """``prepare`` in a worker thread, so an event loop keeps serving meanwhile.

        Takes ``prepare``'s arguments and raises its errors.

        Example::

            await lc.aprepare(lambda module: module(torch.zeros(1, 8)))
        """
        import asyncio

        await asyncio.to_thread(self.prepare, run, num_inference_steps, shapes)

    # ------------------------------------------------------------------ artifacts
    def _artifact_key(self) -> ArtifactKey:
        return build_key(
            self._module,
            compile_options=self._compile_kwargs(),
            cache_config=self._cache_config,
            cache_version=_cache_version(self._cache) if self._policy.cache_dit else None,
            policy={**self._policy.as_dict(), "compile_plan": self._plan.as_dict()},
        )

    def _report_artifacts(self, report: ArtifactReport, extra: dict[str, Any]) -> None:
        """Audit one load or save; stale, corrupt and failed are warnings, never errors."""
        extra[f"artifacts_{report.action}"] = report.status
        outcome = "refused" if report.problem else "ok"
        lost = emit_checked("lifecycle.artifacts", outcome, {**self._base, **report.as_dict()})
        if lost is not None:
            warn_unwritten("lifecycle.artifacts", self._name, lost)

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
        - One request at a time per lifecycle: the lock is held for the whole block; another
          asyncio task on the same thread is refused at once (it could only block the loop).
        - Inside the block the owner may call ``refresh()``; any other trigger and a nested
          ``request()`` raise ``IllegalTransitionError`` at once.
        - An exception from the block is recorded (outcome ``failed``) and propagates unchanged.
        - ``new_graphs`` reads dynamo's process-wide graph count: graphs compiled meanwhile for
          another module count too.
        - ``shape``: the request's shape as the host's call arguments; without it, each
          transformer call is checked against the input sizes warm-up saw. A shape no warm-up
          covered is a ``lifecycle.shape_miss``, handled by ``on_unwarmed`` (this request) or the
          ``ServingPolicy``: ``"eager"`` runs this module's eager path, ``"fail"`` raises
          ``UnwarmedShapeError`` before the transformer runs, ``"compile"`` compiles inline.

        Args:
            num_inference_steps: this request's step count (default: the lifecycle's).
            request_id: the id in the audit and the record (default: a generated one).
            shape: the request's shape, e.g. ``{"height": 1024, "width": 1024}``.
            on_unwarmed: ``"eager"``, ``"fail"`` or ``"compile"`` for this request.

        Raises:
            IllegalTransitionError: not WarmedUp, or a nested request.
            InvalidConfigError: a bad argument.
            UnwarmedShapeError: ``shape`` is not warm and ``on_unwarmed`` is ``"fail"``.

        Example::

            with lc.request(num_inference_steps=28, request_id="r-17") as req:
                out = run(lc.module)
            print(req.cached_steps, req.new_graphs, req.duration_ms)
        """
        with RequestScope(
            [self], steps=num_inference_steps, request_id=request_id, shape=shape, on_unwarmed=on_unwarmed
        ) as records:
            yield records[0]


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
