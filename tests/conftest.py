"""Shared fixtures: tiny real Flux transformers (random weights, built in code), their inputs,
and audit capture. cache-dit's INFO chatter is quieted; our own audit is captured, not printed.

Under pytest-xdist (scripts/test.sh runs ``-n auto --dist loadgroup``) the cores are split
between the workers, and the tests are ordered so the slowest start first; see the hooks below."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lifecycle.testing import AuditEvents, capture_audit
from lifecycle.testing.tiny import FluxInputs, FluxShape, demo_cache_config, flux_inputs, tiny_flux

logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)


def _threads_per_worker() -> int:
    """The cores this process may use, split between the xdist workers (1 without xdist: all)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, cores // max(1, workers)))


_THREADS = _threads_per_worker()
torch.set_num_threads(_THREADS)
# Interpreters the tests start (CLI runs, docs examples, replicas) get the same share: two workers
# that each start a child with one OpenMP thread per core would run 4 spinning threads on 2 cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(_THREADS))

# Fast compile backend for tests; graph counts are the same as inductor's.
FAST_COMPILE = {"backend": "aot_eager"}
SERVING_STEPS = 8


@pytest.fixture
def shape() -> FluxShape:
    return FluxShape()


@pytest.fixture
def flux(shape: FluxShape) -> torch.nn.Module:
    """A fresh tiny FluxTransformer2DModel per test (the same weights every time)."""
    return tiny_flux(shape)


@pytest.fixture
def inputs(shape: FluxShape) -> FluxInputs:
    return flux_inputs(shape)


@pytest.fixture
def cache_config():
    """A DBCache config under which the tiny Flux caches steps in an 8-step request."""
    return demo_cache_config(SERVING_STEPS)


@pytest.fixture
def audit_events() -> Iterator[AuditEvents]:
    with capture_audit() as events:
        yield events


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    # Each test starts with dynamo's caches empty, so graph counts belong to that test, and with
    # no compile artifacts recorded (torch records them process-wide for save_cache_artifacts).
    from torch.compiler._cache import CacheArtifactManager

    torch._dynamo.reset()
    CacheArtifactManager.clear()
    yield
    torch._dynamo.reset()
    CacheArtifactManager.clear()


def _group_of(item: pytest.Item) -> str | None:
    """The xdist group a test joins: its own mark's, else its module's when it uses a fixture
    of module or session scope defined in that module (built once, on one worker)."""
    mark = item.get_closest_marker("xdist_group")
    if mark is not None:
        return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    info = getattr(item, "_fixtureinfo", None)
    module = item.nodeid.split("::", 1)[0]
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        for fixturedef in defs:
            if fixturedef.scope in ("module", "session") and fixturedef.baseid == module:
                return module
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slowest first, so the two workers do not end with one long test each in turn; a group's
    tests keep their order (a module's last test may read what its earlier ones recorded) and
    the group moves as one, as early as its slowest member."""
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        group = _group_of(item)
        if group is not None:
            groups.setdefault(group, []).append(index)
            if item.get_closest_marker("xdist_group") is None:
                item.add_marker(pytest.mark.xdist_group(group))

    def rank(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("slow") is not None else 1

    ranked = [rank(item) for item in items]
    for members in groups.values():
        best = min(ranked[i] for i in members)
        for i in members:
            ranked[i] = best
    order = sorted(range(len(items)), key=lambda i: (ranked[i], i))
    items[:] = [items[i] for i in order]


@pytest.fixture
def immutable() -> Iterator[Any]:
    """``make(path)``: the path and everything under it immutable, even for root (a read-only
    volume as a container sees it); undone after the test."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        subprocess.run(["chattr", "-R", "+i", str(path)], check=True)
        made.append(path)
        return path

    yield make
    for path in made:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=False)
