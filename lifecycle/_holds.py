"""Which lifecycles hold a piece of in-place module state (compiled code, a cache-dit mount), and
which lifecycles drive one module.

Two lifecycles may drive one ``nn.Module`` when they would drive it the same way (same policy,
cache config and compile options): they hold its one lock, so their requests and transitions on it
run one at a time, and the module's state is what both promise. The first to compile compiles,
the others adopt; only the last to let go (``reset``) undoes it. Lifecycles that would drive the
module differently are refused while the other is past Loaded (``check_drivers`` raises
``InvalidConfigError`` naming the other).

Locks: each module has its own lock for its hold bookkeeping and the work done under it; the
registry lock guards only the registry's dictionaries, never any work, so unrelated lifecycles
never wait on each other. Weak keys: no registry keeps a module alive.
"""

from __future__ import annotations

import threading
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from lifecycle._errors import InvalidConfigError, UnsupportedModuleError
from lifecycle._locking import OwnerLock
from states import LifecyclePolicy, State, Trigger

if TYPE_CHECKING:
    from adapters.protocols import CacheAdapter


class ModuleHold:
    """One module's holders of one kind of in-place state. A lifecycle looks its holds up once
    (``ModuleHolds.hold``) and keeps them: the module cannot change under a lifecycle."""

    __slots__ = ("holders", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()  # serialises this module's holders and the work they do
        self.holders: set[str] = set()

    def acquire(self, holder: str) -> HoldBlock:
        """``with hold.acquire(id) as first``: True when ``holder`` is the first (the caller does
        the work inside the block); the hold is taken only if the block succeeds."""
        return HoldBlock(self, holder, taking=True)

    def release(self, holder: str) -> HoldBlock:
        """``with hold.release(id) as last``: True when ``holder`` is the last (the caller undoes
        the work inside the block); the hold is dropped only if the block succeeds."""
        return HoldBlock(self, holder, taking=False)

    def snapshot(self) -> frozenset[str]:
        with self.lock:
            return frozenset(self.holders)


class HoldBlock:
    """The ``with`` block of ``ModuleHold.acquire`` / ``release`` (a class, not a generator:
    it runs on every mount, compile and reset)."""

    __slots__ = ("entry", "holder", "taking")

    def __init__(self, entry: ModuleHold, holder: str, *, taking: bool) -> None:
        self.entry = entry
        self.holder = holder
        self.taking = taking

    def __enter__(self) -> bool:
        entry = self.entry
        entry.lock.acquire()
        if self.taking:
            return not entry.holders
        return entry.holders == {self.holder}

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        entry = self.entry
        try:
            if exc_type is None:
                if self.taking:
                    entry.holders.add(self.holder)
                else:
                    entry.holders.discard(self.holder)
        finally:
            entry.lock.release()


class ModuleHolds:
    """Holders of one kind of in-place state, per module object."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: weakref.WeakKeyDictionary[nn.Module, ModuleHold] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # the dictionary only

    def hold(self, module: nn.Module) -> ModuleHold:
        """The holds on ``module`` (created on first use)."""
        with self._lock:
            entry = self._entries.get(module)
            if entry is None:
                entry = self._entries[module] = ModuleHold()
            return entry

    def holders(self, module: nn.Module) -> frozenset[str]:
        with self._lock:
            entry = self._entries.get(module)
        return frozenset() if entry is None else entry.snapshot()


class ModuleDrivers:
    """The lifecycles over one module and the lock they share."""

    __slots__ = ("lock", "members")

    def __init__(self) -> None:
        self.lock = OwnerLock()
        self.members: list[weakref.ref[object]] = []

    def add(self, lifecycle: object) -> None:
        """Register one more lifecycle (and forget those that are gone)."""
        self.members = [ref for ref in self.members if ref() is not None]
        self.members.append(weakref.ref(lifecycle))

    @property
    def several(self) -> bool:
        """Whether more than one lifecycle was registered over the module (a cheap first check)."""
        return len(self.members) > 1


class DriverRegistry:
    """The lifecycles over each module, and the one lock they share."""

    def __init__(self) -> None:
        self._by_module: weakref.WeakKeyDictionary[nn.Module, ModuleDrivers] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def join(self, module: nn.Module, lifecycle: object) -> ModuleDrivers:
        """Register ``lifecycle`` over ``module``; return its drivers (their ``lock`` is the one every
        lifecycle over the module holds)."""
        with self._lock:
            drivers = self._by_module.get(module)
            if drivers is None:
                drivers = self._by_module[module] = ModuleDrivers()
            drivers.add(lifecycle)
            return drivers

    def others(self, module: nn.Module, lifecycle: object) -> list[Any]:
        with self._lock:
            drivers = self._by_module.get(module)
            refs = list(drivers.members) if drivers is not None else []
        return [o for o in (ref() for ref in refs) if o is not None and o is not lifecycle]


# Compiled code installed by a backend adapter (nn.Module.compile in place, or regional).
COMPILED = ModuleHolds("compiled code")
# cache-dit's hooks mounted on the module.
CACHE_MOUNTS = ModuleHolds("cache-dit mount")
# The lifecycles over each module.
DRIVERS = DriverRegistry()


class Alike(Protocol):
    def drives_alike(self, other: Any) -> bool: ...


class Driver(Protocol):
    """A lifecycle over a module, as the drivers check sees it (``ModuleLifecycle``)."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> State: ...

    @property
    def policy(self) -> LifecyclePolicy: ...

    @property
    def _config(self) -> Alike: ...


def check_drivers(
    lifecycle: Driver, module: nn.Module, drivers: ModuleDrivers, cache: CacheAdapter, trigger: Trigger | None
) -> None:
    """Refuse to drive a module another lifecycle drives differently.

    Lifecycles over one module share it only when they would drive it the same way (same
    policy, plan, serving policy, cache adapter, cache config and compile options); then
    their state is the module's and their requests run one at a time on its shared lock.
    Otherwise, while the other one is past Loaded, this one is refused: its outputs would
    silently be the other's (a cache-less lifecycle serving cache-dit's cached steps, say)."""
    name = lifecycle.name
    if not lifecycle.policy.cache_dit and cache.is_mounted(module):
        raise UnsupportedModuleError(
            f"{name}: the module has cache-dit mounted (by the host or another lifecycle) "
            "but this lifecycle's policy disables Cache-DiT, so it would serve cached steps; "
            "unmount it first (cache_dit.disable_cache) or use LifecyclePolicy(cache_dit=True)",
            module=name, state=lifecycle.state, trigger=trigger,
        )
    if not drivers.several:
        return
    for other in DRIVERS.others(module, lifecycle):
        if other.state is State.LOADED or lifecycle._config.drives_alike(other._config):
            continue
        raise InvalidConfigError(
            f"{name}: the module is already driven by lifecycle {other.name!r} "
            f"(state {other.state.value}, policy {other.policy}) with another policy, plan, "
            "cache or compile configuration; two lifecycles share a module only when "
            f"configured alike. Call reset() on {other.name!r} first, give this lifecycle "
            "its own module, or construct it with the same arguments",
            module=name, state=lifecycle.state, trigger=trigger,
        )
