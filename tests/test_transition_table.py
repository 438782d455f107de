"""Every (policy, state, trigger) on a real lifecycle: legal triggers reach the table's state,
illegal ones raise IllegalTransitionError and change nothing. The expectations come from
``states.transitions_for``; the table is not re-typed here."""

from __future__ import annotations

import itertools
import warnings

import pytest
from conftest import FAST_COMPILE
from torch import nn

from lifecycle import IllegalTransitionError, LifecyclePolicy, ModuleLifecycle, State, Trigger
from lifecycle._machine import machine_for
from lifecycle.testing import NoopBackend, NoopCache
from states import allowed_triggers, destination, remaining_path, transitions_for

POLICIES = [LifecyclePolicy(cache_dit=c, compile=k) for c, k in itertools.product((True, False), repeat=2)]


def _no_call(module: object) -> None:
    # Warm-up that calls nothing: legality is what these tests check, not coverage.
    return None


def _drive(lc: ModuleLifecycle, target: State) -> None:
    path = lc.policy.path
    for state in path[1 : path.index(target) + 1]:
        trigger = next(
            e.trigger for e in transitions_for(lc.policy) if e.source is lc.state and e.dest is state
        )
        _fire(lc, trigger)
    assert lc.state is target


def _fire(lc: ModuleLifecycle, trigger: Trigger) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if trigger is Trigger.WARM_UP:
            lc.warm_up(_no_call)
        elif trigger is Trigger.REQUEST:
            with lc.request():
                pass
        else:
            getattr(lc, trigger.value)()


CASES = [
    (policy, state, trigger)
    for policy in POLICIES
    for state in policy.path
    for trigger in Trigger
]


@pytest.mark.parametrize(("policy", "state", "trigger"), CASES, ids=str)
def test_every_trigger_in_every_reachable_state(policy, state, trigger, flux, cache_config, audit_events):
    lc = ModuleLifecycle(
        flux, policy=policy, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE
    )
    _drive(lc, state)
    history_before = len(lc.history)
    expected = destination(policy, state, trigger)
    assert lc.allowed_triggers() == allowed_triggers(policy, state)
    if trigger is Trigger.REQUEST:
        # A request is the table's trigger too, audited as a lifecycle.request event (the
        # transition seq and history stay as they were).
        if expected is None:
            with pytest.raises(IllegalTransitionError, match="prepare") as info:
                _fire(lc, trigger)
            assert info.value.trigger is Trigger.REQUEST
        else:
            _fire(lc, trigger)
        assert lc.state is state
        (event,) = audit_events.of("lifecycle.request")
        assert event["outcome"] == ("refused" if expected is None else "ok")
        assert len(lc.history) == history_before
        return
    if expected is None:
        with pytest.raises(IllegalTransitionError) as info:
            _fire(lc, trigger)
        assert lc.state is state
        message = str(info.value)
        assert lc.name in message and state.value in message and trigger.value in message
        assert "Allowed now:" in message
        last = audit_events.of("lifecycle.transition")[-1]
        assert (last["outcome"], last["source"], last["dest"]) == ("refused", state.value, state.value)
    else:
        _fire(lc, trigger)
        assert lc.state is expected
        last = audit_events.of("lifecycle.transition")[-1]
        assert (last["outcome"], last["source"], last["dest"]) == ("ok", state.value, expected.value)
    assert len(lc.history) == history_before + 1
    assert [e["seq"] for e in audit_events.of("lifecycle.transition")] == list(
        range(1, len(lc.history) + 1)
    )


def test_compile_before_mount_is_refused_with_the_fix(flux, cache_config):
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    with pytest.raises(IllegalTransitionError) as info:
        lc.compile()
    assert lc.state is State.LOADED
    assert "mount_cache()" in str(info.value) and "prepare(run)" in str(info.value)
    assert flux._compiled_call_impl is None  # nothing was compiled


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_the_machine_has_exactly_the_tables_triggers_and_holds_no_lifecycle(policy):
    machine = machine_for(policy)
    # No to_<State>() back doors: the machine's events are the table's triggers, nothing else.
    assert set(machine.events) == {e.trigger.value for e in transitions_for(policy)}
    for trigger in {e.trigger for e in transitions_for(policy)}:
        event = machine.events[trigger.value]
        edges = {(src, t.dest) for src, ts in event.transitions.items() for t in ts}
        table = {(e.source.value, e.dest.value) for e in transitions_for(policy) if e.trigger is trigger}
        assert edges == table
    ModuleLifecycle(nn.Linear(2, 2), policy=policy, backend=NoopBackend(), cache_adapter=NoopCache())
    assert machine.models == []  # lifecycles are never added: nothing to detach, nothing kept alive


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_the_remaining_path_walks_the_table_to_warmed_up(policy):
    """From every state on the path, firing ``remaining_path``'s triggers in order through the
    table reaches WarmedUp, each one legal where it is fired."""
    for state in policy.path:
        here = state
        for trigger in remaining_path(policy, state):
            dest = destination(policy, here, trigger)
            assert dest is not None, (state, trigger, here)
            here = dest
        assert here is State.WARMED_UP
    assert remaining_path(policy, State.WARMED_UP) == ()
    assert len(remaining_path(policy, State.LOADED)) == len(policy.path) - 1
