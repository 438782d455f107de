from conftest import FAST_COMPILE, SERVING_STEPS

from lifecycle import ModuleLifecycle, State
from lifecycle.testing.tiny import denoise, denoiser


def test_prepare_then_requests_compile_nothing(flux, inputs, cache_config, audit_events):
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    lc.prepare(denoiser(inputs, 2))
    assert lc.state is State.WARMED_UP
    with lc.request(num_inference_steps=SERVING_STEPS) as req:
        denoise(lc.module, inputs, SERVING_STEPS)
    assert req.new_graphs == 0
    assert [e["seq"] for e in audit_events.of("lifecycle.transition")] == [1, 2, 3]
