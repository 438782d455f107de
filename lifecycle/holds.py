"""Which lifecycles hold a piece of in-place module state: compiled code, a cache-dit mount.

Two lifecycles may share one ``nn.Module``. The first to compile it compiles; the others adopt
the compiled code; only the last to let go (``reset``) drops it, so no lifecycle's state ever
promises code another one removed. Weak keys: a registry entry never keeps a module alive.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


class ModuleHolds:
    """Holders of one kind of in-place state, per module object."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._holders: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def holders(self, module: nn.Module) -> frozenset[str]:
        with self._lock:
            return frozenset(self._holders.get(module, ()))

    @contextmanager
    def acquire(self, module: nn.Module, holder: str) -> Iterator[bool]:
        """Yield True when ``holder`` is the first: the caller does the work inside the block.
        The hold is taken only if the block succeeds; the lock serialises competing holders."""
        with self._lock:
            holders = self._holders.get(module, set())
            yield not holders
            self._holders[module] = holders | {holder}

    @contextmanager
    def release(self, module: nn.Module, holder: str) -> Iterator[bool]:
        """Yield True when ``holder`` is the last: the caller undoes the work inside the block.
        The hold is dropped only if the block succeeds."""
        with self._lock:
            holders = self._holders.get(module, set())
            yield holders == {holder}
            remaining = holders - {holder}
            if remaining:
                self._holders[module] = remaining
            else:
                self._holders.pop(module, None)


# Compiled code installed by a backend adapter (nn.Module.compile in place, or regional).
COMPILED = ModuleHolds("compiled code")
# cache-dit's hooks mounted on the module.
CACHE_MOUNTS = ModuleHolds("cache-dit mount")
