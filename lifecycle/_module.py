"""``ModuleLifecycle``: one transformer's walk Loaded -> CacheMounted -> Compiled -> WarmedUp.

The lifecycle fires each trigger and applies what its helpers return; each helper owns its
fields: ``config`` (the checked arguments, a ``LifecycleConfig``), ``runner`` (state, commit,
audit, history), ``compiling`` (the compile step and its bookkeeping), ``context`` (the cache-dit
mount and context), ``serving_state`` (what warm-ups and requests leave behind, applied here),
``holds`` (who drives and holds the module). Its lock-free reads are ``lifecycle._views``.
``prepare`` walks ``states.remaining_path`` through the lifecycle's own steps, as a pipeline's
walk (``lifecycle._walk``) does.
"""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, cast

from torch import nn

from adapters import BackendAdapter
from adapters.artifact_session import ArtifactSession
from adapters.artifacts import ArtifactKey
from adapters.compiler import Compiler, Example
from adapters.errors import AdapterError
from adapters.protocols import CacheAdapter
from lifecycle import _walk as walk
from lifecycle._commit import CommitHook, LocalCommit
from lifecycle._compiling import CompileStep, check_examples, warmup_examples
from lifecycle._config import CompilePlan, ServingPolicy, check_lifecycle_arguments, check_steps
from lifecycle._context import CacheContext
from lifecycle._errors import InvalidConfigError, LifecycleError, translate_adapter_error
from lifecycle._holds import DRIVERS, check_drivers
from lifecycle._locking import OwnerLock
from lifecycle._preparing import AsyncPrepare, check_callable, check_shapes_audited
from lifecycle._record import TransitionRecord
from lifecycle._runner import HISTORY_LIMIT, TransitionRunner, TransitionStep
from lifecycle._serving import RequestRecord, RequestScope, refuse_trigger_inside_request
from lifecycle._serving_state import RequestResult, ServingState
from lifecycle._views import LifecycleViews
from lifecycle._warmup import MAX_WARMUP_RUNS, Buckets, MemberWarmup, WarmupCoverageWarning
from lifecycle.audit import signals
from states import LifecyclePolicy, State, Trigger, remaining_path

WarmupRun = Callable[..., object]

__all__ = [
    "HISTORY_LIMIT", "MAX_WARMUP_RUNS", "ModuleLifecycle", "RequestRecord", "TransitionRecord",
    "TransitionStep", "WarmupCoverageWarning", "WarmupRun",
]

_LOADED = State.LOADED
_RESET = Trigger.RESET


