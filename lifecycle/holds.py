"""Which lifecycles hold a piece of in-place module state (compiled code, a cache-dit mount), and
which lifecycles share one module.

Two lifecycles may share one ``nn.Module`` when they would drive it the same way (same policy,
cache config and compile options): they share its lock, so their requests and transitions on it
run one at a time, and the module's state is what both promise. The first to compile compiles,
the others adopt; only the last to let go (``reset``) undoes it. Lifecycles that would drive the
module differently are refused while the other is past Loaded (``ModuleLifecycle.check_sharing``
raises ``InvalidConfigError`` naming the other).

Locks: each module has its own lock for its hold bookkeeping and the work done under it; the
registry lock guards only the registry's dictionaries, never any work, so unrelated lifecycles
never wait on each other (issue 14, defect 1). Weak keys: no registry keeps a module alive.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lifecycle.locking import OwnerLock


class _Holds:
    __slots__ = ("holders", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders: set[str] = set()


class ModuleHolds:
    """Holders of one kind of in-place state, per module object."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: weakref.WeakKeyDictionary[nn.Module, _Holds] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # the dictionary only

    def _entry(self, module: nn.Module) -> _Holds:
        with self._lock:
            entry = self._entries.get(module)
            if entry is None:
                entry = self._entries[module] = _Holds()
            return entry

    def holders(self, module: nn.Module) -> frozenset[str]:
        with self._lock:
            entry = self._entries.get(module)
        if entry is None:
            return frozenset()
        with entry.lock:
            return frozenset(entry.holders)

    @contextmanager
    def acquire(self, module: nn.Module, holder: str) -> Iterator[bool]:
        """Yield True when ``holder`` is the first: the caller does the work inside the block.
        The hold is taken only if the block succeeds; the module's lock serialises its holders."""
        entry = self._entry(module)
        with entry.lock:
            yield not entry.holders
            entry.holders.add(holder)

    @contextmanager
    def release(self, module: nn.Module, holder: str) -> Iterator[bool]:
        """Yield True when ``holder`` is the last: the caller undoes the work inside the block.
        The hold is dropped only if the block succeeds."""
        entry = self._entry(module)
        with entry.lock:
            yield entry.holders == {holder}
            entry.holders.discard(holder)


class _Share:
    __slots__ = ("lock", "members")

    def __init__(self) -> None:
        self.lock = OwnerLock()
        self.members: list[weakref.ref[object]] = []


class ModuleShares:
    """The lifecycles over each module, and the one lock they share."""

    def __init__(self) -> None:
        self._shares: weakref.WeakKeyDictionary[nn.Module, _Share] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def join(self, module: nn.Module, lifecycle: object) -> OwnerLock:
        """Register ``lifecycle`` over ``module``; return the lock every lifecycle over it shares."""
        with self._lock:
            share = self._shares.get(module)
            if share is None:
                share = self._shares[module] = _Share()
            share.members = [ref for ref in share.members if ref() is not None]
            share.members.append(weakref.ref(lifecycle))
            return share.lock

    def shared(self, module: nn.Module) -> bool:
        """Whether more than one lifecycle was registered over ``module`` (a cheap first check)."""
        share = self._shares.get(module)
        return share is not None and len(share.members) > 1

    def others(self, module: nn.Module, lifecycle: object) -> list[object]:
        with self._lock:
            share = self._shares.get(module)
            refs = list(share.members) if share is not None else []
        return [o for o in (ref() for ref in refs) if o is not None and o is not lifecycle]


# Compiled code installed by a backend adapter (nn.Module.compile in place, or regional).
COMPILED = ModuleHolds("compiled code")
# cache-dit's hooks mounted on the module.
CACHE_MOUNTS = ModuleHolds("cache-dit mount")
# The lifecycles over each module.
SHARES = ModuleShares()
