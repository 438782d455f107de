"""The transitions machine that runs every lifecycle's transitions.

One ``transitions.Machine`` per policy, built from the states table, decides legality: a trigger
with no edge from the current state raises its ``MachineError``. The machine's own callbacks run
each attempt (an ``Attempt``, supplied by whoever fires the trigger):

- ``before_state_change`` -> ``attempt.run()``: the work. transitions moves the state only after
  ``before`` returns, so work that raises leaves the old state (transitions 0.9.3, checked).
- ``after_state_change`` -> ``attempt.committed()``: the state has moved; the audit is written.
- ``on_exception`` -> ``attempt.aborted(error)``: a refusal (``MachineError``, a bad argument) or a
  failure; it audits and raises the lifecycle's typed error. (Not ``finalize_event``: exceptions
  there are only logged, and a lost audit write must never be silent.)

Models are never added to the machine: ``Event.trigger(model)`` needs only the model's ``state``
attribute, so the machine holds no reference to any lifecycle (nothing to detach, no cycles, no
per-lifecycle memory beyond a two-slot holder), and transitions never binds methods onto an
``nn.Module`` (``nn.Module.compile`` exists). The caller serialises triggers per model with its
own lock (``lifecycle._locking``): a ``LockedMachine`` would take one lock for all models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from types import MappingProxyType
from typing import Any, Protocol

from transitions import EventData, Machine, MachineError
from transitions import State as MachineState

from states import LifecyclePolicy, State, Trigger, transitions_for

__all__ = [
    "Attempt", "Events", "Firing", "MachineError", "NoEdge", "StateHolder", "events_for", "machine_for",
]


class Attempt(Protocol):
    """One trigger attempt, driven by the machine's callbacks."""

    def run(self) -> None:
        """The work, before the state moves; raising leaves the state unchanged."""

    def committed(self) -> None:
        """The state has moved."""

    def aborted(self, error: BaseException) -> None:
        """The trigger was refused or the work failed (state unchanged); must raise."""


class StateHolder:
    """The model object the machine moves: nothing but the state's value (a str)."""

    __slots__ = ("__weakref__", "state")

    def __init__(self) -> None:
        self.state = State.LOADED.value


def _run(event: EventData) -> None:
    event.kwargs["attempt"].run()


def _committed(event: EventData) -> None:
    event.kwargs["attempt"].committed()


def _aborted(event: EventData) -> None:
    attempt = event.kwargs.get("attempt")
    if attempt is None or event.error is None:  # pragma: no cover - transitions always passes both
        raise RuntimeError("lifecycle machine: trigger fired without an attempt")
    attempt.aborted(event.error)


# transitions logs each callback run and each state entered or left at INFO: four records per
# trigger, which under a host's INFO root logger cost several times the trigger. The lifecycle's audit is
# the record of its transitions, so its own machines skip those records (overriding the methods
# that write them); transitions' logger, and every other machine in the process, stay as the
# host configured them.
class _QuietState(MachineState):
    """A state whose enter and exit run their callbacks without an INFO record each (and, as
    the lifecycle's states have none, without a call each)."""

    def enter(self, event_data: EventData) -> None:
        if self.on_enter:
            event_data.machine.callbacks(self.on_enter, event_data)

    def exit(self, event_data: EventData) -> None:
        if self.on_exit:
            event_data.machine.callbacks(self.on_exit, event_data)


class _QuietMachine(Machine):
    """transitions' Machine, without an INFO record per callback it runs."""

    state_cls = _QuietState

    def callbacks(self, funcs: Iterable[Any], event_data: EventData) -> None:
        # Every callback of a lifecycle machine is one of this module's functions taking the
        # event (send_event=True): called as it is, never looked up by name on a model first.
        for func in funcs:
            func(event_data)


@cache
def machine_for(policy: LifecyclePolicy) -> Machine:
    """The machine for ``policy``, built once from the states table."""
    return _QuietMachine(
        model=None,
        # States by their string values: transitions reads an Enum state's name through enum's
        # descriptor a dozen times per trigger.
        states=[state.value for state in State],
        transitions=[
            {"trigger": edge.trigger.value, "source": edge.source.value, "dest": edge.dest.value}
            for edge in transitions_for(policy)
        ],
        initial=State.LOADED.value,
        auto_transitions=False,  # no to_<State>() back doors
        ignore_invalid_triggers=False,
        send_event=True,
        before_state_change=[_run],
        after_state_change=[_committed],
        on_exception=[_aborted],
        model_attribute="state",
    )


class Firing(Protocol):
    """What fires one trigger on a holder: the machine's ``Event``, or ``NoEdge``."""

    def trigger(self, model: object, *args: Any, **kwargs: Any) -> bool: ...


class NoEdge:
    """A trigger the policy has no edge for at all (compile under compile=False): the machine
    has no such event, so it is refused the way the machine refuses any illegal one."""

    __slots__ = ("_trigger",)

    def __init__(self, trigger: Trigger) -> None:
        self._trigger = trigger

    def trigger(self, model: object, *args: Any, **kwargs: Any) -> bool:
        attempt: Attempt = kwargs["attempt"]
        state = getattr(model, "state", None)
        attempt.aborted(MachineError(f"Can't trigger event {self._trigger.value} from state {state}!"))
        return False


Events = Mapping[Trigger, Firing]


@cache
def events_for(policy: LifecyclePolicy) -> Events:
    """What fires each trigger of ``policy``, every trigger included (a lifecycle looks it up
    once, at construction: hashing the policy on every trigger costs more than the lookup).
    ``events[trigger].trigger(holder, attempt=attempt)`` runs ``attempt`` as ``trigger`` on
    ``holder``: legality, work, move, audit."""
    events = machine_for(policy).events
    by_trigger: dict[Trigger, Firing] = {
        trigger: events[trigger.value] if trigger.value in events else NoEdge(trigger) for trigger in Trigger
    }
    return MappingProxyType(by_trigger)
