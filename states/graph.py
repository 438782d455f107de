"""Diagrams of a policy's legal transitions (Mermaid and Graphviz DOT), drawn from
``states.transitions_for``: the same table the lifecycle and the verifier use.

Written here rather than through transitions' ``GraphMachine`` so the text is stable (no
active-state styling, no title block) and DOT needs no pygraphviz; the tests check that the
edges match what ``GraphMachine(graph_engine="mermaid")`` draws from the same table.
"""

from __future__ import annotations

from collections import deque

from states import LifecyclePolicy, State, Transition, transitions_for

FORMATS = ("mermaid", "dot")
INITIAL = State.LOADED


def edges(policy: LifecyclePolicy) -> list[tuple[State, State, tuple[str, ...]]]:
    """``(source, dest, triggers)`` for each pair of states joined by a legal transition,
    in table order, keeping only states a module can reach from Loaded under ``policy``.

    Args:
        policy: the policy whose table is drawn.

    Example::

        for source, dest, triggers in edges(LifecyclePolicy()):
            print(source.value, "->", dest.value, triggers)
    """
    table = transitions_for(policy)
    reachable = _reachable(table)
    grouped: dict[tuple[State, State], list[str]] = {}
    for edge in table:
        if edge.source in reachable:
            grouped.setdefault((edge.source, edge.dest), []).append(edge.trigger.value)
    # Sources in path order, so the diagram reads left to right.
    order = {state: index for index, state in enumerate(State)}
    pairs = sorted(grouped, key=lambda pair: order[pair[0]])
    return [(source, dest, tuple(grouped[(source, dest)])) for source, dest in pairs]


def _reachable(table: tuple[Transition, ...]) -> set[State]:
    seen = {INITIAL}
    queue = deque([INITIAL])
    while queue:
        state = queue.popleft()
        for edge in table:
            if edge.source is state and edge.dest not in seen:
                seen.add(edge.dest)
                queue.append(edge.dest)
    return seen


def mermaid(policy: LifecyclePolicy) -> str:
    """A Mermaid ``stateDiagram-v2`` of ``policy``'s legal transitions: what ``python -m
    lifecycle graph`` prints, and the diagram on the docs' concepts page.

    Args:
        policy: the policy whose table is drawn.

    Example:
        >>> print(mermaid(LifecyclePolicy()).splitlines()[4])
            Loaded --> CacheMounted: mount_cache
    """
    lines = [
        "stateDiagram-v2",
        f"    %% dit-lifecycle legal transitions, policy {policy}",
        "    direction LR",
        f"    [*] --> {INITIAL.value}",
    ]
    for source, dest, triggers in edges(policy):
        lines.append(f"    {source.value} --> {dest.value}: {' | '.join(triggers)}")
    return "\n".join(lines) + "\n"


def dot(policy: LifecyclePolicy) -> str:
    """A Graphviz DOT digraph of ``policy``'s legal transitions (``graph --format dot``); render it
    with ``dot -Tsvg``.

    Args:
        policy: the policy whose table is drawn.

    Example::

        Path("lifecycle.dot").write_text(dot(LifecyclePolicy(compile=False)))
    """
    lines = [
        "digraph lifecycle {",
        f'    label="dit-lifecycle legal transitions, policy {policy}";',
        "    rankdir=LR;",
        "    node [shape=box, style=rounded];",
        "    start [shape=point, label=\"\"];",
        f"    start -> {INITIAL.value};",
    ]
    for source, dest, triggers in edges(policy):
        lines.append(f'    {source.value} -> {dest.value} [label="{" | ".join(triggers)}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(policy: LifecyclePolicy, fmt: str = "mermaid") -> str:
    """The diagram of ``policy`` in ``fmt`` (one of ``FORMATS``: ``"mermaid"``, ``"dot"``).

    Args:
        policy: the policy whose table is drawn.
        fmt: ``"mermaid"`` or ``"dot"``.

    Raises:
        ValueError: an unknown format.

    Example::

        text = render(LifecyclePolicy(), fmt="dot")
    """
    if fmt == "mermaid":
        return mermaid(policy)
    if fmt == "dot":
        return dot(policy)
    raise ValueError(f"unknown diagram format {fmt!r}; choose one of {', '.join(FORMATS)}")


__all__ = ["FORMATS", "dot", "edges", "mermaid", "render"]
