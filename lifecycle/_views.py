"""What a lifecycle answers without taking its lock: its configuration, state, readiness,
history, coverage and statistics (``LifecycleViews``, the base of ``ModuleLifecycle``).

Every view reads single values or snapshots (the bucket book has its own lock), so a readiness
probe or a metrics scrape never waits on a request or a compile. Nothing here writes: the
lifecycle (``lifecycle._module``) owns every field read below.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from torch import nn

from adapters import BackendAdapter
from adapters.artifact_session import ArtifactSession
from adapters.compiler import Compiler
from adapters.protocols import CacheAdapter
from lifecycle._compiling import CompileStep
from lifecycle._config import CompilePlan, LifecycleConfig, ServingPolicy, Setting
from lifecycle._context import CacheContext
from lifecycle._record import TransitionRecord
from lifecycle._runner import TransitionRunner
from lifecycle._serving_state import ServingState
from states import LifecyclePolicy, State, Trigger, allowed_triggers, destination

_WARMED_UP = State.WARMED_UP.value


class LifecycleViews:
    """The lock-free reads of a ``ModuleLifecycle`` (see the module docstring)."""

    # The lifecycle's fields, assigned by its constructor (lifecycle._module).
    _config: LifecycleConfig
    _module_id: str
    _module: nn.Module
    _runner: TransitionRunner
    _context: CacheContext
    _serving_state: ServingState
    _compiling: CompileStep
    _compiler: Compiler
    _artifacts: ArtifactSession | None
    _base: dict[str, Any]

    # ------------------------------------------------------------------ configuration (read-only)
    name: Setting[str] = Setting()
    policy: Setting[LifecyclePolicy] = Setting()
    compile_plan: Setting[CompilePlan] = Setting()
    serving: Setting[ServingPolicy] = Setting()
    cache_config: Setting[Any] = Setting()
    backend: Setting[BackendAdapter] = Setting()
    cache: Setting[CacheAdapter] = Setting()

    @property
    def compile_options(self) -> Mapping[str, Any]:
        """torch.compile's arguments as the host passed them (read-only)."""
        return MappingProxyType(self._config.compile_options)

    @property
    def module_id(self) -> str:
        """This lifecycle's id in the audit (12 hex digits)."""
        return self._module_id

    # ------------------------------------------------------------------ read-only views
    @property
    def state(self) -> State:
        """Where the module is now (``Loaded``, ``CacheMounted``, ``Compiled``, ``WarmedUp``);
        read without a lock.

        Example::

            if lc.state is State.LOADED:
                lc.prepare(run)
        """
        return self._runner.state

    @property
    def ready(self) -> bool:
        """True only while WarmedUp, serving from the lifecycle's own cache context, with every
        bucket of the plan warm: a readiness probe's answer. Takes no lock, never raises.

        Example::

            status = 200 if lc.ready else 503   # a readiness probe
        """
        return (
            self._runner.holder.state == _WARMED_UP
            and self._runner.unready_for is None
            and not self._context.steered
            and self._serving_state.book.all_warm
        )

    @property
    def module(self) -> nn.Module:
        """The module to call now: always the object passed in (mounted and compiled in place).

        Example::

            with lc.request():
                out = lc.module(x)
        """
        return self._module

    @property
    def history(self) -> tuple[TransitionRecord, ...]:
        """The latest ``HISTORY_LIMIT`` trigger attempts, oldest first.

        Example::

            for record in lc.history:
                print(record.trigger, record.outcome, record.dest)
        """
        return self._runner.history()

    def allowed_triggers(self) -> tuple[Trigger, ...]:
        """The triggers the table makes legal in the current state.

        Example::

            if Trigger.COMPILE in lc.allowed_triggers():
                lc.compile()
        """
        return allowed_triggers(self._config.policy, self.state)

    def can(self, trigger: Trigger) -> bool:
        """Whether the table makes ``trigger`` legal now.

        Example::

            if lc.can(Trigger.INVALIDATE):
                lc.invalidate()
        """
        return destination(self._config.policy, self.state, trigger) is not None

    def coverage(self) -> list[dict[str, Any]]:
        """Per bucket: warmed, graphs, seconds, covered, the path serving it, the first-request
        ratio once served, and what the compiler reports (e.g. ahead-of-time packages).

        Example::

            cold = [row for row in lc.coverage() if not row["warmed"]]
        """
        rows = self._serving_state.book.coverage()
        compiled = self._compiling.row
        for row in rows if compiled else ():
            row.update(compiled)
        return rows

    def missed_shapes(self) -> list[dict[str, Any]]:
        """Shapes that requests named and no bucket covers: ``warm_up(run, shapes=...)`` them.

        Example::

            if lc.missed_shapes():
                lc.warm_up(run, shapes=lc.missed_shapes())
        """
        return self._serving_state.book.missed_shapes()

    def stats(self) -> dict[str, Any]:
        """Compiles, seconds, recompiles since warm-up, requests, cache, artifacts, buckets.

        Example::

            stats = lc.stats()
            print(stats["state"], stats["compiles"], stats["recompiles_since_warmup"])
        """
        state, config, serving, compiled = self.state, self._config, self._serving_state, self._compiling
        cache_summary = None
        if config.policy.cache_dit and state is not State.LOADED:
            try:
                cache_summary = config.cache.summary(self._module).as_dict()
            except Exception:  # a context being rebuilt by a request: report none, never raise
                cache_summary = None
        return {
            "module": config.name,
            "state": state.value,
            "backend": config.backend.name,
            "compile_plan": config.compile_plan.as_dict(),
            "compiles": compiled.compiles,
            "compile_s": compiled.seconds,
            "warmup_s": serving.warmup_s,
            "recompiles_since_warmup": serving.recompiles_since_warmup,
            "serving_steps": self._context.serving_steps,
            "requests": serving.requests,
            "warmup_covered_cached_branch": serving.covered,
            "cache": cache_summary,
            "artifacts": self._artifacts.statuses() if self._artifacts is not None else None,
            "compiler": self._compiler.describe(),
            "shapes": {**serving.stats(), "on_unwarmed": config.serving.on_unwarmed},
        }

    def __repr__(self) -> str:
        return f"ModuleLifecycle({self.name!r}, state={self.state.value}, policy={self.policy})"

    @property
    def _shares_graphs(self) -> bool:
        return self._serving_state.shares_graphs

    def _audit_fields(self) -> dict[str, Any]:
        """The fields every audit event of this lifecycle starts from (a copy)."""
        return dict(self._base)


__all__ = ["LifecycleViews"]
