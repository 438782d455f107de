"""One lifecycle's ahead-of-time blocks: load the packages a start before built, or build them,
then bind every block to its package; fall back to compiling the blocks just in time when a
package cannot be trusted. Reports only; the lifecycle audits them.

The order (``compile_blocks``):

1. capture each block kind's calls from one eager call per declared bucket (cache-dit is
   mounted, so the blocks are called as its wrappers call them);
2. plan the bounds: dims that differ between the buckets are dynamic within their range;
3. look for packages of this key and these bounds in the package directory (never loaded yet):
   all there and checked on this host -> bind them (``loaded``); there but never checked here ->
   check them in a child process first;
4. otherwise build every kind (export, AOTInductor, a child-process check) -> bind (``compiled``);
5. a build or check that fails -> the blocks are compiled just in time instead (``fallback``),
   with the reason in the report: never a crash, never a package that was not checked.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from adapters import aot
from adapters.errors import AdapterError

AotOutcome = Literal["compiled", "loaded", "fallback"]
SUBDIRECTORY = "aot"
# Whether a block call the packages cannot serve may run eagerly, for the request running in this
# thread or task (set by the lifecycle's request scope): "fail" refuses it instead.
_REFUSE_OUTSIDE: ContextVar[bool] = ContextVar("dit_lifecycle_aot_refuse_outside", default=False)


class OutsideBounds(AdapterError):
    """A block call lies outside what its package was built for, and the request refuses to run
    it eagerly; ``reason`` says which check failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _on_miss(block: nn.Module, reason: str) -> None:
    if _REFUSE_OUTSIDE.get():
        raise OutsideBounds(f"{type(block).__name__}: {reason}")


class refusing_outside:
    """``with refusing_outside(True)``: inside, a block call outside its package's bounds raises
    ``OutsideBounds`` instead of running eagerly (this thread or task only)."""

    __slots__ = ("_token", "refuse")

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self._token: Token[bool] | None = None

    def __enter__(self) -> None:
        self._token = _REFUSE_OUTSIDE.set(self.refuse)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _REFUSE_OUTSIDE.reset(self._token)
            self._token = None


@dataclass(frozen=True)
class AotReport:
    """What one ahead-of-time compile did, for the compile transition's audit event."""

    outcome: AotOutcome
    packages: dict[str, str] = field(default_factory=dict)  # block kind -> package file
    bounds: dict[str, Any] = field(default_factory=dict)  # block kind -> dynamic dims and ranges
    statuses: dict[str, str] = field(default_factory=dict)  # block kind -> what the load found
    seconds: float = 0.0
    blocks: int = 0
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ahead_of_time": self.outcome,
            "aot_packages": self.packages,
            "aot_bounds": self.bounds,
            "aot_found": self.statuses,
            "aot_seconds": round(self.seconds, 3),
            "aot_blocks": self.blocks,
            **({"aot_problem": self.problem} if self.problem else {}),
        }


def _bounds(spec: aot.CallSpec) -> dict[str, Any]:
    dynamic = {
        tensor.path: {str(dim): list(tensor.sizes[dim]) for dim in tensor.dynamic_dims}  # type: ignore[arg-type]
        for tensor in spec.tensors if tensor.dynamic_dims
    }
    return dynamic or {"static": True}


