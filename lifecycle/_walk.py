"""A pipeline's walk to WarmedUp: its members' own steps, in order, and one joint warm-up.

- ``prepare``: check every member's arguments before anything moves (a refusal is audited);
  then each member takes its prepare settings and mounts and compiles along its policy's path
  (``ModuleLifecycle._begin_prepare`` and ``_advance``, the steps its own ``prepare`` takes);
  then every cold member is warmed by one joint warm-up (``warm_together``). Already WarmedUp,
  only the declared buckets not warm yet are warmed.
- ``warm_together``: one ``warm_up`` transition per member around one shared warm-up: member
  i's transition runs member i+1's (``_warm_step``), the innermost runs the warm-up
  (``lifecycle._warmup.run_warmup``), and each member applies its own part of the result as the
  transitions return. A failure fails every member's warm-up (each stays where it was, each
  audits ``failed`` with the same cause).

The walk calls its members' steps; a lone ``ModuleLifecycle`` walks itself through it too. The
caller holds every member's lock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol

from lifecycle._errors import LifecycleError
from lifecycle._member import Member
from lifecycle._preparing import check_prepare_arguments, check_shapes_audited
from lifecycle._warmup import Buckets, MemberWarmup, buckets_to_warm, call_at_shape, run_warmup
from states import State, Trigger

# How a pipeline turns one member's failure into its own error.
OnMember = Callable[[Member, LifecycleError], LifecycleError]
OnJoint = Callable[[Sequence[Member], LifecycleError], LifecycleError]


def _as_is(_members: object, error: LifecycleError) -> LifecycleError:
    """A lone lifecycle's errors are its own."""
    return error


def _raise(error: LifecycleError, cause: LifecycleError) -> NoReturn:
    if error is cause:
        raise error
    raise error from cause


class Walker(Member, Protocol):
    """A member the walk can move (``ModuleLifecycle``): its public steps and the prepare
    steps it takes itself."""

    def can(self, trigger: Trigger) -> bool: ...

    def _refuse(self, error: LifecycleError, trigger: Trigger) -> LifecycleError: ...

    def _begin_prepare(self, steps: int | None, declared: list[dict[str, Any]] | None) -> None: ...

    def _advance(
        self, run: Callable[..., object], target: object, declared: list[dict[str, Any]] | None
    ) -> None: ...

    def _warm_step(
        self, run: object, buckets: Buckets, inner: Callable[[], MemberWarmup], target: object = None
    ) -> None: ...


def prepare(
    members: Sequence[Walker],
    run: Callable[..., object],
    target: object,
    steps: int | None,
    shapes: object,
    *,
    on_member: OnMember = _as_is,
    on_joint: OnJoint = _as_is,
) -> None:
    """Take every member to WarmedUp (see the module docstring)."""
    for member in members:
        refusal = check_prepare_arguments(member, run, steps)
        if refusal is not None:
            _raise(on_member(member, refusal), refusal)
    declared = check_shapes_audited(members, shapes)
    for member in members:
        member._begin_prepare(steps, declared)
    if all(member.state is State.WARMED_UP for member in members):
        if declared is not None:
            book = members[0]._serving_state.book
            cold = [shape for shape in declared if not book.is_warm(shape)]
            if cold:
                warm_together(members, run, target, cold, on_member=on_member, on_joint=on_joint)
        return
    for member in members:
        try:
            member._advance(run, target, declared)
        except LifecycleError as exc:
            _raise(on_member(member, exc), exc)
    cold_members = [member for member in members if member.state is not State.WARMED_UP]
    warm_together(cold_members, run, target, declared, on_member=on_member, on_joint=on_joint)


def warm_together(
    members: Sequence[Walker],
    run: Callable[..., object],
    target: object,
    declared: list[dict[str, Any]] | None,
    *,
    on_member: OnMember = _as_is,
    on_joint: OnJoint = _as_is,
) -> None:
    """One warm-up transition per member around one shared warm-up (see the module docstring).
    Without ``declared``, the declared buckets are warmed again (after ``invalidate``), else the
    implicit bucket."""
    if not members:
        return
    # A joint warm-up enters every member's transition in turn: refuse before entering any.
    # (One member's own transition refuses by itself.)
    for member in members if len(members) > 1 else ():
        if not member.can(Trigger.WARM_UP):
            try:  # refused (and audited) by the machine before any work
                member._warm_step(run, [None], _never)
            except LifecycleError as exc:
                _raise(on_member(member, exc), exc)
    buckets = buckets_to_warm(members[0]._serving_state.book, run, declared)
    call_at = call_at_shape(run, target)
    results: list[MemberWarmup] = []

    def inner_of(index: int) -> Callable[[], MemberWarmup]:
        def inner() -> MemberWarmup:
            if index + 1 < len(members):
                members[index + 1]._warm_step(run, buckets, inner_of(index + 1), target)
            else:
                results.extend(run_warmup(members, call_at, buckets).members)
            return results[index]

        return inner

    try:
        members[0]._warm_step(run, buckets, inner_of(0), target)
    except LifecycleError as exc:
        _raise(on_joint(members, exc), exc)


def _never() -> MemberWarmup:
    raise AssertionError("an illegal warm_up is refused before its work runs")


__all__ = ["Walker", "prepare", "warm_together"]
