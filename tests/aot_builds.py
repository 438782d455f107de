"""Ahead-of-time builds shared by the tests that only read them: each is built once per process
(once per xdist worker), on first use, and removed when the process ends. A build costs tens of
seconds on two cores, so tests that need packages to exist copy or load these instead of
building their own.

- ``flux_packages()``: a tiny Flux through the lifecycle (cache-dit mounted), buckets of 16 and
  32 image tokens: the directory a restart loads from, and the cold build's audit events.
- ``Stack``: a module of small repeated blocks with a plain ``scale`` attribute each, for tests
  that must build themselves (a build of it takes seconds).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lifecycle import CompilePlan, LifecyclePolicy, ModuleLifecycle, State
from lifecycle.testing import capture_audit
from lifecycle.testing.tiny import FluxShape, demo_cache_config, denoise, flux_inputs, tiny_flux

AOT = CompilePlan(scope="blocks", ahead_of_time=True)
FLUX_BUCKETS = [{"tokens": 16}, {"tokens": 32}]
SERVING_STEPS = 8


def flux_run(module: nn.Module, shape: dict[str, int]) -> None:
    with torch.no_grad():
        denoise(module, flux_inputs(FluxShape(image_tokens=shape["tokens"])), 2)


def flux_lifecycle(artifact_dir: Path | str | None, **kw: Any) -> ModuleLifecycle:
    kw.setdefault("compile_plan", AOT)
    return ModuleLifecycle(
        kw.pop("module", None) or tiny_flux(), backend="cpu", cache_config=demo_cache_config(SERVING_STEPS),
        artifact_dir=artifact_dir, **kw,
    )


def _scratch(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def flux_packages() -> tuple[Path, tuple[dict[str, Any], ...]]:
    """One cold build of the tiny Flux's packages (the artifact directory) and its audit events."""
    directory = _scratch("aot-flux-")
    torch._dynamo.reset()
    with capture_audit() as events:
        lc = flux_lifecycle(directory)
        lc.prepare(flux_run, shapes=FLUX_BUCKETS)
        assert lc.state is State.WARMED_UP
        transitions = tuple(dict(e) for e in events.of("lifecycle.transition"))
    lc.reset()
    return directory, transitions


def copy_of(directory: Path, target: Path) -> Path:
    """A private copy of a shared build (tests that change files change only theirs)."""
    shutil.copytree(directory, target)
    return target


class ScaledBlock(nn.Module):
    """A block whose forward reads a plain float besides its weights (a per-layer LoRA scale)."""

    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.scale = scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.scale * self.proj(hidden_states)


class Stack(nn.Module):
    """Repeated ``ScaledBlock``s of one class, differing only in ``scale``."""

    def __init__(self, scales: tuple[float, ...] = (1.0, 1.0), dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([ScaledBlock(dim, scale) for scale in scales])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


STACK_BUCKETS = [{"tokens": 4}, {"tokens": 8}]


def stack_input(tokens: int) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, tokens * 8).reshape(1, tokens, 8)


def stack_run(module: nn.Module, shape: dict[str, int]) -> None:
    with torch.no_grad():
        module(stack_input(shape["tokens"]))


def stack_lifecycle(module: nn.Module, artifact_dir: Path | str | None, **kw: Any) -> ModuleLifecycle:
    kw.setdefault("compile_plan", AOT)
    return ModuleLifecycle(module, backend="cpu", policy=LifecyclePolicy(cache_dit=False),
                           artifact_dir=artifact_dir, **kw)


def serve_stack(lc: ModuleLifecycle, tokens: int) -> torch.Tensor:
    with torch.no_grad(), lc.request():
        out: torch.Tensor = lc.module(stack_input(tokens))
    return out
