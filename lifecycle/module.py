"""``ModuleLifecycle``: one transformer's walk Loaded -> CacheMounted -> Compiled -> WarmedUp.

Every trigger goes through ``_transition``: check the table, run the work *before* the state
changes (transitions has no rollback), then move the machine and write one audit event. A
refused or failed trigger leaves the state as it was.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from torch import nn

from adapters import (
    BackendAdapter,
    BackendUnavailable,
    CacheDitAdapter,
    InvalidOptions,
    UnsupportedForCache,
    get_backend,
)
from adapters.artifacts import ArtifactReport, ArtifactStore, build_key, inductor_cache_misses
from lifecycle import audit
from lifecycle.errors import (
    BackendUnavailableError,
    IllegalTransitionError,
    InvalidConfigError,
    LifecycleError,
    TransitionFailedError,
    UnsupportedModuleError,
)
from lifecycle.holds import CACHE_MOUNTS, COMPILED
from lifecycle.machine import attach, fire
from states import (
    LifecyclePolicy,
    State,
    Trigger,
    allowed_triggers,
    destination,
    explain_illegal,
)

WarmupRun = Callable[[nn.Module], object]

# The warm-up callable runs at most this many times while cache-dit's context is steered
# towards its cached branch; a warm-up that makes one denoising step needs three.
MAX_WARMUP_RUNS = 4

class WarmupCoverageWarning(UserWarning):
    """Warm-up could not reach cache-dit's cached-step branch: the first real request may compile."""


@dataclass(frozen=True)
class TransitionRecord:
    """One trigger attempt, as kept in ``ModuleLifecycle.history``."""

    seq: int
    trigger: Trigger
    source: State
    dest: State
    outcome: str  # "ok" | "refused" | "failed"
    duration_ms: float
    error: str | None = None


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
    outcome: str = "running"


@dataclass
class _Attempt:
    """Mutable scratch for one transition: extra audit fields the work adds."""

    extra: dict[str, Any] = field(default_factory=dict)


