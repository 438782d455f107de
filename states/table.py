"""State enum, triggers, policy, and the legal-transition table derived from a policy.

The table is data: ``transitions_for(policy)`` is the single source of truth used by the
lifecycle's machine, the audit verifier and the diagram. Nothing else re-types the rules.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import Enum
from functools import cache


class State(str, Enum):
    """Where a module is in its life. Values are the names written to audit logs.

    Example:
        >>> State("WarmedUp") is State.WARMED_UP, str(State.CACHE_MOUNTED)
        (True, 'CacheMounted')
    """

    LOADED = "Loaded"
    CACHE_MOUNTED = "CacheMounted"
    COMPILED = "Compiled"
    WARMED_UP = "WarmedUp"

    def __str__(self) -> str:
        return self.value


class Trigger(str, Enum):
    """What a caller asks for. Values are the method names on ``ModuleLifecycle``.

    Example:
        >>> Trigger("mount_cache") is Trigger.MOUNT_CACHE, str(Trigger.WARM_UP)
        (True, 'warm_up')
    """

    MOUNT_CACHE = "mount_cache"
    COMPILE = "compile"
    WARM_UP = "warm_up"
    REFRESH = "refresh"
    INVALIDATE = "invalidate"
    RESET = "reset"
    # Serve one request: legal only in WarmedUp, and it stays there.
    REQUEST = "request"

    def __str__(self) -> str:
        return self.value


# How far along the path a state is; used to order pipeline members ("least advanced").
PROGRESS: dict[State, int] = {
    State.LOADED: 0,
    State.CACHE_MOUNTED: 1,
    State.COMPILED: 2,
    State.WARMED_UP: 3,
}
"""How far along the path each state is (Loaded 0 ... WarmedUp 3); orders pipeline members.

Example::

    least = min(states, key=PROGRESS.__getitem__)
    behind = PROGRESS[State.COMPILED] < PROGRESS[State.WARMED_UP]
