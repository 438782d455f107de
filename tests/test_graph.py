"""The diagrams are drawn from the states table: every legal edge, nothing else."""

from __future__ import annotations

import re

import pytest
from transitions.extensions import GraphMachine

from states import LifecyclePolicy, State, transitions_for
from states.graph import dot, edges, mermaid, render

POLICIES = [LifecyclePolicy(cache_dit=c, compile=k) for c in (True, False) for k in (True, False)]
_MERMAID_EDGE = re.compile(r"^\s*(\w+) --> (\w+): (.+)$")
_DOT_EDGE = re.compile(r'^\s*(\w+) -> (\w+) \[label="(.+)"\];$')


def _parsed(text: str, pattern: re.Pattern[str]) -> set[tuple[str, str, str]]:
    found = set()
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            source, dest, triggers = match.groups()
            found.update((trigger.strip(), source, dest) for trigger in triggers.split("|"))
    return found


def _table(policy: LifecyclePolicy) -> set[tuple[str, str, str]]:
    """The legal edges from states a module can be in under ``policy``."""
    return {
        (edge.trigger.value, edge.source.value, edge.dest.value)
        for edge in transitions_for(policy)
        if edge.source in policy.path
    }


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_mermaid_and_dot_draw_exactly_the_table(policy):
    assert _parsed(mermaid(policy), _MERMAID_EDGE) == _table(policy)
    assert _parsed(dot(policy), _DOT_EDGE) == _table(policy)
    assert "[*] --> Loaded" in mermaid(policy)
    assert "start -> Loaded;" in dot(policy)
    assert str(policy) in mermaid(policy) and str(policy) in dot(policy)


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_same_edges_as_transitions_graph_machine(policy):
    """transitions' own Mermaid drawing of the same table agrees with ours."""

    class Model:
        pass

    model = Model()
    GraphMachine(
        model=model,
        states=[state.value for state in State],
        transitions=[
            {"trigger": e.trigger.value, "source": e.source.value, "dest": e.dest.value}
            for e in transitions_for(policy)
        ],
        initial=State.LOADED.value,
        auto_transitions=False,
        graph_engine="mermaid",
    )
    theirs = _parsed(model.get_graph().draw(None), _MERMAID_EDGE)
    reachable = {state.value for state in policy.path}
    assert {edge for edge in theirs if edge[1] in reachable} == _parsed(mermaid(policy), _MERMAID_EDGE)


def test_default_diagram_has_no_trap_edge():
    text = mermaid(LifecyclePolicy())
    assert "Loaded --> Compiled" not in text  # compile before mount_cache is illegal
    assert "Loaded --> WarmedUp" not in text
    assert "Compiled --> CacheMounted" not in text
    assert "Loaded --> CacheMounted: mount_cache" in text


def test_unreachable_states_are_left_out():
    no_compile = LifecyclePolicy(compile=False)
    assert "Compiled" not in mermaid(no_compile).replace("compile=False", "")
    assert {source for source, _dest, _t in edges(no_compile)} == set(no_compile.path)


def test_render_formats():
    policy = LifecyclePolicy()
    assert render(policy) == mermaid(policy)
    assert render(policy, "dot") == dot(policy)
    assert dot(policy).startswith("digraph lifecycle {") and dot(policy).endswith("}\n")
    with pytest.raises(ValueError, match="unknown diagram format 'svg'"):
        render(policy, "svg")


def test_request_is_drawn_from_the_table_in_every_policy():
    for policy in POLICIES:
        request_edges = [(s, d) for s, d, triggers in edges(policy) if "request" in triggers]
        from_table = [(e.source, e.dest) for e in transitions_for(policy) if e.trigger.value == "request"]
        assert request_edges == from_table == [(State.WARMED_UP, State.WARMED_UP)]
