"""One lifecycle's compile step: the ``compile`` transition's work, and what compiles leave.

``CompileStep`` owns the compile's bookkeeping (how many compiles, their seconds, what the
latest one reports on each coverage row) and the module's compiled hold; it calls the
lifecycle's one ``Compiler`` (picked by the backend) and its artifact session, and records
what they report in the transition's audit fields. The lifecycle fires the transitions and
holds the lock; this module never fires one.

The compiler's events (``lifecycle.artifacts``) are audited as they happen: a store's
``waiting`` while the compile waits, a background watch's end from its thread. At a request
boundary (``at_request_boundary``: the lock held, no request running) the compiler may switch
what the blocks run (another replica's packages replacing just-in-time blocks): the coverage
rows then report it, and the switch is audited.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from torch import nn

from adapters.artifact_session import ArtifactSession
from adapters.artifacts import ArtifactKey, ArtifactReport, build_key
from adapters.compiler import Compiler, CompileReport, Example
from adapters.protocols import CacheAdapter
from lifecycle._config import LifecycleConfig
from lifecycle._context import CacheContext
from lifecycle._errors import InvalidConfigError
from lifecycle._holds import COMPILED
from lifecycle._record import emit_checked, warn_unwritten
from lifecycle._runner import TransitionStep
from lifecycle._warmup import Buckets, call_at_shape
from states import State, Trigger


def check_examples(examples: object, *, module: str, state: State) -> list[Example]:
    """``compile(examples=...)``: a non-empty sequence of zero-argument callables."""
    items = list(examples) if isinstance(examples, Sequence) and not isinstance(examples, str) else []
    if not items or not all(callable(example) for example in items):
        raise InvalidConfigError(
            f"{module}: compile(examples=...) takes a non-empty list of zero-argument callables "
            f"that each run the module once, got {examples!r}; e.g. "
            "[lambda: run(lc.module, shape) for shape in shapes]",
            module=module, state=state, trigger=Trigger.COMPILE,
        )
    return items


def warmup_examples(run: Callable[..., object], target: object, shapes: Buckets) -> list[Example]:
    """The warm-up callable's calls, one per bucket: what a compile from real calls builds from."""
    call_at = call_at_shape(run, target)
    return [partial(call_at, shape) for shape in shapes]


