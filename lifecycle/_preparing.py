"""What every ``prepare`` shares, for a lone module, a pipeline and a distributed lifecycle:
its arguments checked before anything moves (a refusal is audited), and ``aprepare``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from lifecycle._buckets import check_shapes
from lifecycle._config import check_steps
from lifecycle._errors import InvalidConfigError, LifecycleError
from states import State, Trigger


class Refusing(Protocol):
    """A member whose refusals are audited (``ModuleLifecycle``)."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> State: ...

    def _refuse(self, error: LifecycleError, trigger: Trigger) -> LifecycleError: ...


def check_callable(run: object, *, module: str, state: State, trigger: Trigger) -> None:
    """The warm-up callable: ``run(target)`` (or ``run(target, shape)``)."""
    if not callable(run):
        raise InvalidConfigError(
            f"{module}: warm-up needs a callable run(module) that makes representative forward calls, "
            f"got {type(run).__name__}",
            module=module, state=state, trigger=trigger,
        )


def check_prepare_arguments(member: Refusing, run: object, steps: object) -> LifecycleError | None:
    """``prepare``'s own arguments for one member: the refusal (audited), or None when fine."""
    state = member.state
    try:
        if state is not State.WARMED_UP:
            check_callable(run, module=member.name, state=state, trigger=Trigger.WARM_UP)
        check_steps(steps, module=member.name, state=state, trigger=Trigger.REFRESH)
    except InvalidConfigError as exc:
        trigger = exc.trigger if isinstance(exc.trigger, Trigger) else Trigger.WARM_UP
        return member._refuse(exc, trigger)
    return None


def check_shapes_audited(members: Sequence[Refusing], shapes: object) -> list[dict[str, Any]] | None:
    """``shapes`` as declared buckets (None: none given); a bad one is refused, audited."""
    if shapes is None:
        return None
    try:
        return check_shapes(shapes, module=members[0].name)
    except InvalidConfigError as exc:
        raise members[0]._refuse(exc, Trigger.WARM_UP) from None


class AsyncPrepare:
    """``aprepare`` for whoever has a ``prepare`` (a lifecycle, a pipeline)."""

    prepare: Callable[..., None]

    async def aprepare(
        self, run: Callable[..., object], num_inference_steps: int | None = None, shapes: Any = None
    ) -> None:
        """``prepare`` in a worker thread, so an event loop keeps serving meanwhile.

        Takes ``prepare``'s arguments and raises its errors.

        Example::

            await lc.aprepare(lambda module: module(torch.zeros(1, 8)), shapes=[...])
        """
        await asyncio.to_thread(self.prepare, run, num_inference_steps, shapes)


__all__ = [
    "AsyncPrepare", "Refusing", "check_callable", "check_prepare_arguments", "check_shapes_audited",
]