class AotSession:
    """The packages of one lifecycle: in ``directory`` (kept across restarts) or a private
    temporary one (removed by ``close``)."""

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self._root = None if directory is None else Path(directory) / SUBDIRECTORY
        self._temporary: Path | None = None

    @property
    def directory(self) -> Path:
        """Where the packages are (a private temporary directory is made on first use)."""
        if self._root is not None:
            return self._root
        if self._temporary is None:
            self._temporary = Path(tempfile.mkdtemp(prefix="dit-lifecycle-aot-"))
        return self._temporary

    def compile_blocks(
        self,
        module: nn.Module,
        runs: Sequence[Callable[[], object]],
        inductor_options: Mapping[str, Any] | None,
        fallback: Callable[[], None],
    ) -> AotReport:
        """Load or build and bind (see the module docstring); ``fallback()`` compiles the blocks
        just in time when no trusted package can serve them. Raises what ``fallback`` raises."""
        started = time.perf_counter()
        try:
            with torch.no_grad():
                calls = aot.capture_calls(module, runs)
            specs = {kind: aot.plan_bounds(kind_calls) for kind, kind_calls in calls.items()}
        except aot.AotError as error:
            return self._fall_back(fallback, started, {}, {}, f"{type(error).__name__}: {error}")
        bounds = {kind: _bounds(spec) for kind, spec in specs.items()}
        self.directory.mkdir(parents=True, exist_ok=True)
        found = aot.open_packages(module, self.directory, inductor_options=inductor_options, specs=specs)
        statuses: dict[str, str] = {kind: str(status.status) for kind, status in found.items()}
        outcome: AotOutcome = "loaded"
        packages: dict[str, aot.PackageInfo] = {}
        try:
            if all(status.status == "ok" and status.info is not None for status in found.values()):
                packages = {kind: status.info for kind, status in found.items() if status.info is not None}
                unchecked = {kind: info for kind, info in packages.items() if not found[kind].verified_here}
                if unchecked:
                    first = {kind: calls[kind][0] for kind in unchecked}
                    checks = aot.verify_packages(module, unchecked, calls=first)
                    failed = {kind: check for kind, check in checks.items() if not check.ok}
                    if failed:
                        packages = {}
                        statuses.update({kind: f"check {check.outcome}" for kind, check in failed.items()})
            if not packages:
                outcome = "compiled"
                built = aot.build(module, calls, self.directory, inductor_options=inductor_options)
                if not built.complete:
                    rejected = "; ".join(
                        f"{kind}: check {check.outcome} {check.detail}".strip()
                        for kind, check in built.rejected.items()
                    )
                    problem = rejected or "incomplete build"
                    return self._fall_back(fallback, started, bounds, statuses, problem)
                packages = built.packages
            binding = aot.bind(module, packages, on_miss=_on_miss)
        except aot.AotError as error:
            return self._fall_back(fallback, started, bounds, statuses, f"{type(error).__name__}: {error}")
        return AotReport(
            outcome, {kind: info.path.name for kind, info in packages.items()}, bounds, statuses,
            time.perf_counter() - started, binding.blocks,
        )

    def _fall_back(
        self, fallback: Callable[[], None], started: float, bounds: dict[str, Any],
        statuses: dict[str, str], problem: str,
    ) -> AotReport:
        fallback()
        return AotReport("fallback", {}, bounds, statuses, time.perf_counter() - started, 0, problem)

    @staticmethod
    def rebind(module: nn.Module) -> int:
        """Re-bind blocks whose weights were replaced (a LoRA fuse); in-place changes need none."""
        return aot.rebind(module)

    @staticmethod
    def unbind(module: nn.Module) -> bool:
        """Every block back to its eager forward."""
        return aot.unbind(module)

    @staticmethod
    def bound_blocks(module: nn.Module) -> list[nn.Module]:
        """The blocks that run a package now."""
        current = aot.binding(module)
        return list(current.calls) if current is not None else []

    def close(self) -> None:
        """Remove a private temporary directory (a kept one stays for the next start)."""
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None

    @staticmethod
    def misses(module: nn.Module) -> int:
        """Block calls the packages could not serve (run eagerly), so far."""
        current = aot.binding(module)
        return sum(current.stats.misses.values()) if current is not None else 0

    @staticmethod
    def summary(module: nn.Module) -> dict[str, Any] | None:
        current = aot.binding(module)
        return current.summary() if current is not None else None


__all__ = ["AotOutcome", "AotReport", "AotSession", "OutsideBounds", "refusing_outside"]