class CompileStep:
    """One lifecycle's compiles (see the module docstring)."""

    __slots__ = (
        "_compile_s", "_compiles", "_row", "artifacts", "base", "compiler", "config", "context",
        "hold", "holder", "module",
    )

    def __init__(
        self,
        config: LifecycleConfig,
        module: nn.Module,
        holder: str,
        compiler: Compiler,
        artifacts: ArtifactSession | None,
        context: CacheContext,
        base: dict[str, Any],
    ) -> None:
        self.config = config
        self.module = module
        self.holder = holder
        self.compiler = compiler
        self.artifacts = artifacts
        self.context = context
        self.base = base
        self.hold = COMPILED.hold(module)
        self._compiles = 0
        self._compile_s = 0.0
        # What the latest compile reports on each coverage row (e.g. packages loaded or built).
        self._row: dict[str, Any] = {}
        compiler.listen(self._live)

    # ------------------------------------------------------------------ reads
    @property
    def compiles(self) -> int:
        return self._compiles

    @property
    def seconds(self) -> float:
        return self._compile_s

    @property
    def row(self) -> dict[str, Any]:
        return self._row

    def kwargs(self, shares_graphs: bool) -> dict[str, Any]:
        """torch.compile's arguments for this compile: the validated options, plus
        ``dynamic=True`` when the buckets share graphs (never written back)."""
        options = self.config.torch_options
        return {**options, "dynamic": True} if shares_graphs else dict(options)

    def key(self, shares_graphs: bool) -> ArtifactKey:
        """The artifact key of this module compiled this way."""
        config = self.config
        return build_key(
            self.module,
            compile_options=self.kwargs(shares_graphs),
            cache_config=config.cache_config,
            cache_version=_cache_version(config.cache) if config.policy.cache_dit else None,
            policy={**config.policy.as_dict(), "compile_plan": config.compile_plan.as_dict()},
        )

    # ------------------------------------------------------------------ the work
    def run(self, step: TransitionStep, examples: Sequence[Example] | None, shares_graphs: bool) -> None:
        """The compile transition's work: the first holder of the module compiles it, the
        others adopt its compiled code; undone by ``release``."""
        started = time.perf_counter()
        kwargs = self.kwargs(shares_graphs)
        with self.hold.acquire(self.holder) as first:
            if first:
                if self.artifacts is not None:
                    self.report(self.artifacts.before_compile(lambda: self.key(shares_graphs)), step.extra)
                self._apply(self.compiler.compile(self.module, examples, kwargs), step.extra)
                self._compiles += 1
            step.extra["reused_compiled"] = not first
        step.on_undo(self.release)
        self._compile_s += time.perf_counter() - started
        plan = self.config.compile_plan
        step.extra["compile_backend"] = str(kwargs.get("backend"))
        step.extra["compile_plan"] = plan.as_dict()
        if shares_graphs:
            step.extra["shared_graphs"] = True
        reproducible = self.config.backend.reproducibility(plan, kwargs)
        if reproducible is not None:
            step.extra["reproducible"] = reproducible

    def before_warmup(
        self, step: TransitionStep, examples: Callable[[], list[Example]], shares_graphs: bool
    ) -> None:
        """At the warm_up transition: a compile deferred until real calls come runs from the
        warm-up's (``examples``); otherwise the compiled code reads weights replaced since the
        compile (invalidate after a LoRA fuse, say)."""
        if self.compiler.pending:
            report = self.compiler.compile(self.module, examples(), self.kwargs(shares_graphs))
            self._apply(report, step.extra)
        else:
            step.extra.update(self.compiler.rebind(self.module))

    def after_warmup(self, extra: dict[str, Any]) -> None:
        """A warm-up succeeded: the artifact session saves what it compiled."""
        if self.artifacts is not None:
            report = self.artifacts.after_warmup()
            if report is not None:
                self.report(report, extra)

    def at_request_boundary(self) -> None:
        """Before a request starts (the lock held, none running): apply what the compiler's
        background work found; a request already running never sees a switch."""
        report = self.compiler.switch(self.module)
        if report is not None:
            if self._row:
                self._row = {**self._row, **report.row}
            for event in report.events:
                self._emit(event, bool(event.get("problem")))

    def release(self) -> None:
        """Drop this lifecycle's hold; the last holder restores the original forward."""
        with self.hold.release(self.holder) as last:
            if last:
                self.compiler.restore(self.module)
                self._row = {}

    def report(self, report: ArtifactReport, extra: dict[str, Any]) -> None:
        """Audit one load or save; stale, corrupt and failed are warnings, never errors."""
        extra[f"artifacts_{report.action}"] = report.status
        self._emit(report.as_dict(), report.problem)

    def _live(self, event: dict[str, Any]) -> None:
        """An event the compiler tells as it happens (the compile's thread or a watch's)."""
        self._emit(event, bool(event.get("problem")))

    def _emit(self, fields: Mapping[str, Any], problem: bool) -> None:
        lost = emit_checked("lifecycle.artifacts", "refused" if problem else "ok", {**self.base, **fields})
        if lost is not None:
            warn_unwritten("lifecycle.artifacts", self.config.name, lost)

    def _apply(self, report: CompileReport, extra: dict[str, Any]) -> None:
        if report.ran_examples:
            # The examples ran the host's callable: the next call starts afresh.
            self.context.fresh()
        self._row = dict(report.row)
        extra.update(report.fields)
        for event in report.events:  # what the artifact store did: loaded, built, waiting, ...
            self._emit(event, bool(event.get("problem")))


def _cache_version(cache: CacheAdapter) -> str | None:
    version = getattr(cache, "version", None)
    return str(version()) if callable(version) else None


__all__ = ["CompileStep", "check_examples", "warmup_examples"]
