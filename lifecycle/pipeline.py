"""``PipelineLifecycle``: several named ``ModuleLifecycle``s (Wan 2.2's ``transformer`` and
``transformer_2``) moved together, in a defined order."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
import uuid
from typing import Any

from lifecycle.errors import IllegalTransitionError, InvalidConfigError, LifecycleError
from lifecycle.module import ModuleLifecycle, RequestRecord
from states import PROGRESS, State, Trigger

# Pipeline attributes managed by from_diffusers, in order.
DIFFUSERS_MEMBERS = ("transformer", "transformer_2")


class PipelineError(LifecycleError):
    """A member's transition failed; ``member`` names it, ``__cause__`` is the member's error."""

    def __init__(self, message: str, *, member: str, state: State | None) -> None:
        super().__init__(message, module=member, state=state)
        self.member = member


class PipelineLifecycle:
    """Prepares, refreshes, invalidates, resets and serves its members in insertion order.

    Its ``state`` is the least advanced member's. A member that fails stops the walk: members
    before it keep their new state, it and those after keep their old one, and the error names
    the member (``PipelineError`` whose ``__cause__`` is the member's typed error).
    """

    def __init__(self, members: Mapping[str, ModuleLifecycle], *, pipeline: Any = None) -> None:
        if not members:
            raise InvalidConfigError("PipelineLifecycle needs at least one member")
        for name, member in members.items():
            if not isinstance(member, ModuleLifecycle):
                raise InvalidConfigError(
                    f"member {name!r} must be a ModuleLifecycle, got {type(member).__name__}"
                )
        self.members: dict[str, ModuleLifecycle] = dict(members)
        self.pipeline = pipeline

    @classmethod
    def from_diffusers(cls, pipe: Any, **lifecycle_kwargs: Any) -> PipelineLifecycle:
        """Manage ``pipe.transformer`` and, when present, ``pipe.transformer_2``.

        cache-dit is mounted on each transformer, not on the pipeline: the lifecycle owns the
        order (mount before compile) and refreshes each transformer's context per request
        itself, and pipeline-level mounting would hide the transformers behind cache-dit's own
        pipeline hooks. The modules are wrapped and compiled in place, so ``pipe(...)`` keeps
        working through them.
        """
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
        return min((m.state for m in self.members.values()), key=PROGRESS.__getitem__)

    def _warmup_target(self) -> Any:
        return self.pipeline if self.pipeline is not None else {n: m.module for n, m in self.members.items()}

    def _each(self, action: Callable[[ModuleLifecycle], None]) -> None:
        for name, member in self.members.items():
            try:
                action(member)
            except LifecycleError as exc:
                raise PipelineError(
                    f"pipeline member {name!r} failed: {exc}", member=name, state=member.state
                ) from exc

    def prepare(self, run: Callable[[Any], object], num_inference_steps: int | None = None) -> None:
        """Mount and compile every member in order, then warm all of them with one call of
        ``run(pipeline)`` (``run(dict of modules)`` when built without a pipeline)."""
        with ExitStack() as locks:
            for member in self.members.values():
                locks.enter_context(member._lock)
            if self.state is State.WARMED_UP and all(m.state is State.WARMED_UP for m in self.members.values()):
                return
            self._each(lambda m: m._check_callable(Trigger.WARM_UP, run))

            def advance(member: ModuleLifecycle) -> None:
                if num_inference_steps is not None:
                    member._check_steps(Trigger.REFRESH, num_inference_steps)
                    member._serving_steps = num_inference_steps
                for trigger in member._remaining_path():
                    if trigger is not Trigger.WARM_UP:
                        getattr(member, trigger.value)()

            self._each(advance)
            cold = [m for m in self.members.values() if m.state is not State.WARMED_UP]
            self._warm_together(cold, lambda: run(self._warmup_target()))

    def _warm_together(self, members: list[ModuleLifecycle], call: Callable[[], object]) -> None:
        """One warm-up transition per member around a shared warm-up call."""
        if not members:
            return
        with ExitStack() as stack:
            attempts = []
            for member in members:
                try:
                    attempts.append(stack.enter_context(member._transition(Trigger.WARM_UP)))
                except IllegalTransitionError as exc:
                    raise PipelineError(
                        f"pipeline member {member.name!r}: {exc}", member=member.name, state=member.state
                    ) from exc
            ModuleLifecycle._run_warmup(members, call, None)
            for attempt, member in zip(attempts, members):
                attempt.extra["cached_branch_covered"] = member._warmup_covered
                attempt.extra["joint_warmup"] = [m.name for m in members]

    def refresh(self, num_inference_steps: int | None = None) -> None:
        self._each(lambda m: m.refresh(num_inference_steps) if m.policy.cache_dit else None)

    def invalidate(self) -> None:
        self._each(lambda m: m.invalidate() if m.state is State.WARMED_UP else None)

    def reset(self) -> None:
        self._each(lambda m: m.reset())

    @contextmanager
    def request(
        self, num_inference_steps: int | None = None, request_id: str | None = None
    ) -> Iterator[dict[str, RequestRecord]]:
        """Enter every member's request (in order, so two pipeline requests never deadlock)."""
        request_id = request_id or uuid.uuid4().hex[:12]
        with ExitStack() as stack:
            records = {
                name: stack.enter_context(member.request(num_inference_steps, request_id))
                for name, member in self.members.items()
            }
            yield records

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: member.stats() for name, member in self.members.items()}

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={m.state.value}" for n, m in self.members.items())
        return f"PipelineLifecycle({inner})"
