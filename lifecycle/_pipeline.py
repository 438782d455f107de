"""``PipelineLifecycle``: several named ``ModuleLifecycle``s (Wan 2.2's ``transformer`` and
``transformer_2``) moved together, in a defined order."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from lifecycle import _walk as walk
from lifecycle._buckets import shape_key
from lifecycle._config import check_steps
from lifecycle._errors import InvalidConfigError, LifecycleError, PipelineError
from lifecycle._member import Member
from lifecycle._module import ModuleLifecycle
from lifecycle._preparing import AsyncPrepare, check_shapes_audited
from lifecycle._serving import RequestRecord, RequestScope
from lifecycle.audit import signals
from states import PROGRESS, State, Trigger

# Pipeline attributes managed by from_diffusers, in order.
DIFFUSERS_MEMBERS = ("transformer", "transformer_2")


class PipelineLifecycle(AsyncPrepare):
    """Prepares, refreshes, invalidates, resets and serves its members in insertion order.

    - ``state`` is the least advanced member's.
    - Every operation holds all members' locks (taken in insertion order, so two pipeline
      operations never deadlock): a member cannot move under a pipeline operation.
    - ``prepare`` mounts and compiles each member in turn, then warms all cold members with one
      call of the warm-up callable (a joint warm-up: one pipeline call reaches every member).
    - A member that fails stops the walk: members before it keep their new state, it and those
      after keep their old one, each in a legal state of its own, and the error names the
      member (``PipelineError`` whose ``__cause__`` is the member's typed error). A failed
      joint warm-up leaves every cold member in its pre-warm-up state and names them all.
    - ``refresh`` checks every member first (legal now, valid step count) and touches none if
      one would refuse.
    - ``reset`` is the way back from anything: it resets every member even when one fails, then
      names the ones that failed.

    Args:
        members: member name -> ``ModuleLifecycle``, in the order they are driven.
        pipeline: the object the warm-up callable is given (default: the dict of modules).

    Raises:
        InvalidConfigError: not a mapping, empty, a bad member name, or one lifecycle twice.

    Example::

        plc = PipelineLifecycle({"transformer": lc1, "transformer_2": lc2}, pipeline=pipe)
        plc.prepare(lambda pipe: pipe(prompt="warm-up", num_inference_steps=4))
        with plc.request(num_inference_steps=28) as records:
            image = pipe(prompt="a cat", num_inference_steps=28)
    """

    def __init__(self, members: Mapping[str, ModuleLifecycle], *, pipeline: Any = None) -> None:
        if not isinstance(members, Mapping):
            raise InvalidConfigError(
                f"PipelineLifecycle takes a mapping of member name -> ModuleLifecycle, got "
                f"{type(members).__name__}; e.g. PipelineLifecycle({{'transformer': lc1, "
                "'transformer_2': lc2}})"
            )
        if not members:
            raise InvalidConfigError("PipelineLifecycle needs at least one member")
        seen: dict[int, str] = {}
        for name, member in members.items():
            if not isinstance(name, str) or not name:
                raise InvalidConfigError(f"pipeline member names must be non-empty str, got {name!r}")
            if not isinstance(member, ModuleLifecycle):
                raise InvalidConfigError(
                    f"member {name!r} must be a ModuleLifecycle, got {type(member).__name__}"
                )
            if id(member) in seen:
                raise InvalidConfigError(
                    f"members {seen[id(member)]!r} and {name!r} are the same lifecycle "
                    f"({member.name!r}); a pipeline drives each lifecycle once: give each member "
                    "its own ModuleLifecycle"
                )
            seen[id(member)] = name
        self.members: dict[str, ModuleLifecycle] = dict(members)
        self.pipeline = pipeline

    @classmethod
    def from_diffusers(cls, pipe: Any, **lifecycle_kwargs: Any) -> PipelineLifecycle:
        """Manage ``pipe.transformer`` and, when present, ``pipe.transformer_2`` (Wan 2.2).

        ``lifecycle_kwargs`` (policy, backend, cache_config, compile_options) go to every
        member. The modules are wrapped and compiled in place, so ``pipe(...)`` keeps working
        through them; serve with ``with plc.request(...): pipe(...)``.

        Why cache-dit is mounted on each transformer and not on the pipeline
        (``cache_dit.enable_cache(pipe)``), although the pipeline mount refreshes per call:
        - Its contexts are per call, not persistent: ``refresh_context`` skips them, so the
          lifecycle could neither steer warm-up into the cached-step branch nor hand the first
          request a clean context, and a short warm-up would leave a graph for that request
          to compile. Per-transformer contexts are persistent and ours to refresh.
        - The lifecycle must mount before it compiles, on the very module it compiles; mounting
          the transformer is that, with nothing of the pipeline's ``__call__`` patched.
        - Serving engines call the transformer directly; one mechanism serves both uses.
        The price is that isolation needs ``request()``: a pipeline call outside it continues
        the previous call's context. Do not also mount cache-dit on the pipeline.

        Classifier-free guidance (Wan): the pipeline calls the step's transformer twice per
        step, conditional then unconditional. cache-dit's registered Wan adapter sets
        ``has_separate_cfg``, which the mount turns into ``enable_separate_cfg=True``: each
        context counts a step per call pair and keeps separate cond/uncond caches. A refresh
        keeps it (cache-dit updates only the fields our config sets, and it leaves this one
        None), and every request starts on a cond call. Without guidance (``guidance_scale``
        <= 1) pass a ``cache_config`` with ``enable_separate_cfg=False``, or the context
        would count two steps as one.

        Args:
            pipe: a diffusers pipeline with a ``transformer`` (and maybe ``transformer_2``).
            **lifecycle_kwargs: ``ModuleLifecycle``'s keyword arguments, for every member.

        Raises:
            InvalidConfigError: the pipeline has no transformer, or a bad lifecycle argument.
            UnsupportedModuleError: a transformer the lifecycle cannot manage.
            BackendUnavailableError: the backend's runtime or device is missing.

        Example::

            plc = PipelineLifecycle.from_diffusers(pipe, backend="cuda")
            plc.prepare(lambda pipe: pipe(prompt="warm-up", num_inference_steps=28))
            with plc.request(num_inference_steps=28):
                image = pipe(prompt="a cat", num_inference_steps=28).images[0]
        """
        if "cache_adapter" not in lifecycle_kwargs:
            # The pipeline's class name lets the cache adapter mount families cache-dit
            # registers only under the pipeline's name (StableDiffusion3).
            from adapters import CacheDitAdapter

            lifecycle_kwargs = {**lifecycle_kwargs, "cache_adapter": CacheDitAdapter(type(pipe).__name__)}
        members = {}
        for attribute in DIFFUSERS_MEMBERS:
            module = getattr(pipe, attribute, None)
            if module is not None:
                members[attribute] = ModuleLifecycle(module, name=attribute, **lifecycle_kwargs)
        if not members:
            raise InvalidConfigError(
                f"{type(pipe).__name__} has no transformer to manage; expected one of {DIFFUSERS_MEMBERS}"
            )
        return cls(members, pipeline=pipe)

    @property
    def state(self) -> State:
        """The least advanced member's state.

        Example::

            print(plc.state)   # State.LOADED until every member is further
        """
        return min((m.state for m in self.members.values()), key=PROGRESS.__getitem__)

    @property
    def ready(self) -> bool:
        """True only while every member is ready to serve (see ``ModuleLifecycle.ready``).

        Example::

            status = 200 if plc.ready else 503   # a readiness probe
        """
        return all(m.ready for m in self.members.values())

    def _warmup_target(self) -> Any:
        return self.pipeline if self.pipeline is not None else {n: m.module for n, m in self.members.items()}

    @contextmanager
    def _locked(self, trigger: Trigger) -> Iterator[None]:
        """Hold every member's lock, in insertion order (the order ``request`` takes them too)."""
        with ExitStack() as stack:
            for member in self.members.values():
                stack.enter_context(member._locked(trigger))
            yield

    def _each(self, action: Callable[[ModuleLifecycle], None]) -> None:
        for member in self.members.values():
            self._each_one(member, action)

    def _each_one(self, member: ModuleLifecycle, action: Callable[[ModuleLifecycle], None]) -> None:
        try:
            action(member)
        except LifecycleError as exc:
            raise _member_error(member, exc) from exc

    def coverage(self) -> dict[str, list[dict[str, Any]]]:
        """Each member's ``coverage()``, by member name.

        Example::

            rows = plc.coverage()["transformer"]
        """
        return {name: member.coverage() for name, member in self.members.items()}

    def missed_shapes(self) -> list[dict[str, Any]]:
        """The shapes any member missed and no bucket covers, de-duplicated.

        Example::

            if plc.missed_shapes():
                plc.warm_up(run, shapes=plc.missed_shapes())
        """
        found: dict[str, dict[str, Any]] = {}
        for member in self.members.values():
            for shape in member.missed_shapes():
                found.setdefault(shape_key(shape), shape)
        return list(found.values())

    def warm_up(self, run: Callable[..., object], shapes: Any = None) -> None:
        """Every member WarmedUp -> WarmedUp together: warm (more) buckets with
        ``run(pipeline, shape)``, e.g. ``plc.warm_up(run, shapes=plc.missed_shapes())``.

        Args:
            run: the warm-up callable, ``run(pipeline, shape)``.
            shapes: the serving buckets to warm.

        Raises:
            InvalidConfigError: ``run`` is not callable, or ``shapes`` is malformed.
            PipelineError: a member refused or failed (its typed error is the ``__cause__``).

        Example::

            plc.warm_up(lambda pipe, shape: pipe(prompt="warm-up", **shape),
                        shapes=[{"height": 1024, "width": 1024}])
        """
        members = list(self.members.values())
        with self._locked(Trigger.WARM_UP):
            declared = check_shapes_audited(members, shapes)
            walk.warm_together(
                members, run, self._warmup_target(), declared, on_member=_member_error, on_joint=_joint_error
            )

    def prepare(
        self, run: Callable[..., object], num_inference_steps: int | None = None, shapes: Any = None
    ) -> None:
        """Mount and compile every member in order, then warm all cold members with one call of
        ``run(pipeline)`` (``run(dict of modules)`` when built without a pipeline).

        Idempotent and thread-safe like ``ModuleLifecycle.prepare`` (the same walk): concurrent
        callers wait, and all but the first find every member WarmedUp.

        Args:
            run: the warm-up callable, ``run(pipeline)`` (or ``run(pipeline, shape)`` with ``shapes``).
            num_inference_steps: the serving step count of every member's cache context.
            shapes: the declared serving buckets.

        Raises:
            InvalidConfigError: a bad argument (nothing moved).
            PipelineError: a member refused or failed (its typed error is the ``__cause__``).

        Example::

            plc.prepare(lambda pipe: pipe(prompt="warm-up", num_inference_steps=28),
                        num_inference_steps=28)
        """
        with self._locked(Trigger.WARM_UP), signals.preparing("pipeline", list(self.members)):
            walk.prepare(
                list(self.members.values()), run, self._warmup_target(), num_inference_steps, shapes,
                on_member=_member_error, on_joint=_joint_error,
            )

    def refresh(self, num_inference_steps: int | None = None) -> None:
        """A fresh cache context for every member with cache-dit, each staying in its state.

        All or none: a member that would refuse (not mounted yet, bad step count) raises
        before any member is refreshed. A refresh compiles nothing.

        Args:
            num_inference_steps: the step count of the new contexts (default: as before).

        Raises:
            PipelineError: a member refused (its typed error is the ``__cause__``); none moved.

        Example::

            plc.refresh(num_inference_steps=50)
        """
        with self._locked(Trigger.REFRESH):
            cached = [m for m in self.members.values() if m.policy.cache_dit]
            for member in cached:
                try:
                    check_steps(
                        num_inference_steps, module=member.name, state=member.state, trigger=Trigger.REFRESH
                    )
                    legal = member.can(Trigger.REFRESH)
                except LifecycleError:
                    legal = False
                if not legal:
                    # Let the member refuse (and audit the refusal); nobody has been touched.
                    self._each_one(member, lambda m: m.refresh(num_inference_steps))
            for member in cached:
                self._each_one(member, lambda m: m.refresh(num_inference_steps))

    def invalidate(self) -> None:
        """Weights changed: every WarmedUp member steps back so the next ``prepare`` warms it
        again (compiled code is kept). Members that are not warm have nothing to invalidate.

        Raises:
            PipelineError: a member refused (inside a request, say).

        Example::

            pipe.fuse_lora()
            plc.invalidate()
            plc.prepare(run)
        """
        with self._locked(Trigger.INVALIDATE):
            self._each(lambda m: m.invalidate() if m.state is State.WARMED_UP else None)

    def reset(self) -> None:
        """Every member back to Loaded (unmounted, compiled code dropped), in order. A member
        that fails does not stop the others; the error names every member that failed.

        Raises:
            PipelineError: one or more members failed (``members`` names them all).

        Example::

            plc.reset()
            assert plc.state is State.LOADED
        """
        with self._locked(Trigger.RESET):
            failures: list[tuple[ModuleLifecycle, LifecycleError]] = []
            for member in self.members.values():
                try:
                    member.reset()
                except LifecycleError as exc:
                    failures.append((member, exc))
            if failures:
                first, error = failures[0]
                names = tuple(m.name for m, _ in failures)
                raise PipelineError(
                    f"reset failed for pipeline member(s) {', '.join(map(repr, names))}: {error}; "
                    "the other members are Loaded. Call reset() again once the cause is fixed.",
                    member=first.name,
                    state=first.state,
                    members=names,
                ) from error

    @contextmanager
    def request(
        self,
        num_inference_steps: int | None = None,
        request_id: str | None = None,
        shape: Any = None,
        on_unwarmed: str | None = None,
    ) -> Iterator[dict[str, RequestRecord]]:
        """Enter every member's request under one request id; yields ``{member name: record}``.

        The same request scope as ``ModuleLifecycle.request``, over every member: every lock is
        taken first, in insertion order (two pipeline requests never deadlock), then the table is
        asked for every member: a pipeline request is served by all members or refused before
        any of them starts one. A member whose start fails takes back the members already
        started (audited ``refused``; it ``failed``), and no body runs.

        Args:
            num_inference_steps: this request's step count (default: each member's).
            request_id: the id shared by every member's record (default: a generated one).
            shape: the request's shape, e.g. ``{"height": 1024, "width": 1024}``.
            on_unwarmed: ``"eager"``, ``"fail"`` or ``"compile"`` for this request.

        Raises:
            IllegalTransitionError: a member is not WarmedUp, or a nested request.
            InvalidConfigError: a bad argument.
            UnwarmedShapeError: ``shape`` is not warm and ``on_unwarmed`` is ``"fail"``.

        Example::

            with plc.request(num_inference_steps=28, request_id="r-1") as records:
                image = pipe(prompt="a cat", num_inference_steps=28).images[0]
            print(records["transformer"].cached_steps)
        """
        with RequestScope(
            list(self.members.values()), steps=num_inference_steps, request_id=request_id, shape=shape,
            on_unwarmed=on_unwarmed, pipeline=True,
        ) as records:
            yield dict(zip(self.members, records, strict=True))

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each member's ``stats()``, by member name.

        Example::

            print(plc.stats()["transformer"]["compiles"])
        """
        return {name: member.stats() for name, member in self.members.items()}

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={m.state.value}" for n, m in self.members.items())
        return f"PipelineLifecycle({inner})"


def _member_error(member: Member, error: LifecycleError) -> LifecycleError:
    return PipelineError(
        f"pipeline member {member.name!r} failed: {error}", member=member.name, state=member.state
    )


def _joint_error(members: Sequence[Member], error: LifecycleError) -> LifecycleError:
    """A joint warm-up cannot be pinned on one member: the error names them all."""
    if isinstance(error, PipelineError):
        return error
    names = tuple(m.name for m in members)
    states = ", ".join(f"{m.name}={m.state.value}" for m in members)
    return PipelineError(
        f"joint warm-up of pipeline members {', '.join(map(repr, names))} failed: {error}; "
        f"they stay {states}. Fix the warm-up callable (or what it calls), then call "
        "prepare(run) again.",
        member=names[0],
        state=members[0].state,
        members=names,
    )