class ModuleLifecycle(LifecycleViews, AsyncPrepare):
    """An explicit, audited lifecycle for one transformer module.

    Thread-safe: triggers and requests hold the lifecycle's lock (re-entrant for its owner, a
    thread or an asyncio task; lifecycles sharing one module share it). Inside its own
    ``request`` the owner may only ``refresh``. Reads (``ready``, ``state``, ``coverage()``,
    ``missed_shapes()``, ``history``, ``stats()``) take no lock and return consistent snapshots.

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
        self._config = config
        policy = config.policy
        self._module_id = uuid.uuid4().hex[:12]
        self._module = module
        try:
            store = config.store if policy.compile else None
            self._artifacts = ArtifactSession(store) if store is not None else None
            # The one compiler this lifecycle calls, picked and configured by the backend.
            self._compiler: Compiler = config.backend.compiler(
                config.compile_plan if policy.compile else CompilePlan(), config.torch_options, config.store,
                build_wait_s=config.build_wait_s, while_building=config.serving.while_building,
            )
            # What the compiler keeps for this process only goes with the lifecycle.
            weakref.finalize(self, self._compiler.close)
        except AdapterError as exc:
            raise translate_adapter_error(exc, module=name, state=State.LOADED) from exc
        commit = commit if commit is not None else LocalCommit()
        self._base: dict[str, Any] = {
            "module": name,
            "module_id": self._module_id,
            "backend": config.backend.name,
            "policy": policy.as_dict(),
            **commit.audit_fields(),
        }
        self._context = CacheContext(
            module, config.cache, config.cache_config, enabled=policy.cache_dit, base_fields=self._base
        )
        self._serving_state = ServingState(self._context)
        self._compiling = CompileStep(
            config, module, self._module_id, self._compiler, self._artifacts, self._context, self._base
        )
        # Lifecycles over one module share its lock (lifecycle._holds); registered last, so a
        # construction that failed above leaves no trace.
        self._drivers = DRIVERS.join(module, self)
        self._lock: OwnerLock = self._drivers.lock
        self._runner = TransitionRunner(name, policy, self._base, commit, self._lock, self._guard)
        check_drivers(self, module, self._drivers, config.cache, None)

    # ------------------------------------------------------------------ the Member protocol
    def _refuse(self, error: LifecycleError, trigger: Trigger) -> LifecycleError:
        """Audit a refusal decided before any trigger fired (prepare's arguments, a busy lock)."""
        return self._runner.refuse(error, trigger)

    def _locked(self, trigger: Trigger) -> AbstractContextManager[None]:
        """Hold this lifecycle's lock for ``trigger`` (a busy one is refused, audited)."""
        return self._runner.locked(trigger)

    def _request_boundary(self) -> None:
        self._compiling.at_request_boundary()

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
            check_drivers(self, self._module, self._drivers, self._config.cache, trigger)

    def _artifact_key(self) -> ArtifactKey:
        return self._compiling.key(self._shares_graphs)

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
        def unsupported(exc: AdapterError) -> BaseException:
            return translate_adapter_error(
                exc, module=self.name, state=self.state, trigger=Trigger.MOUNT_CACHE
            )

        adopted = self._context.mount(self._module_id, unsupported)
        if adopted is not None:
            step.extra["adopted"] = adopted
        step.on_undo(lambda: self._context.unmount(self._module_id, unmount=adopted is None))
        step.extra["cache_config"] = self._config.cache.describe_config(self._config.cache_config)

    def compile(self, examples: Sequence[Example] | None = None) -> None:
        """-> Compiled: compile the (cache-wrapped) module in place, as the ``CompilePlan`` says.

        ``examples``: zero-argument callables that each run the module once (one per serving
        bucket), for a compiler that builds from real calls (ahead-of-time blocks); without
        them it defers to the next ``warm_up``'s calls.

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
            try:
                examples = check_examples(examples, module=self.name, state=self.state)
            except InvalidConfigError as exc:
                raise self._refuse(exc, Trigger.COMPILE) from None
        self._fire_compile(examples)

    def _fire_compile(self, examples: Sequence[Example] | None) -> None:
        self._runner.fire(
            Trigger.COMPILE, lambda step: self._compiling.run(step, examples, self._shares_graphs)
        )

    def _examples(
        self, run: WarmupRun, target: object, planned: Sequence[dict[str, Any] | None] | None
    ) -> list[Example]:
        """The warm-up callable's calls at ``planned`` (default: the declared buckets)."""
        shapes: Buckets = list(planned or self._serving_state.book.declared_shapes()) or [None]
        return warmup_examples(run, target, shapes)

    def warm_up(self, run: WarmupRun, shapes: Any = None) -> None:
        """-> WarmedUp: call ``run(module)``; with cache-dit mounted and compile on, under a
        steered cache context until it has covered the cached-step branch.

        ``shapes``: serving buckets to warm (declared now, or again), one ``run(module, shape)``
        call each; from WarmedUp this adds buckets. Without ``shapes``, the declared buckets are
        warmed again (after ``invalidate``). A failed warm-up leaves the state as it was and its
        buckets cold.

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
            # A plain warm-up has no argument to refuse first: the transition takes the lock.
            walk.warm_together([self], run, self._module, None)
            return
        with self._runner.locked(Trigger.WARM_UP):
            walk.warm_together([self], run, self._module, check_shapes_audited([self], shapes))

    def _warm_step(
        self, run: object, buckets: Buckets, inner: Callable[[], MemberWarmup], target: object = None
    ) -> None:
        """The warm_up transition around ``inner`` (the warm-up itself, or in a pipeline's joint
        warm-up the next member's transition); this lifecycle's part of its result is applied
        here. ``target``: what ``run`` is called with, the module by default."""

        def work(step: TransitionStep) -> None:
            check_callable(run, module=self.name, state=step.source, trigger=Trigger.WARM_UP)
            if buckets[0] is not None or len(buckets) > 1:
                # Cold from now on until a warm-up succeeds (the implicit bucket joins on success).
                self._serving_state.declare([shape for shape in buckets if shape is not None])
            called_with = self._module if target is None else target
            self._compiling.before_warmup(
                step, lambda: self._examples(cast(WarmupRun, run), called_with, buckets), self._shares_graphs
            )
            result = inner()
            self._serving_state.apply_warmup(result)
            step.extra.update(result.fields)
            self._compiling.after_warmup(step.extra)

        self._runner.fire(Trigger.WARM_UP, work)

    def refresh(self, num_inference_steps: int | None = None) -> None:
        """Same state, a fresh cache-dit context from this lifecycle's config (and step count);
        inside one's own request, the rest of it runs in the new context.

        Raises:
            IllegalTransitionError: the table does not allow ``refresh`` in this state.
            InvalidConfigError: ``num_inference_steps`` is not a positive int.

        Example::

            with lc.request(num_inference_steps=28):
                lc.refresh(num_inference_steps=50)   # the rest runs 50 steps
        """

        def work(step: TransitionStep) -> None:
            check_steps(num_inference_steps, module=self.name, state=step.source, trigger=Trigger.REFRESH)
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
        """WarmedUp -> the state before it: weights changed, so every bucket must be warmed
        again before serving; compiled code is kept.

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
            IllegalTransitionError: not allowed in this state, or inside a request.
            TransitionFailedError: the unmount failed (nothing changed).

        Example::

            lc.reset()
            assert lc.state is State.LOADED
        """

        def work(step: TransitionStep) -> None:
            # Unmount first: it can fail, and nothing has changed yet if it does. Either is
            # undone only by the last lifecycle holding it (a shared module).
            self._context.unmount(self._module_id)
            self._compiling.release()
            self._compiler.close()
            self._serving_state.forget()

        self._runner.fire(Trigger.RESET, work)

    def prepare(
        self, run: WarmupRun, num_inference_steps: int | None = None, shapes: Any = None
    ) -> None:
        """Walk the legal path to WarmedUp, skipping what is done. Idempotent and thread-safe:
        concurrent callers wait on the lock and find the work done. Already WarmedUp, the
        declared buckets not warm yet are warmed.

        Args:
            run: the warm-up callable, ``run(module)`` (or ``run(module, shape)`` with ``shapes``).
            num_inference_steps: the serving step count of the cache context.
            shapes: the declared serving buckets, e.g. ``[{"height": 1024, "width": 1024}]``.

        Raises:
            InvalidConfigError: a bad argument (audited, nothing moved).
            IllegalTransitionError: a trigger the table refuses on the way.
            TransitionFailedError: a transition failed (the state is where that one started).

        Example::

            lc.prepare(lambda module: module(torch.zeros(1, 8)), num_inference_steps=28)
            assert lc.ready
        """
        with self._runner.locked(Trigger.WARM_UP), signals.preparing(self.name, [self.name]):
            walk.prepare([self], run, self._module, num_inference_steps, shapes)

    def _begin_prepare(self, steps: int | None, declared: list[dict[str, Any]] | None) -> None:
        """A prepare's settings: the serving step count; and, before the compile, whether the
        buckets share dynamic graphs (two or more declared, unless compile_options sets
        ``dynamic``). Once compiled, that choice stands."""
        self._context.set_serving_steps(steps)
        config = self._config
        if config.policy.compile and self.state not in (State.COMPILED, State.WARMED_UP):
            self._serving_state.decide_sharing(
                config.serving.share_bucket_graphs
                and "dynamic" not in config.compile_options
                and declared is not None
                and len(declared) >= 2
            )

    def _advance(self, run: WarmupRun, target: object, declared: list[dict[str, Any]] | None) -> None:
        """Mount and compile, as the table's remaining path says (the warm-up is left); the
        compile builds from the warm-up callable's calls, one per bucket."""
        for trigger in remaining_path(self._config.policy, self.state):
            if trigger is Trigger.MOUNT_CACHE:
                self.mount_cache()
            elif trigger is Trigger.COMPILE:
                self._fire_compile(self._examples(run, target, declared))

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

        Legal in WarmedUp only. The context is rebuilt from this lifecycle's cache config, so
        identical requests give identical outputs. The lock is held for the whole block (another
        asyncio task on this thread is refused at once); inside it the owner may only
        ``refresh()``. An exception from the block is recorded (``failed``) and propagates.
        ``new_graphs`` counts dynamo's process-wide graphs. A ``shape`` no warm-up covered is a
        ``lifecycle.shape_miss``, handled by ``on_unwarmed``: ``"eager"`` runs this module's
        eager path, ``"fail"`` raises before the transformer runs, ``"compile"`` compiles inline.

        Args:
            num_inference_steps: this request's step count (default: the lifecycle's).
            request_id: the id in the audit and the record (default: a generated one).
            shape: the request's shape, e.g. ``{"height": 1024, "width": 1024}`` (default: each
                transformer call is checked against the input sizes warm-up saw).
            on_unwarmed: ``"eager"``, ``"fail"`` or ``"compile"`` (default: the ``ServingPolicy``'s).

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
