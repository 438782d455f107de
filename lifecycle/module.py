"""``ModuleLifecycle``: one transformer's walk Loaded -> CacheMounted -> Compiled -> WarmedUp.

The lifecycle owns the work of each trigger and applies what its helpers return; each helper
owns its own fields:
- ``lifecycle.config`` checks the constructor's arguments (a ``LifecycleConfig``);
- ``lifecycle.runner`` fires the triggers: state, legality, commit, audit, history;
- ``lifecycle.serving_state`` holds what warm-ups and requests leave behind; the warm-up
  (``lifecycle.warmup``) and the request scope (``lifecycle.serving``) return their results to
  the lifecycle, which applies them there;
- ``prepare`` walks the states table's remaining path (``states.remaining_path``) through the
  lifecycle's own steps; a pipeline's walk (``lifecycle.walk``) calls the same steps.
"""

from __future__ import annotations

import os
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from types import MappingProxyType
from typing import Any, cast

from torch import nn

from adapters import BackendAdapter
from adapters.artifact_session import ArtifactSession
from adapters.artifacts import ArtifactKey, ArtifactReport, build_key
from adapters.compiler import Compiler, CompileReport, Example
from adapters.errors import AdapterError
from adapters.protocols import CacheAdapter
from lifecycle.audit import signals
from lifecycle.commit import CommitHook, LocalCommit
from lifecycle.config import CompilePlan, ServingPolicy, check_lifecycle_arguments, check_steps
from lifecycle.context import CacheContext
from lifecycle.errors import (
    InvalidConfigError,
    LifecycleError,
    UnsupportedModuleError,
    translate_adapter_error,
)
from lifecycle.holds import CACHE_MOUNTS, COMPILED, DRIVERS
from lifecycle.locking import OwnerLock
from lifecycle.preparing import AsyncPrepare, check_callable, check_prepare_arguments, check_shapes_audited
from lifecycle.record import TransitionRecord, emit_checked, warn_unwritten
from lifecycle.runner import HISTORY_LIMIT, TransitionRunner, TransitionStep
from lifecycle.serving import RequestRecord, RequestScope, refuse_trigger_inside_request
from lifecycle.serving_state import RequestResult, ServingState
from lifecycle.warmup import (
    MAX_WARMUP_RUNS,
    Buckets,
    MemberWarmup,
    WarmupCoverageWarning,
    buckets_to_warm,
    call_at_shape,
    run_warmup,
)
from states import LifecyclePolicy, State, Trigger, allowed_triggers, destination, remaining_path

WarmupRun = Callable[..., object]

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

_WARMED_UP = State.WARMED_UP.value
_LOADED = State.LOADED
_RESET = Trigger.RESET