class ModuleLifecycle:
    """An explicit, audited lifecycle for one transformer module.

    Thread-safe: every trigger and every request holds the lifecycle's re-entrant lock, so
    transitions and requests on one lifecycle run one at a time; other lifecycles are not
    blocked. Inside its own ``request`` a thread may call ``refresh`` (the lock is re-entrant):
    it starts a new cache context for the rest of that request. Any other trigger, or a nested
    ``request``, from inside a request is refused at once (it could only wait on itself).
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
        cache_adapter: Any = None,
        artifact_dir: str | os.PathLike[str] | None = None,
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
        self._lock = threading.RLock()
        self._seq = 0
        self._history: list[TransitionRecord] = []
        self._holder = attach(policy, self)
        try:
            self.backend: BackendAdapter = get_backend(backend)
        except BackendUnavailable as exc:
            raise BackendUnavailableError(f"{name}: {exc}", module=name, state=State.LOADED) from exc
        except InvalidOptions as exc:
            raise InvalidConfigError(f"{name}: {exc}", module=name, state=State.LOADED) from exc
        self.cache = cache_adapter if cache_adapter is not None else CacheDitAdapter()
        try:
            self.compile_options = self.backend.validate_options(compile_options or {})
            self.cache_config = self.cache.validate_config(cache_config) if policy.cache_dit else None
        except InvalidOptions as exc:
            raise InvalidConfigError(f"{name}: {exc}", module=name, state=State.LOADED) from exc
        self._serving_steps: int | None = getattr(self.cache_config, "num_inference_steps", None)
        self._compiles = 0
        self._compile_s = 0.0
        self._warmup_s = 0.0
        self._recompiles_since_warmup = 0
        self._requests = 0
        # The request being served, set only while its block runs (under the lock, so a non-None
        # value seen while holding the lock belongs to this very thread).
        self._active_request: RequestRecord | None = None
        self._warmup_covered: bool | None = None
        # Compile artifacts (adapters/artifacts.py): loaded before compile, saved at WarmedUp.
        if artifact_dir is not None and not isinstance(artifact_dir, (str, os.PathLike)):
            raise InvalidConfigError(
                f"{name}: artifact_dir must be a directory path (str or PathLike), got "
                f"{type(artifact_dir).__name__}", module=name, state=State.LOADED,
            )
        self._artifacts = ArtifactStore(artifact_dir) if artifact_dir is not None and policy.compile else None
        self._artifact_reports: dict[str, ArtifactReport] = {}
        self._artifact_key_now: Any = None
        self._misses_at_compile = 0

    # ------------------------------------------------------------------ read-only views
    @property
    def state(self) -> State:
        return State(self._holder.state)

    @property
    def module(self) -> nn.Module:
        """The module to call now. Mounting and compiling happen in place, so this is always the
        object passed in: a pipeline that holds it keeps working."""
        return self._module

    @property
    def history(self) -> tuple[TransitionRecord, ...]:
        with self._lock:
            return tuple(self._history)

    def allowed_triggers(self) -> tuple[Trigger, ...]:
        return allowed_triggers(self.policy, self.state)

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
                "warmup_s": self._warmup_s,
                "recompiles_since_warmup": self._recompiles_since_warmup,
                "requests": self._requests,
                "warmup_covered_cached_branch": self._warmup_covered,
                "cache": cache_summary,
                "artifacts": {k: r.status for k, r in self._artifact_reports.items()} or None,
            }

    def __repr__(self) -> str:
        return f"ModuleLifecycle({self.name!r}, state={self.state.value}, policy={self.policy})"

    # ------------------------------------------------------------------ the machinery
    def _audit_base(self) -> dict[str, Any]:
        return {
            "module": self.name,
            "module_id": self.module_id,
            "backend": self.backend.name,
            "policy": self.policy.as_dict(),
        }

    def _record(
        self,
        trigger: Trigger,
        source: State,
        dest: State,
        outcome: str,
        started: float,
        error: BaseException | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self._seq += 1
        duration_ms = (time.perf_counter() - started) * 1000.0
        error_text = f"{type(error).__name__}: {error}" if error is not None else None
        self._history.append(
            TransitionRecord(self._seq, trigger, source, dest, outcome, duration_ms, error_text)
        )
        fields = {
            **self._audit_base(),
            "trigger": trigger.value,
            "source": source.value,
            "dest": dest.value,
            "outcome": outcome,
            "duration_ms": round(duration_ms, 3),
            "seq": self._seq,
        }
        if extra:
            fields.update(extra)
        if error is not None:
            fields["error"] = error_text
            fields["error_type"] = type(error).__name__
        audit.emit(audit.TRANSITION_EVENT, outcome, fields)

    def _refuse(self, trigger: Trigger, error: LifecycleError, started: float) -> LifecycleError:
        source = self.state
        self._record(trigger, source, source, "refused", started, error)
        return error

    @contextmanager
    def _transition(self, trigger: Trigger) -> Iterator[_Attempt]:
        """Hold the lock, check legality, run the body, then move the state and audit."""
        started = time.perf_counter()
        with self._lock:
            source = self.state
            dest = destination(self.policy, source, trigger)
            if dest is None:
                error = IllegalTransitionError(
                    module=self.name,
                    state=source,
                    trigger=trigger,
                    reason=explain_illegal(self.policy, source, trigger),
                    allowed=allowed_triggers(self.policy, source),
                )
                raise self._refuse(trigger, error, started)
            if self._active_request is not None and trigger is not Trigger.REFRESH:
                # Same thread, inside its own request: waiting would deadlock, and a reset or
                # invalidate would change the module under the request.
                error = IllegalTransitionError(
                    module=self.name,
                    state=source,
                    trigger=trigger,
                    reason=f"request {self._active_request.request_id!r} is running in this thread; "
                    f"call {trigger.value}() after its block ends",
                    allowed=(Trigger.REFRESH,),
                )
                raise self._refuse(trigger, error, started)
            attempt = _Attempt()
            try:
                yield attempt
            except (UnsupportedModuleError, InvalidConfigError) as exc:
                # Refused before any work was done.
                raise self._refuse(trigger, exc, started) from exc.__cause__
            except BaseException as exc:
                cause = exc.__cause__ if isinstance(exc, TransitionFailedError) and exc.__cause__ else exc
                self._record(trigger, source, source, "failed", started, cause, attempt.extra)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                raise TransitionFailedError(
                    f"{self.name}: {trigger.value} failed in state {source.value} "
                    f"({type(cause).__name__}: {cause}); the state stays {source.value} and the "
                    f"module is usable. {_fix_hint(trigger)}",
                    module=self.name,
                    state=source,
                    trigger=trigger,
                ) from cause
            fire(self._holder, trigger)
            self._record(trigger, source, dest, "ok", started, None, attempt.extra)

    def _invalid(self, trigger: Trigger, message: str) -> InvalidConfigError:
        return InvalidConfigError(
            f"{self.name}: {message}", module=self.name, state=self.state, trigger=trigger
        )

    def _check_steps(self, trigger: Trigger, steps: int | None) -> None:
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
            raise self._invalid(trigger, f"num_inference_steps must be a positive int, got {steps!r}")

    def _check_callable(self, trigger: Trigger, run: object) -> None:
        if not callable(run):
            raise self._invalid(
                trigger,
                f"warm-up needs a callable run(module) that makes representative forward calls, "
                f"got {type(run).__name__}",
            )

    # ------------------------------------------------------------------ triggers
    def mount_cache(self) -> None:
        """Loaded -> CacheMounted: wrap the module with cache-dit (before any compile)."""
        with self._transition(Trigger.MOUNT_CACHE) as attempt:
            with CACHE_MOUNTS.acquire(self._module, self.module_id) as first:
                if not first or self.cache.is_mounted(self._module):
                    # Mounted by another lifecycle or the host: adopt it with this config.
                    self.cache.refresh(self._module, self.cache_config, self._serving_steps)
                    attempt.extra["adopted"] = True
                else:
                    try:
                        self.cache.check_supported(self._module)
                    except UnsupportedForCache as exc:
                        raise UnsupportedModuleError(
                            f"{self.name}: {exc}", module=self.name, state=self.state,
                            trigger=Trigger.MOUNT_CACHE,
                        ) from exc
                    self.cache.mount(self._module, self.cache_config)
            attempt.extra["cache_config"] = self.cache.describe_config(self.cache_config)

    def compile(self) -> None:
        """-> Compiled: compile the (cache-wrapped) module in place on the backend."""
        with self._transition(Trigger.COMPILE) as attempt:
            started = time.perf_counter()
            with COMPILED.acquire(self._module, self.module_id) as first:
                if first:
                    self._load_artifacts(attempt)
                    self.backend.compile(self._module, self.compile_options)
                    self._compiles += 1
                attempt.extra["reused_compiled"] = not first
            self._compile_s += time.perf_counter() - started
            attempt.extra["compile_backend"] = str(self.compile_options.get("backend"))
            reproducible = self.backend.reproducibility(self.compile_options)
            if reproducible is not None:  # compile_options={"reproducible": True}
                attempt.extra["reproducible"] = reproducible

    def warm_up(self, run: WarmupRun) -> None:
        """-> WarmedUp: call ``run(module)``; with cache-dit mounted and compile on, the warm-up
        runs under a steered cache context until it has covered the cached-step branch."""
        with self._transition(Trigger.WARM_UP) as attempt:
            self._check_callable(Trigger.WARM_UP, run)
            self._run_warmup([self], lambda: run(self._module), attempt)

    def refresh(self, num_inference_steps: int | None = None) -> None:
        """Same state, fresh cache-dit context from this lifecycle's config (and step count)."""
        with self._transition(Trigger.REFRESH) as attempt:
            self._check_steps(Trigger.REFRESH, num_inference_steps)
            steps = num_inference_steps if num_inference_steps is not None else self._serving_steps
            self.cache.refresh(self._module, self.cache_config, steps)
            self._serving_steps = steps
            attempt.extra["num_inference_steps"] = steps
            if self._active_request is not None:
                # Refresh inside one's own request: the rest of it runs in the new context.
                self._active_request.num_inference_steps = steps
                attempt.extra["request_id"] = self._active_request.request_id

    def invalidate(self) -> None:
        """WarmedUp -> the state before it: weights changed, so warm up again before serving."""
        with self._transition(Trigger.INVALIDATE):
            self._warmup_covered = None

    def reset(self) -> None:
        """-> Loaded: unmount cache-dit and drop compiled code; the original forward runs again."""
        with self._transition(Trigger.RESET):
            # Unmount first: it is the step that can fail, and nothing has changed yet if it does.
            # Either is undone only by the last lifecycle holding it (a shared module).
            self._release_cache_mount()
            self._release_compiled()
            self._warmup_covered = None
            self._recompiles_since_warmup = 0

    def _release_cache_mount(self, *, unmount: bool = True) -> None:
        if self.policy.cache_dit:
            with CACHE_MOUNTS.release(self._module, self.module_id) as last:
                if unmount and last and self.cache.is_mounted(self._module):
                    self.cache.unmount(self._module)

    def _release_compiled(self) -> None:
        with COMPILED.release(self._module, self.module_id) as last:
            if last:
                self.backend.decompile(self._module)

    def prepare(self, run: WarmupRun, num_inference_steps: int | None = None) -> None:
        """Walk the legal path to WarmedUp, skipping what is done. Idempotent and thread-safe:
        concurrent callers wait on the lock, and all but the first find the work done."""
        with self._lock:
            if self.state is not State.WARMED_UP:
                self._check_callable(Trigger.WARM_UP, run)
            self._check_steps(Trigger.REFRESH, num_inference_steps)
            if num_inference_steps is not None:
                self._serving_steps = num_inference_steps
            for trigger in self._remaining_path():
                if trigger is Trigger.WARM_UP:
                    self.warm_up(run)
                else:
                    getattr(self, trigger.value)()

    async def aprepare(self, run: WarmupRun, num_inference_steps: int | None = None) -> None:
        """``prepare`` in a worker thread, so an event loop keeps serving meanwhile."""
        import asyncio

        await asyncio.to_thread(self.prepare, run, num_inference_steps)

    def _remaining_path(self) -> list[Trigger]:
        path = self.policy.path
        if self.state not in path:
            raise IllegalTransitionError(
                module=self.name, state=self.state, trigger="prepare",
                reason="the state is not on this policy's path; call reset() first",
                allowed=self.allowed_triggers(),
            )
        steps = []
        here = path.index(self.state)
        for source, dest in zip(path[here:], path[here + 1 :], strict=False):
            steps.extend(
                t for t in (Trigger.MOUNT_CACHE, Trigger.COMPILE, Trigger.WARM_UP)
                if destination(self.policy, source, t) is dest
            )
        return steps

    # ------------------------------------------------------------------ warm-up internals
    @contextmanager
    def _warmup_context(self) -> Iterator[Callable[[], bool]]:
        """Steer cache-dit's context for warm-up, then restore this lifecycle's serving context.

        Yields ``covered()``: whether warm-up has reached the cached-step branch (always True
        when there is nothing to cover: no cache, or no compile whose graphs could be missed).
        """
        steer = self.policy.cache_dit and self.policy.compile
        if steer:
            self.cache.refresh_for_warmup(self._module, self.cache_config)
        try:
            yield (lambda: self.cache.warmup_covered(self._module)) if steer else (lambda: True)
        finally:
            if self.policy.cache_dit:
                # A warm-up is an earlier request: never let its context serve the first real one.
                refreshed = time.perf_counter()
                self.cache.refresh(self._module, self.cache_config, self._serving_steps)
                self._audit_refresh("after_warmup", self._serving_steps, refreshed)

    @staticmethod
    def _run_warmup(
        members: list[ModuleLifecycle], call: Callable[[], object], attempt: _Attempt | None
    ) -> None:
        """Enter each member's warm-up context, call until all are covered, audit coverage."""
        from contextlib import ExitStack

        started = time.perf_counter()
        with ExitStack() as stack:
            covered = [stack.enter_context(member._warmup_context()) for member in members]
            runs = 0
            while True:
                call()
                runs += 1
                done = [check() for check in covered]
                if all(done) or runs >= MAX_WARMUP_RUNS:
                    break
            for member, ok in zip(members, done, strict=False):
                member.backend.synchronize()
                member._warmup_covered = ok
                if not ok:
                    member._warn_uncovered(runs)
        elapsed = time.perf_counter() - started
        for member in members:
            member._save_artifacts(attempt)
            member._warmup_s += elapsed
            member._recompiles_since_warmup = 0
        if attempt is not None:
            attempt.extra["warmup_runs"] = runs
            attempt.extra["cached_branch_covered"] = all(done)

    # ------------------------------------------------------------------ compile artifacts
    def _artifact_key(self) -> Any:
        return build_key(
            self._module,
            compile_options=self.compile_options,
            cache_config=self.cache_config,
            cache_version=self.cache.version() if self.policy.cache_dit else None,
            policy=self.policy.as_dict(),
        )

    def _report_artifacts(self, report: ArtifactReport, attempt: _Attempt | None) -> None:
        """Audit one load or save; stale, corrupt and failed are warnings, never errors."""
        self._artifact_reports[report.action] = report
        if attempt is not None:
            attempt.extra[f"artifacts_{report.action}"] = report.status
        outcome = "refused" if report.problem else "ok"
        audit.emit("lifecycle.artifacts", outcome, {**self._audit_base(), **report.as_dict()})

    def _load_artifacts(self, attempt: _Attempt | None) -> None:
        """Before compiling: put saved graphs into torch's caches (never raises)."""
        self._artifact_reports.pop("save", None)
        self._artifact_key_now = None
        self._misses_at_compile = inductor_cache_misses()
        if self._artifacts is not None:
            # Keyed once, here: every start builds it at this same point (mounted, before any
            # call), and the save at WarmedUp reuses it, whatever the calls changed meanwhile.
            try:
                self._artifact_key_now = self._artifact_key()
            except Exception as exc:  # artifacts are an optimisation: never fail the compile
                self._report_artifacts(
                    ArtifactReport("load", "failed", None, f"cannot build the key: {exc!r}"), attempt
                )
                return
            self._report_artifacts(self._artifacts.load(self._artifact_key_now), attempt)

    def _save_artifacts(self, attempt: _Attempt | None) -> None:
        """At WarmedUp: save what was compiled, unless the loaded artifacts already held it all."""
        if self._artifacts is None or "save" in self._artifact_reports:
            return
        loaded = self._artifact_reports.get("load")
        compiled_new = inductor_cache_misses() > self._misses_at_compile
        if loaded is not None and loaded.status == "loaded" and not compiled_new:
            return
        if self._artifact_key_now is None:
            return  # no key: the load already reported why
        self._report_artifacts(self._artifacts.save(self._artifact_key_now), attempt)

    def _warn_uncovered(self, runs: int) -> None:
        message = (
            f"{self.name}: warm-up did not reach cache-dit's cached-step branch after {runs} "
            "run(s) of the warm-up callable; the first real request may compile new graphs. "
            "Make the warm-up call the transformer at least once per run, with the shapes of "
            "real requests."
        )
        warnings.warn(message, WarmupCoverageWarning, stacklevel=4)
        audit.emit(
            audit.WARMUP_COVERAGE_EVENT,
            "refused",
            {**self._audit_base(), "covered": False, "warmup_runs": runs, "message": message},
        )

    # ------------------------------------------------------------------ serving
    @contextmanager
    def request(
        self, num_inference_steps: int | None = None, request_id: str | None = None
    ) -> Iterator[RequestRecord]:
        """Serve one request from a fresh cache context; the yielded record is filled in on exit.

        - Legal only in WarmedUp; elsewhere ``IllegalTransitionError`` naming ``prepare``.
        - The context is rebuilt from this lifecycle's own cache config (and
          ``num_inference_steps`` when given), so identical requests give identical outputs and
          nothing of the warm-up or an earlier request leaks in.
        - One request at a time per lifecycle: the lock is held for the whole block, so a
          request or transition from another thread waits for it to end.
        - Inside the block the same thread may call ``refresh()``: the rest of the request runs
          in the new context, ``cached_steps`` counts from there, and a step count given to it
          becomes the serving default, as outside a request. Any other trigger and a nested
          ``request()`` raise ``IllegalTransitionError`` at once (they could only wait on this
          thread).
        - An exception from the block is recorded (outcome ``failed``) and propagates unchanged;
          the state stays WarmedUp.
        - ``new_graphs`` reads dynamo's process-wide graph count: graphs compiled meanwhile for
          another module (e.g. the other Wan 2.2 transformer in the same pipeline call) count too.
        """
        with self._lock:
            try:
                record = self._begin_request(num_inference_steps, request_id)
            except LifecycleError as exc:
                self._refuse_request(num_inference_steps, request_id, exc)
                raise
            started = time.perf_counter()
            graphs_before = self.backend.graph_count()
            error: BaseException | None = None
            self._active_request = record
            try:
                with structlog.contextvars.bound_contextvars(request_id=record.request_id):
                    yield record
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._active_request = None
                self.backend.synchronize()
                self._end_request(record, started, graphs_before, error)

    def _begin_request(self, steps: int | None, request_id: str | None) -> RequestRecord:
        if self._active_request is not None:
            raise IllegalTransitionError(
                module=self.name,
                state=self.state,
                trigger="request",
                reason=f"request {self._active_request.request_id!r} is already running in this "
                "thread and requests do not nest (one cache context serves one request)",
                allowed=(Trigger.REFRESH,),
            )
        if self.state is not State.WARMED_UP:
            raise IllegalTransitionError(
                module=self.name,
                state=self.state,
                trigger="request",
                reason="requests are served only in WarmedUp; call prepare(run) first",
                allowed=self.allowed_triggers(),
            )
        self._check_steps(Trigger.REFRESH, steps)
        record = RequestRecord(request_id or uuid.uuid4().hex[:12], steps or self._serving_steps)
        if self.policy.cache_dit:
            try:
                self.cache.refresh(self._module, self.cache_config, record.num_inference_steps)
            except Exception as exc:
                raise TransitionFailedError(
                    f"{self.name}: the request could not start: refreshing cache-dit's context failed "
                    f"({type(exc).__name__}: {exc}); the state stays WarmedUp and no request ran. "
                    "Call refresh() to retry, or reset() and prepare(run) again.",
                    module=self.name,
                    state=self.state,
                    trigger="request",
                ) from exc
        return record

    def _audit_refresh(self, reason: str, steps: int | None, started: float) -> None:
        # Debug level, for operators who want to see it; the refresh trigger has its own
        # transition event, and every lifecycle.request implies a refresh on entry.
        audit.logger().debug(
            audit.CACHE_REFRESH_EVENT,
            **self._audit_base(),
            reason=reason,
            num_inference_steps=steps,
            duration_ms=round((time.perf_counter() - started) * 1000.0, 3),
        )

    def _refuse_request(self, steps: int | None, request_id: str | None, error: BaseException) -> None:
        # Refused: not legal now or bad arguments; failed: legal, but the context refresh raised.
        outcome = "failed" if isinstance(error, TransitionFailedError) else "refused"
        audit.emit(
            audit.REQUEST_EVENT,
            outcome,
            {
                "module": self.name,
                "module_id": self.module_id,
                "request_id": request_id,
                "num_inference_steps": steps,
                "cached_steps": 0,
                "new_graphs": 0,
                "duration_ms": 0.0,
                "outcome": outcome,
                "state": self.state.value,
                "error": f"{type(error).__name__}: {error}",
            },
        )

    def _end_request(
        self, record: RequestRecord, started: float, graphs_before: int, error: BaseException | None
    ) -> None:
        record.duration_ms = (time.perf_counter() - started) * 1000.0
        record.new_graphs = max(0, self.backend.graph_count() - graphs_before)
        if self.policy.cache_dit:
            summary = self.cache.summary(self._module)
            record.cached_steps = summary.cached_steps
            record.cfg_cached_steps = summary.cfg_cached_steps
        record.outcome = "ok" if error is None else "failed"
        self._requests += 1
        fields: dict[str, Any] = {
            "module": self.name,
            "module_id": self.module_id,
            "request_id": record.request_id,
            "num_inference_steps": record.num_inference_steps,
            "cached_steps": record.cached_steps,
            "cfg_cached_steps": record.cfg_cached_steps,
            "new_graphs": record.new_graphs,
            "duration_ms": round(record.duration_ms, 3),
            "outcome": record.outcome,
            "state": self.state.value,
        }
        if error is not None:
            fields["error"] = f"{type(error).__name__}: {error}"
        audit.emit(audit.REQUEST_EVENT, record.outcome, fields)
        if record.new_graphs and self.policy.compile:
            self._recompiles_since_warmup += record.new_graphs
            audit.emit(
                audit.RECOMPILE_EVENT,
                "refused",
                {
                    **self._audit_base(),
                    "request_id": record.request_id,
                    "new_graphs": record.new_graphs,
                    "recompiles_since_warmup": self._recompiles_since_warmup,
                },
            )


def _fix_hint(trigger: Trigger) -> str:
    hints = {
        Trigger.MOUNT_CACHE: "Check the cache_config, then call mount_cache() again.",
        Trigger.COMPILE: "Check compile_options, then call compile() again, or use "
        "LifecyclePolicy(compile=False).",
        Trigger.WARM_UP: "Fix the warm-up callable (or the compile it triggered), then call "
        "warm_up(run) or prepare(run) again; reset() returns the module to eager.",
        Trigger.REFRESH: "Call refresh() again with a valid step count.",
        Trigger.INVALIDATE: "Call invalidate() again.",
        Trigger.RESET: "Call reset() again once the cause is fixed.",
    }
    return hints[trigger]