"""


@dataclass(frozen=True)
class LifecyclePolicy:
    """Which accelerations a lifecycle applies: the cache-dit step cache and/or torch.compile.

    The policy decides the path (``Loaded -> CacheMounted -> Compiled -> WarmedUp`` with both,
    shorter without) and the table of legal transitions (``transitions_for``). Frozen and
    hashable: one table, and one state machine, per policy.

    Args:
        cache_dit: mount cache-dit's DBCache step cache (``mount_cache``) before compiling.
        compile: ``torch.compile`` the module (``compile``) before warming up.

    Example:
        >>> LifecyclePolicy(cache_dit=False).path
        (<State.LOADED: 'Loaded'>, <State.COMPILED: 'Compiled'>, <State.WARMED_UP: 'WarmedUp'>)
    """

    cache_dit: bool = True
    compile: bool = True

    @property
    def path(self) -> tuple[State, ...]:
        """The states a module passes through, in order, from Loaded to WarmedUp."""
        steps = [State.LOADED]
        if self.cache_dit:
            steps.append(State.CACHE_MOUNTED)
        if self.compile:
            steps.append(State.COMPILED)
        steps.append(State.WARMED_UP)
        return tuple(steps)

    def as_dict(self) -> dict[str, bool]:
        """The policy as the audit writes it: ``{"cache_dit": True, "compile": True}``."""
        return {"cache_dit": self.cache_dit, "compile": self.compile}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> LifecyclePolicy:
        """The policy an audit event recorded (``as_dict``'s output); missing keys take the defaults.

        Raises:
            ValueError: an unknown key, or a value that is not a bool.
        """
        unknown = set(data) - {"cache_dit", "compile"}
        if unknown:
            raise ValueError(f"unknown policy keys {sorted(unknown)}; expected cache_dit, compile")
        values = {key: data[key] for key in ("cache_dit", "compile") if key in data}
        for key, value in values.items():
            if not isinstance(value, bool):
                raise ValueError(f"policy key {key!r} must be a bool, got {value!r}")
        return cls(**values)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"cache_dit={self.cache_dit},compile={self.compile}"


@dataclass(frozen=True)
class Transition:
    """One legal edge of the table: ``trigger`` moves a module from ``source`` to ``dest``.

    Example:
        >>> edge = transitions_for(LifecyclePolicy())[0]
        >>> edge.trigger.value, edge.source.value, edge.dest.value
        ('mount_cache', 'Loaded', 'CacheMounted')
    """

    trigger: Trigger
    source: State
    dest: State


# The trigger that enters each state on the forward path.
_ENTERED_BY: dict[State, Trigger] = {
    State.CACHE_MOUNTED: Trigger.MOUNT_CACHE,
    State.COMPILED: Trigger.COMPILE,
    State.WARMED_UP: Trigger.WARM_UP,
}


@cache
def transitions_for(policy: LifecyclePolicy) -> tuple[Transition, ...]:
    """Every legal transition under ``policy``: the table the lifecycle, the audit verifier and
    the diagrams are built from. Any (state, trigger) pair not in it is illegal.

    Args:
        policy: which accelerations apply.

    Returns:
        The edges, forward path first, then ``warm_up`` again, ``refresh``, ``invalidate``,
        ``reset`` from every state, and ``request``. Cached per policy.

    Example:
        >>> [(t.trigger.value, t.dest.value) for t in transitions_for(LifecyclePolicy())][:3]
        [('mount_cache', 'CacheMounted'), ('compile', 'Compiled'), ('warm_up', 'WarmedUp')]
    """
    path = policy.path
    edges: list[Transition] = []
    for source, dest in itertools.pairwise(path):
        edges.append(Transition(_ENTERED_BY[dest], source, dest))
    # Warming up again re-runs the warm-up callable (e.g. new shapes); it stays WarmedUp.
    edges.append(Transition(Trigger.WARM_UP, State.WARMED_UP, State.WARMED_UP))
    if policy.cache_dit:
        # A refresh rebuilds cache-dit's context in place: legal wherever the cache is mounted.
        for state in path[path.index(State.CACHE_MOUNTED):]:
            edges.append(Transition(Trigger.REFRESH, state, state))
    # Weights changed: the compiled code stays valid, warm-up must run again.
    edges.append(Transition(Trigger.INVALIDATE, State.WARMED_UP, path[-2]))
    for state in State:
        edges.append(Transition(Trigger.RESET, state, State.LOADED))
    edges.append(Transition(Trigger.REQUEST, State.WARMED_UP, State.WARMED_UP))
    return tuple(edges)


@cache
def _index(policy: LifecyclePolicy) -> dict[tuple[State, Trigger], State]:
    return {(edge.source, edge.trigger): edge.dest for edge in transitions_for(policy)}


def destination(policy: LifecyclePolicy, source: State, trigger: Trigger) -> State | None:
    """Where ``trigger`` leads from ``source``, or None when it is illegal.

    Args:
        policy: which accelerations apply.
        source: the state the module is in (a ``State`` or its name).
        trigger: the trigger asked for (a ``Trigger`` or its name).

    Raises:
        ValueError: ``source`` or ``trigger`` is not a state or trigger name.

    Example:
        >>> destination(LifecyclePolicy(), State.LOADED, Trigger.COMPILE) is None   # mount first
        True
        >>> destination(LifecyclePolicy(cache_dit=False), State.LOADED, Trigger.COMPILE)
        <State.COMPILED: 'Compiled'>
    """
    # Members pass straight through (every trigger takes this path); names are converted.
    if source.__class__ is not State:
        source = State(source)
    if trigger.__class__ is not Trigger:
        trigger = Trigger(trigger)
    return _index(policy).get((source, trigger))


@cache
def allowed_triggers(policy: LifecyclePolicy, state: State) -> tuple[Trigger, ...]:
    """Triggers legal in ``state``, in declaration order (what ``ModuleLifecycle.allowed_triggers``
    and every ``IllegalTransitionError`` message list).

    Args:
        policy: which accelerations apply.
        state: the state the module is in (a ``State`` or its name).

    Raises:
        ValueError: ``state`` is not a state name.

    Example:
        >>> [t.value for t in allowed_triggers(LifecyclePolicy(), State.LOADED)]
        ['mount_cache', 'reset']
    """
    index = _index(policy)
    return tuple(trigger for trigger in Trigger if (State(state), trigger) in index)


def explain_illegal(policy: LifecyclePolicy, state: State, trigger: Trigger) -> str:
    """Why ``trigger`` is illegal in ``state`` and what to call instead: the reason an
    ``IllegalTransitionError`` gives.

    Args:
        policy: which accelerations apply.
        state: the state the module is in.
        trigger: the illegal trigger.

    Example:
        >>> explain_illegal(LifecyclePolicy(), State.WARMED_UP, Trigger.MOUNT_CACHE)[:40]
        'mounting cache-dit after compile would i'
    """
    state, trigger = State(state), Trigger(trigger)
    path = policy.path
    if trigger is Trigger.MOUNT_CACHE and not policy.cache_dit:
        return "the policy disables Cache-DiT (LifecyclePolicy(cache_dit=False)); nothing to mount"
    if trigger is Trigger.COMPILE and not policy.compile:
        return "the policy disables torch.compile (LifecyclePolicy(compile=False)); nothing to compile"
    if trigger is Trigger.REFRESH and not policy.cache_dit:
        return "the policy disables Cache-DiT, so there is no cache context to refresh"
    if trigger is Trigger.REFRESH:
        return "there is no cache context before mount_cache(); call mount_cache() or prepare(run) first"
    if trigger is Trigger.REQUEST:
        return "requests are served only in WarmedUp; call prepare(run) first"
    if trigger is Trigger.INVALIDATE:
        return "only a WarmedUp module can be invalidated; nothing was warmed up yet"
    if trigger is Trigger.MOUNT_CACHE and PROGRESS[state] > PROGRESS[State.CACHE_MOUNTED]:
        return (
            "mounting cache-dit after compile would invalidate the compiled graph; "
            "call reset() and then prepare(run), which mounts before it compiles"
        )
    if trigger is Trigger.MOUNT_CACHE:
        return "Cache-DiT is already mounted"
    target = path[path.index(State.COMPILED)] if trigger is Trigger.COMPILE else State.WARMED_UP
    needed = path[path.index(target) - 1]
    if PROGRESS[state] >= PROGRESS[target] and trigger is Trigger.COMPILE:
        return "the module is already compiled; call reset() first to compile again"
    if policy.cache_dit and state is State.LOADED:
        return (
            f"Cache-DiT is enabled, and {trigger.value} before mount_cache() would "
            f"{'compile' if policy.compile else 'warm up'} the unwrapped path, so the first real "
            "request recompiles; call mount_cache() first, or prepare(run) to walk the legal path"
        )
    next_trigger = _ENTERED_BY[path[path.index(state) + 1]] if state in path[:-1] else None
    hint = f"call {next_trigger.value}() first" if next_trigger else "call reset() first"
    return f"{trigger.value} needs state {needed.value}; {hint}, or prepare(run) to walk the legal path"


# The triggers that move a module forward, in the order the path takes them.
_FORWARD = (Trigger.MOUNT_CACHE, Trigger.COMPILE, Trigger.WARM_UP)


def remaining_path(policy: LifecyclePolicy, state: State) -> tuple[Trigger, ...]:
    """The triggers that lead from ``state`` to WarmedUp along the policy's path, read from the
    table (empty in WarmedUp): what ``prepare`` fires, in order.

    Args:
        policy: which accelerations apply.
        state: the state the module is in (a ``State`` or its name).

    Raises:
        ValueError: ``state`` is not a state name.

    Example:
        >>> [t.value for t in remaining_path(LifecyclePolicy(), State.CACHE_MOUNTED)]
        ['compile', 'warm_up']
        >>> remaining_path(LifecyclePolicy(cache_dit=False, compile=False), State.WARMED_UP)
        ()
    """
    path = policy.path
    here = path.index(State(state))
    index = _index(policy)
    return tuple(
        trigger
        for source, dest in itertools.pairwise(path[here:])
        for trigger in _FORWARD
        if index.get((source, trigger)) is dest
    )
