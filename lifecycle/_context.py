"""One lifecycle's cache-dit side of its module: the mount, which config is live on the module,
and the step count a request serves when it names none.

Every change of the module's context goes through here (a request's fresh context, a refresh,
a warm-up's steered context and its restore), so ``steered`` and ``serving_steps`` have one
writer. A warm-up is an earlier request: its steered context must never serve the first real
one, so ``steered`` stays True (and the lifecycle not ready) until a restore succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from adapters.errors import AdapterError
from adapters.protocols import CacheAdapter
from lifecycle import audit
from lifecycle._holds import CACHE_MOUNTS


class CacheContext:
    """The cache context of one module, as one lifecycle configures it."""

    __slots__ = ("_base", "cache", "config", "enabled", "hold", "module", "serving_steps", "steered")

    def __init__(
        self,
        module: nn.Module,
        cache: CacheAdapter,
        config: Any,
        *,
        enabled: bool,
        base_fields: Mapping[str, Any],
    ) -> None:
        self.module = module
        self.cache = cache
        self.config = config
        self.enabled = enabled
        self._base = base_fields
        # The lifecycles holding cache-dit's mount on this module (the last one unmounts).
        self.hold = CACHE_MOUNTS.hold(module)
        self.serving_steps: int | None = getattr(config, "num_inference_steps", None)
        # True while a warm-up's steered context is the module's (its restore has not succeeded).
        self.steered = False

    def mount(self, holder: str, unsupported: Callable[[AdapterError], BaseException]) -> str | None:
        """The mount_cache trigger's work: mount cache-dit with this config, or adopt a mount
        made by another lifecycle configured alike (``"lifecycle"``) or by the host, e.g. with a
        BlockAdapter (``"host"``); returns which was adopted, or None. ``unsupported`` turns the
        cache adapter's refusal of the module into the error to raise."""
        module = self.module
        with self.hold.acquire(holder) as first:
            if first and not self.cache.is_mounted(module):
                try:
                    self.cache.check_supported(module)
                except AdapterError as exc:
                    raise unsupported(exc) from exc
                self.cache.mount(module, self.config)
                return None
            self.fresh()
            return "host" if first else "lifecycle"

    def unmount(self, holder: str, *, unmount: bool = True) -> None:
        """Drop ``holder``'s mount; the last holder unmounts (unless it adopted the host's)."""
        if self.enabled:
            with self.hold.release(holder) as last:
                if unmount and last and self.cache.is_mounted(self.module):
                    self.cache.unmount(self.module)

    def set_serving_steps(self, steps: int | None) -> None:
        """The step count a request serves when it names none (None keeps the current one)."""
        if steps is not None:
            self.serving_steps = steps

    def fresh(self, steps: int | None = None) -> None:
        """A fresh serving context from the lifecycle's config (and ``steps``, else the serving
        step count). Raises what the cache raised; then the context is as before."""
        if not self.enabled:
            return
        self.cache.refresh(self.module, self.config, self.serving_steps if steps is None else steps)
        self.steered = False

    def refresh(self, steps: int | None) -> int | None:
        """The ``refresh`` trigger's work: a fresh context, and ``steps`` becomes the serving
        step count. Returns the step count before, for an undo."""
        before = self.serving_steps
        resolved = before if steps is None else steps
        self.cache.refresh(self.module, self.config, resolved)
        self.serving_steps = resolved
        self.steered = False
        return before

    def undo_refresh(self, before: int | None) -> None:
        self.serving_steps = before
        self.cache.refresh(self.module, self.config, before)

    def steer(self) -> None:
        """A context steered so that a warm-up reaches the cached-step branch."""
        self.steered = True
        self.cache.refresh_for_warmup(self.module, self.config)

    def restore(self, reason: str) -> None:
        """After a warm-up: the serving context again. Raises what the cache raised; then
        ``steered`` stays True and the lifecycle is not ready until a refresh or a request."""
        if not self.enabled:
            return
        started = time.perf_counter()
        self.cache.refresh(self.module, self.config, self.serving_steps)
        self.steered = False
        # Debug level: the refresh trigger has its own transition event, and every request
        # implies a refresh on entry. Built only when it would be written.
        if audit.debug_enabled():
            audit.logger().debug(
                audit.CACHE_REFRESH_EVENT,
                **self._base,
                reason=reason,
                num_inference_steps=self.serving_steps,
                duration_ms=round((time.perf_counter() - started) * 1000.0, 3),
            )

    def covered(self) -> bool:
        """Whether the steered context reached the cached branch (and computed after it)."""
        return bool(self.cache.warmup_covered(self.module))

    def forget(self) -> None:
        """reset(): nothing steered any more (the cache is unmounted)."""
        self.steered = False


__all__ = ["CacheContext"]
