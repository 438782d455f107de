"""The prepare walk and the joint warm-up: one way to take members to WarmedUp, for a lone
module (``ModuleLifecycle.prepare``, one member) and a pipeline (every member, in order) alike.

- ``prepare``: check every argument before anything moves (a refusal is audited); set the
  serving step count and decide whether the buckets share graphs; mount and compile each member
  along its policy's path; then warm every cold member with one warm-up (``warm_together``).
  Already WarmedUp, only the declared buckets not warm yet are warmed.
- ``warm_together``: one ``warm_up`` transition per member around one shared warm-up: member
  i's work enters member i+1's transition, the innermost runs the warm-up
  (``lifecycle.warmup.run_warmup``), and each member applies its own part of the result as the
  transitions return. A failure fails every member's warm-up (each stays where it was, each
  audits ``failed`` with the same cause).

The caller holds every member's lock.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from lifecycle.buckets import check_shapes
from lifecycle.errors import InvalidConfigError, LifecycleError
from lifecycle.member import Member
from lifecycle.warmup import MemberWarmup, call_at_shape, run_warmup
from states import State, Trigger

Plan = list[dict[str, Any] | None]
# How a pipeline turns one member's failure into its own error (a lone module raises its own).
OnMember = Callable[[Member, LifecycleError], LifecycleError]
OnJoint = Callable[[Sequence[Member], LifecycleError], LifecycleError]


class Walker(Member, Protocol):
    """A member the walk can move (``ModuleLifecycle``)."""

    def can(self, trigger: Trigger) -> bool: ...

    def mount_cache(self) -> None: ...

    def compile(self) -> None: ...

    def _transition(self, trigger: Trigger, work: Callable[[Any], None]) -> None: ...

    def _refuse(self, error: LifecycleError, trigger: Trigger) -> LifecycleError: ...

    def _check_callable(self, trigger: Trigger, run: object) -> None: ...

    def _check_steps(self, trigger: Trigger, steps: object) -> None: ...

    def _remaining_path(self) -> list[Trigger]: ...

    def _decide_sharing(self, planned: list[dict[str, Any]] | None) -> None: ...

    def _compile_for(
        self, run: Callable[..., object], target: object, planned: list[dict[str, Any]] | None
    ) -> None: ...

    def _warmup_step(
        self, step: Any, run: object, plan: Plan, inner: Callable[[], list[MemberWarmup]], index: int,
        target: object = None,
    ) -> None: ...


def check_prepare_arguments(member: Walker, run: object, steps: object) -> LifecycleError | None:
    """``prepare``'s own arguments for one member: the refusal (audited), or None when fine."""
    try:
        if member.state is not State.WARMED_UP:
            member._check_callable(Trigger.WARM_UP, run)
        member._check_steps(Trigger.REFRESH, steps)
    except InvalidConfigError as exc:
        trigger = exc.trigger if isinstance(exc.trigger, Trigger) else Trigger.WARM_UP
        return member._refuse(exc, trigger)
    return None


def check_shapes_audited(members: Sequence[Walker], shapes: object) -> list[dict[str, Any]] | None:
    """``shapes`` as declared buckets (None: none given); a bad one is refused, audited."""
    if shapes is None:
        return None
    try:
        return check_shapes(shapes, module=members[0].name)
    except InvalidConfigError as exc:
        raise members[0]._refuse(exc, Trigger.WARM_UP) from None


