"""The transitions machines that hold each lifecycle's state.

One ``transitions.Machine`` per policy, shared by every lifecycle with that policy: a machine
per lifecycle costs about three times the memory and creates reference cycles, and a
``LockedMachine`` takes one lock for all its models (a compile on one module would block every
other). Each lifecycle locks itself instead (``ModuleLifecycle._lock``), and the machine only
ever sees a small ``StateHolder``, never the ``nn.Module``: transitions silently skips binding a
trigger whose name the model already has (``nn.Module.compile`` exists).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from typing import Any

from transitions import Machine

from states import LifecyclePolicy, State, Trigger, transitions_for

# transitions logs every trigger at INFO; under a host's INFO root logger that costs ~5x.
logging.getLogger("transitions.core").setLevel(logging.WARNING)

_machines: dict[LifecyclePolicy, Machine] = {}
_machines_lock = threading.Lock()


class StateHolder:
    """The model object transitions binds triggers to. Holds nothing but the state's value."""

    state: str


def machine_for(policy: LifecyclePolicy) -> Machine:
    """The shared machine for ``policy``, built once from the states table."""
    with _machines_lock:
        machine = _machines.get(policy)
        if machine is None:
            # States by their string values, not the Enum: transitions reads an Enum state's
            # name through enum's descriptor a dozen times per trigger (~4 us of ~30).
            machine = Machine(
                model=None,
                states=[state.value for state in State],
                transitions=[
                    {
                        "trigger": edge.trigger.value,
                        "source": edge.source.value,
                        "dest": edge.dest.value,
                    }
                    for edge in transitions_for(policy)
                ],
                initial=State.LOADED.value,
                auto_transitions=False,  # no to_<State>() back doors
                ignore_invalid_triggers=False,
                send_event=False,
                model_attribute="state",
            )
            _machines[policy] = machine
        return machine


def attach(policy: LifecyclePolicy, owner: object) -> StateHolder:
    """A new holder in Loaded on the policy's machine, detached when ``owner`` is collected.

    The machine keeps strong references to its models; the finalizer removes the holder so
    that a dropped lifecycle does not leak.
    """
    machine = machine_for(policy)
    holder = StateHolder()
    with _machines_lock:
        machine.add_model(holder, initial=State.LOADED.value)
        _drain_detached()
    weakref.finalize(owner, _detach, machine, holder)
    return holder


# Finalizers run whenever the garbage collector does: also inside add_model above, on the thread
# that holds _machines_lock (a blocking acquire there deadlocked). They only queue the removal;
# whoever holds the lock next drains the queue.
_detached: deque[tuple[Machine, StateHolder]] = deque()


def _detach(machine: Machine, holder: StateHolder) -> None:
    _detached.append((machine, holder))
    if _machines_lock.acquire(blocking=False):
        try:
            _drain_detached()
        finally:
            _machines_lock.release()


def _drain_detached() -> None:
    """Remove queued holders from their machines; the caller holds _machines_lock."""
    while _detached:
        machine, holder = _detached.popleft()
        machine.remove_model(holder)


def fire(holder: StateHolder, trigger: Trigger) -> Any:
    """Move ``holder`` along ``trigger`` (already checked legal against the table)."""
    return getattr(holder, trigger.value)()