class ModuleLifecycle(AsyncPrepare):
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
        artifact_dir: keep compile artifacts there and load them on the next start: a local
            path (a node disk, a shared volume) or an fsspec URL (``s3://bucket/prefix``).
        artifact_storage_options: fsspec's options for a URL (``endpoint_url``, credentials).
        artifact_signing_key: bytes: manifests are signed with it and must verify to be loaded.
        cache_dir: where packages fetched from a remote store are kept on this node.
        build_wait_s: how long to wait for another replica's build of the same packages.

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
        artifact_storage_options: Mapping[str, Any] | None = None,
        artifact_signing_key: bytes | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        build_wait_s: float = 600.0,
        commit: CommitHook | None = None,
    ) -> None:
        config = check_lifecycle_arguments(
            module, name, policy, backend, cache_config, compile_options,
            compile_plan=compile_plan, serving=serving, cache_adapter=cache_adapter,
            artifact_dir=artifact_dir, artifact_storage_options=artifact_storage_options,
            artifact_signing_key=artifact_signing_key, cache_dir=cache_dir, build_wait_s=build_wait_s,
        )
        policy, compile_plan = config.policy, config.compile_plan
        self._config = config
        self._name = name
        self._policy = policy
        self._plan = compile_plan
        self._serving = config.serving
        self._module_id = uuid.uuid4().hex[:12]
        self._module = module
        self._backend: BackendAdapter = config.backend
        self._cache: CacheAdapter = config.cache
        self._compile_options = config.compile_options
        self._torch_options = config.torch_options
        self._cache_config: Any = config.cache_config
        try:
            self._artifacts = (
                ArtifactSession(config.store) if config.store is not None and policy.compile else None
            )
            # The one compiler this lifecycle calls, picked and configured by the backend.
            self._compiler: Compiler = self._backend.compiler(
                compile_plan if policy.compile else CompilePlan(), self._torch_options, config.store,
                build_wait_s=config.build_wait_s,
            )
            # What the compiler keeps for this process only goes with the lifecycle.
            weakref.finalize(self, self._compiler.close)
        except AdapterError as exc:
            raise translate_adapter_error(exc, module=name, state=State.LOADED) from exc
        commit = commit if commit is not None else LocalCommit()
        self._base: dict[str, Any] = {
            "module": name,
            "module_id": self._module_id,
            "backend": self._backend.name,
            "policy": policy.as_dict(),
            **commit.audit_fields(),
        }
        self._context = CacheContext(
            module, self._cache, self._cache_config, enabled=policy.cache_dit, base_fields=self._base
        )
        self._serving_state = ServingState(self._context)
        # What the latest compile reports on each coverage row (e.g. packages loaded or built).
        self._compile_row: dict[str, Any] = {}
        self._compiles = 0
        self._compile_s = 0.0
        # Lifecycles over one module share its lock (lifecycle.holds); registered last, so a
        # construction that failed above leaves no trace.
        self._drivers = DRIVERS.join(module, self)
        self._lock: OwnerLock = self._drivers.lock
        self._runner = TransitionRunner(name, policy, self._base, commit, self._lock, self._guard)
        self._mount_hold = CACHE_MOUNTS.hold(module)
        self._compiled_hold = COMPILED.hold(module)
        self._check_drivers(None)

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
        return self._runner.state

    @property
    def ready(self) -> bool:
        """True only while WarmedUp, serving from the lifecycle's own cache context, with every
        bucket of the plan warm: a readiness probe's answer. Reads single values, takes no lock,
        never raises; liveness must not depend on it.

        Example::

            status = 200 if lc.ready else 503   # a readiness probe
        """
        return (
            self._runner.holder.state == _WARMED_UP
            and self._runner.unready_for is None
            and not self._context.steered
            and self._serving_state.book.all_warm
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
        return self._runner.history()

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
        rows = self._serving_state.book.coverage()
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
        return self._serving_state.book.missed_shapes()

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
        serving = self._serving_state
        shapes = {**serving.stats(), "on_unwarmed": self._serving.on_unwarmed}
        return {
            "module": self._name,
            "state": state.value,
            "backend": self._backend.name,
            "compile_plan": self._plan.as_dict(),
            "compiles": self._compiles,
            "compile_s": self._compile_s,
            "warmup_s": serving.warmup_s,
            "recompiles_since_warmup": serving.recompiles_since_warmup,
            "serving_steps": self._context.serving_steps,
            "requests": serving.requests,
            "warmup_covered_cached_branch": serving.covered,
            "cache": cache_summary,
            "artifacts": self._artifacts.statuses() if self._artifacts is not None else None,
            "compiler": self._compiler.describe(),
            "shapes": shapes,
        }

    def __repr__(self) -> str:
        return f"ModuleLifecycle({self._name!r}, state={self.state.value}, policy={self._policy})"

    # ------------------------------------------------------------------ the Member protocol
    @property
    def _shares_graphs(self) -> bool:
        return self._serving_state.shares_graphs

    def _audit_fields(self) -> dict[str, Any]:
        """The fields every audit event of this lifecycle starts from (a distributed
        lifecycle's rank and world size come in through its commit hook). A copy."""
        return dict(self._base)

    def _refuse(self, error: LifecycleError, trigger: Trigger) -> LifecycleError:
        """Audit a refusal decided before any trigger fired (prepare's arguments, a busy lock)."""
        return self._runner.refuse(error, trigger)

    def _locked(self, trigger: Trigger) -> AbstractContextManager[None]:
        """Hold this lifecycle's lock for ``trigger`` (a busy one is refused, audited)."""
        return self._runner.locked(trigger)

    def _request_started(self, active: object) -> None:
        self._serving_state.request_started(active)

    def _request_cancelled(self) -> None:
        self._serving_state.request_cancelled()

    def _request_ended(self, result: RequestResult) -> int:
        return self._serving_state.request_ended(result)

    def _guard(self, trigger: Trigger, source: State) -> None:
        """Before any trigger's work: inside its own request the owner may only refresh, and a
        module another lifecycle drives differently is refused."""
        if self._serving_state.active is not None:
            refuse_trigger_inside_request(self, trigger)
        if source is _LOADED and trigger is not _RESET:
            self._check_drivers(trigger)

    def _invalid(self, trigger: Trigger, message: str) -> InvalidConfigError:
        return InvalidConfigError(
            f"{self._name}: {message}", module=self._name, state=self.state, trigger=trigger
        )

    def _check_drivers(self, trigger: Trigger | None) -> None:
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
        if not self._drivers.several:
            return
        for other in DRIVERS.others(self._module, self):
            if not isinstance(other, ModuleLifecycle) or other.state is State.LOADED:
                continue
            if not self._config.drives_alike(other._config):
                raise InvalidConfigError(
                    f"{self._name}: the module is already driven by lifecycle {other.name!r} "
                    f"(state {other.state.value}, policy {other.policy}) with another policy, plan, "
                    "cache or compile configuration; two lifecycles share a module only when "
                    f"configured alike. Call reset() on {other.name!r} first, give this lifecycle "
                    "its own module, or construct it with the same arguments",
                    module=self._name, state=self.state, trigger=trigger,
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
        self._runner.fire(Trigger.MOUNT_CACHE, self._mount)

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
        self._runner.fire(Trigger.COMPILE, lambda step: self._compile(step, examples))

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
        shapes: Buckets = list(planned or self._serving_state.book.declared_shapes()) or [None]
        return [partial(call_at, shape) for shape in shapes]

    def _compile_for(self, run: WarmupRun, target: object, planned: list[dict[str, Any]] | None) -> None:
        """The prepare walk's compile, from the warm-up callable's calls (one per bucket)."""
        examples = self._examples(run, target, planned)
        self._runner.fire(Trigger.COMPILE, lambda step: self._compile(step, examples))

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
        for event in report.events:  # what the artifact store did: loaded, built, waiting, ...
            self._emit_artifacts(event, bool(event.get("problem")))

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
            self._warm(run, self._module, None)
            return
        with self._runner.locked(Trigger.WARM_UP):
            self._warm(run, self._module, check_shapes_audited([self], shapes))

    def _warm(self, run: WarmupRun, target: object, declared: list[dict[str, Any]] | None) -> None:
        """This lifecycle's own warm-up at ``declared`` (None: as ``buckets_to_warm`` says)."""
        buckets = buckets_to_warm(self._serving_state.book, run, declared)
        call_at = call_at_shape(run, target)
        self._warm_step(run, buckets, lambda: run_warmup([self], call_at, buckets).members[0], target)

    def _warm_step(
        self, run: object, buckets: Buckets, inner: Callable[[], MemberWarmup], target: object = None
    ) -> None:
        """The warm_up transition around ``inner``: the warm-up itself, or in a pipeline's
        joint warm-up the next member's transition (``lifecycle.walk``); it returns this
        lifecycle's part of the result, applied here."""
        self._runner.fire(Trigger.WARM_UP, lambda step: self._warmup_step(step, run, buckets, inner, target))

    def _warmup_step(
        self, step: TransitionStep, run: object, buckets: Buckets, inner: Callable[[], MemberWarmup],
        target: object = None,
    ) -> None:
        """The warm_up transition's work: ``run`` must be callable; the declared buckets it is
        asked to warm are the lifecycle's from now on (cold until a warm-up succeeds; the
        implicit bucket joins only when its warm-up did); ``inner`` runs the warm-up, and its
        result is applied here (``target``: what ``run`` is called with, the module by default)."""
        check_callable(run, module=self._name, state=step.source, trigger=Trigger.WARM_UP)
        if buckets[0] is not None or len(buckets) > 1:
            self._serving_state.declare([shape for shape in buckets if shape is not None])
        if self._compiler.pending:
            # A compile deferred until real calls come: the warm-up's, one per bucket.
            called_with = self._module if target is None else target
            examples = self._examples(cast(WarmupRun, run), called_with, buckets)
            self._apply_compile(
                self._compiler.compile(self._module, examples, self._compile_kwargs()), step.extra
            )
        else:
            # Weights replaced since the compile (invalidate after a LoRA fuse, say): the compiled
            # code reads the new tensors from here on.
            step.extra.update(self._compiler.rebind(self._module))
        result = inner()
        # The warm-up succeeded: its result becomes this lifecycle's.
        extra = step.extra
        self._serving_state.apply_warmup(result)
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
            check_steps(num_inference_steps, module=self._name, state=step.source, trigger=Trigger.REFRESH)
            before = self._context.refresh(num_inference_steps)
            steps = self._context.serving_steps
            step.extra["num_inference_steps"] = steps
            step.on_undo(lambda: self._context.undo_refresh(before))
            active = self._serving_state.active
            if active is not None:
                active.note_refresh(steps)
                step.extra["request_id"] = active.record.request_id

        self._runner.fire(Trigger.REFRESH, work)

    def invalidate(self) -> None:
        """WarmedUp -> the state before it: weights changed, so warm up again before serving.
        Every bucket of the plan must be warmed again; compiled code is kept.

        Raises:
            IllegalTransitionError: not WarmedUp, or inside a request.

        Example::

            lc.invalidate()          # after loading new weights (a LoRA fuse, say)
            lc.prepare(run)          # warms every bucket again
        """

        self._runner.fire(Trigger.INVALIDATE, lambda step: self._serving_state.invalidate())

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
            self._serving_state.forget()

        self._runner.fire(Trigger.RESET, work)

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
        with self._runner.locked(Trigger.WARM_UP), signals.preparing(self._name, [self._name]):
            refusal = check_prepare_arguments(self, run, num_inference_steps)
            if refusal is not None:
                raise refusal
            declared = check_shapes_audited([self], shapes)
            self._begin_prepare(num_inference_steps, declared)
            if self.state is State.WARMED_UP:
                book = self._serving_state.book
                cold = [shape for shape in declared or () if not book.is_warm(shape)]
                if cold:
                    self._warm(run, self._module, cold)
                return
            self._advance(run, self._module, declared)
            self._warm(run, self._module, declared)

    def _begin_prepare(self, steps: int | None, declared: list[dict[str, Any]] | None) -> None:
        """A prepare's settings, its arguments checked: the serving step count; and, before the
        compile, whether the buckets share dynamic graphs (two or more declared, unless
        compile_options sets ``dynamic``). Once compiled, that choice stands."""
        self._context.set_serving_steps(steps)
        if self._policy.compile and self.state not in (State.COMPILED, State.WARMED_UP):
            self._serving_state.decide_sharing(
                self._serving.share_bucket_graphs
                and "dynamic" not in self._compile_options
                and declared is not None
                and len(declared) >= 2
            )

    def _advance(self, run: WarmupRun, target: object, declared: list[dict[str, Any]] | None) -> None:
        """Mount and compile, as the table's remaining path says (the warm-up is left)."""
        for trigger in remaining_path(self._policy, self.state):
            if trigger is Trigger.MOUNT_CACHE:
                self.mount_cache()
            elif trigger is Trigger.COMPILE:
                self._compile_for(run, target, declared)

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
        self._emit_artifacts(report.as_dict(), report.problem)

    def _emit_artifacts(self, fields: Mapping[str, Any], problem: bool) -> None:
        lost = emit_checked("lifecycle.artifacts", "refused" if problem else "ok", {**self._base, **fields})
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


def _cache_version(cache: CacheAdapter) -> str | None:
    version = getattr(cache, "version", None)
    return str(version()) if callable(version) else None