def prepare(
    members: Sequence[Walker],
    run: Callable[..., object],
    target: object,
    steps: int | None,
    shapes: object,
    *,
    on_member: OnMember | None = None,
    on_joint: OnJoint | None = None,
) -> None:
    """Take every member to WarmedUp (see the module docstring)."""
    for member in members:
        refusal = check_prepare_arguments(member, run, steps)
        if refusal is not None:
            _raise(member, refusal, on_member)
    planned = check_shapes_audited(members, shapes)
    for member in members:
        member._context.set_serving_steps(steps)
        member._decide_sharing(planned)
    if all(member.state is State.WARMED_UP for member in members):
        if planned is not None:
            cold = [shape for shape in planned if not members[0]._book.is_warm(shape)]
            if cold:
                warm_together(members, run, target, cold, on_member=on_member, on_joint=on_joint)
        return
    for member in members:
        for trigger in member._remaining_path():
            try:
                if trigger is Trigger.MOUNT_CACHE:
                    member.mount_cache()
                elif trigger is Trigger.COMPILE:
                    member._compile_for(run, target, planned)
            except LifecycleError as exc:
                _raise(member, exc, on_member)
    cold_members = [member for member in members if member.state is not State.WARMED_UP]
    warm_together(cold_members, run, target, planned, on_member=on_member, on_joint=on_joint)


def warm_together(
    members: Sequence[Walker],
    run: Callable[..., object],
    target: object,
    planned: list[dict[str, Any]] | None,
    *,
    on_member: OnMember | None = None,
    on_joint: OnJoint | None = None,
) -> None:
    """One warm-up transition per member around one shared warm-up (see the module docstring).
    Without ``planned``, the plan's declared buckets are warmed again (after ``invalidate``),
    else the implicit bucket."""
    if not members:
        return
    # A joint warm-up enters every member's transition in turn: refuse before entering any.
    # (One member's own transition refuses by itself.)
    for member in members if len(members) > 1 else ():
        if not member.can(Trigger.WARM_UP):
            # Refused (and audited) by the machine before any member is entered.
            try:
                member._transition(Trigger.WARM_UP, lambda step: None)
            except LifecycleError as exc:
                _raise(member, exc, on_member)
    plan: Plan
    if planned is not None:
        plan = list(planned)
    elif members[0]._book.any_declared:
        plan = _rewarm_plan(members[0], run)
    else:
        plan = [None]  # a plain warm-up (again)
    call_at = call_at_shape(run, target)
    results: list[MemberWarmup] = []

    def work_of(index: int) -> Callable[[Any], None]:
        member = members[index]

        def inner() -> list[MemberWarmup]:
            if index + 1 < len(members):
                members[index + 1]._transition(Trigger.WARM_UP, work_of(index + 1))
            else:
                results.extend(run_warmup(members, call_at, plan).members)
            return results

        def work(step: Any) -> None:
            member._warmup_step(step, run, plan, inner, index, target)

        return work

    try:
        members[0]._transition(Trigger.WARM_UP, work_of(0))
    except LifecycleError as exc:
        if on_joint is None:
            raise
        raise on_joint(members, exc) from exc


def _rewarm_plan(member: Walker, run: Callable[..., object]) -> Plan:
    """A warm-up that names no shapes, of a lifecycle with declared buckets: the buckets of the
    plan that are cold (all of them when none is: warm everything again). A declared bucket is
    warmed with ``run(target, shape)``, the implicit one with ``run(target)``, so the implicit
    one is left out when ``run`` needs a shape: it stays cold and ``ready`` says so, never a
    warm-up that fails on the callable's arity."""
    rows = member._book.plan()
    # Declared buckets first, the implicit one after them (the order a plan was built in).
    rows.sort(key=lambda row: row[0] is None)
    cold: Plan = [shape for shape, warm in rows if not warm]
    plan: Plan = cold or [shape for shape, _ in rows]
    if None in plan and not _takes(run, 1):
        plan = [shape for shape in plan if shape is not None]
    return plan or [None]


def _takes(run: Callable[..., object], count: int) -> bool:
    """Whether ``run`` can be called with ``count`` positional arguments (True when unknown)."""
    try:
        inspect.signature(run).bind(*range(count))
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): let the call decide
        return True
    return True


def _raise(member: Member, error: LifecycleError, on_member: OnMember | None) -> None:
    if on_member is None:
        raise error
    raise on_member(member, error) from error


__all__ = [
    "Walker", "check_prepare_arguments", "check_shapes_audited", "prepare", "warm_together",
]
