"""The cache adapter's interface, as a ``typing.Protocol`` (beside ``BackendAdapter``'s ABC).

Structural, so a host's own adapter (or ``lifecycle.testing.NoopCache``) conforms without
inheriting anything; ``ModuleLifecycle`` checks ``isinstance(adapter, CacheAdapter)`` at
construction (runtime-checkable: the methods must exist) and refuses anything else.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn

from adapters.cache import CacheSummary


class CompilePlanLike(Protocol):
    """How to compile, as a backend adapter reads it (``lifecycle.CompilePlan`` is one).

    Example::

        plan: CompilePlanLike = CompilePlan(scope="blocks")
        adapter.validate_plan(plan, options)
        adapter.compile(module, options, plan)
    """

    @property
    def scope(self) -> str:
        """"model" (the whole module) or "blocks" (each repeated block).

        Example::

            CompilePlan(scope="blocks").scope     # "blocks"
        """

    @property
    def ahead_of_time(self) -> bool:
        """Export and AOTInductor-compile each block class once (scope "blocks").

        Example::

            CompilePlan(scope="blocks", ahead_of_time=True).ahead_of_time     # True
        """

    @property
    def reproducible(self) -> bool:
        """Bit-identical outputs across processes (inductor's deterministic mode).

        Example::

            CompilePlan(reproducible=True).reproducible     # True
        """


@runtime_checkable
class CacheAdapter(Protocol):
    """Mounts a step cache on a transformer and manages its context. Holds no per-module state.

    Optional: ``validate_for_module(module, config)``, checking a config against the module (e.g.
    cache-dit's ``Fn_compute_blocks + Bn_compute_blocks`` against its block count) at construction.

    Example::

        assert isinstance(CacheDitAdapter(), CacheAdapter)
        lc = ModuleLifecycle(transformer, cache_adapter=NoopCache())   # lifecycle.testing's
    """

    name: str

    def default_config(self) -> Any:
        """The config a lifecycle uses when the host gives none.

        Example::

            config = cache.default_config()
        """

    def validate_config(self, config: Any) -> Any:
        """A private copy of ``config``; raises ``adapters.InvalidOptions`` for a bad one.

        Example::

            config = cache.validate_config(config)
        """

    def check_supported(self, module: nn.Module) -> None:
        """Raises ``adapters.UnsupportedForCache`` when the module cannot be mounted.

        Example::

            cache.check_supported(module)
        """

    def is_mounted(self, module: nn.Module) -> bool:
        """Whether the cache is mounted on ``module`` (by anyone).

        Example::

            cache.is_mounted(module)     # False before mount()
        """

    def mount(self, module: nn.Module, config: Any) -> None:
        """Mount the cache on ``module`` in place; never leaves it half-mounted.

        Example::

            cache.mount(module, cache.default_config())
        """

    def refresh(self, module: nn.Module, config: Any, num_inference_steps: int | None = None) -> None:
        """A fresh context from ``config`` (never the cache's own defaults).

        Example::

            cache.refresh(module, config, num_inference_steps=28)
        """

    def refresh_for_warmup(self, module: nn.Module, config: Any) -> None:
        """A context steered so that any warm-up reaches the cached-step branch.

        Example::

            cache.refresh_for_warmup(module, config)
        """

    def unmount(self, module: nn.Module) -> None:
        """Unmount it: the module's own forward runs again.

        Example::

            cache.unmount(module)
        """

    def summary(self, module: nn.Module) -> CacheSummary:
        """Counts of the current context (cached and executed steps, the live config).

        Example::

            cache.summary(module).cached_steps
        """

    def warmup_covered(self, module: nn.Module) -> bool:
        """Whether a steered context has run the cached-step branch and computed after it.

        Example::

            covered = cache.warmup_covered(module)
        """

    def describe_config(self, config: Any) -> dict[str, Any]:
        """The config as the audit records it.

        Example::

            cache.describe_config(config)     # a dict of plain data
        """


__all__ = ["CacheAdapter", "CompilePlanLike"]
