"""Shared fixtures: tiny real Flux transformers (random weights, built in code), their inputs,
and audit capture. cache-dit's INFO chatter is quieted; our own audit is captured, not printed."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from lifecycle.testing import AuditEvents, capture_audit
from lifecycle.testing.tiny import FluxInputs, FluxShape, demo_cache_config, flux_inputs, tiny_flux

logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

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
