"""The CUDA adapter. Option checks run everywhere; the lifecycle runs on a GPU with
backend="cuda" (inductor) and is skipped cleanly without one."""

from __future__ import annotations

import pytest
import torch
from conftest import SERVING_STEPS

from adapters import BackendUnavailable, InvalidOptions, get_backend
from adapters.cuda import CudaAdapter
from lifecycle import BackendUnavailableError, ModuleLifecycle, State
from lifecycle.testing.tiny import FluxShape, demo_cache_config, denoise, denoiser, flux_inputs, tiny_flux

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")


@pytest.mark.parametrize(
    "mode", [None, "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"]
)
def test_cuda_accepts_inductor_modes(mode):
    options = CudaAdapter().validate_options({"mode": mode, "fullgraph": True, "dynamic": False})
    assert options == {"backend": "inductor", "mode": mode, "fullgraph": True, "dynamic": False}


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"mode": "fastest"}, ["fastest", "max-autotune-no-cudagraphs"]),
        ({"backend": "aot_eager", "mode": "reduce-overhead"}, ["inductor"]),
        ({"fullgraph": "yes"}, ["fullgraph"]),
        ({"dynamic": 1}, ["dynamic"]),
        ({"mode": "default", "options": {"max_autotune": True}}, ["mode", "options"]),
        ({"graph": True}, ["graph", "fullgraph"]),
        ({"backend": "no-such-backend"}, ["no-such-backend", "inductor"]),
    ],
)
def test_cuda_refuses_bad_options_naming_them(options, names):
    with pytest.raises(InvalidOptions) as info:
        CudaAdapter().validate_options(options)
    for name in names:
        assert name in str(info.value)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message given where no GPU is usable")
def test_cuda_unavailable_says_what_to_do(flux, cache_config):
    with pytest.raises(BackendUnavailable, match="backend='cpu'"):
        get_backend("cuda")
    with pytest.raises(BackendUnavailableError) as info:
        ModuleLifecycle(flux, backend="cuda", cache_config=cache_config)
    assert info.value.module == "transformer" and info.value.state is State.LOADED


@needs_gpu
def test_auto_picks_cuda_and_the_audit_says_so(flux, cache_config, audit_events):
    lc = ModuleLifecycle(flux.cuda(), backend="auto", cache_config=cache_config)
    assert lc.backend.name == "cuda"
    lc.mount_cache()
    assert audit_events.of("lifecycle.transition")[0]["backend"] == "cuda"
    assert "device_name" in lc.backend.describe()


@needs_gpu
def test_lifecycle_on_cuda_with_inductor_compiles_nothing_after_warmup(audit_events):
    shape = FluxShape()
    module = tiny_flux(shape).cuda()
    inputs = flux_inputs(shape, device="cuda")
    lc = ModuleLifecycle(
        module, backend="cuda", cache_config=demo_cache_config(SERVING_STEPS),
        compile_options={"mode": "default", "dynamic": False},
    )
    lc.prepare(denoiser(inputs, 2))  # shorter than cache-dit's own warm-up steps
    assert lc.state is State.WARMED_UP
    assert lc.stats()["warmup_covered_cached_branch"] is True
    outputs = []
    for index in range(3):
        with lc.request(num_inference_steps=SERVING_STEPS, request_id=f"r{index}") as req:
            outputs.append(denoise(lc.module, inputs, SERVING_STEPS))
        assert req.new_graphs == 0 and req.cached_steps > 0
    assert lc.stats()["recompiles_since_warmup"] == 0
    assert outputs[0].device.type == "cuda"
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])
    assert {e["backend"] for e in audit_events.of("lifecycle.transition")} == {"cuda"}


@needs_gpu
def test_reset_on_cuda_returns_the_eager_module(flux, inputs, cache_config):
    module = flux.cuda()
    inputs = flux_inputs(FluxShape(), device="cuda")
    expected = denoise(module, inputs, SERVING_STEPS)
    lc = ModuleLifecycle(module, backend="cuda", cache_config=cache_config)
    lc.prepare(denoiser(inputs, 2))
    lc.reset()
    assert lc.state is State.LOADED
    CudaAdapter().synchronize()
    assert torch.equal(denoise(module, inputs, SERVING_STEPS), expected)
