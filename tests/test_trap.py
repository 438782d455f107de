"""The trap the library exists to prevent, shown both ways on a tiny real Flux transformer.

Graphs are counted from torch's own counter (dynamo's ``unique_graphs``); ``aot_eager`` compiles
the same graphs as inductor , only faster."""

from __future__ import annotations

import copy

import cache_dit
import pytest
from conftest import FAST_COMPILE, SERVING_STEPS

from adapters import dynamo_graph_count
from lifecycle import ModuleLifecycle, ServingPolicy
from lifecycle.testing.tiny import denoise, denoiser


def _first_request_graphs(module, inputs, refresh=None) -> int:
    before = dynamo_graph_count()
    if refresh is not None:
        refresh()
    denoise(module, inputs, SERVING_STEPS)
    return dynamo_graph_count() - before


def test_by_hand_compile_first_makes_the_first_request_compile(flux, inputs, cache_config):
    flux.compile(**FAST_COMPILE)
    denoise(flux, inputs, 2)  # warm-up compiles the unwrapped path
    cache_dit.enable_cache(flux, cache_config=copy.deepcopy(cache_config))
    assert _first_request_graphs(flux, inputs) > 0


def test_by_hand_mount_first_with_short_warmup_still_compiles(flux, inputs, cache_config):
    cache_dit.enable_cache(flux, cache_config=copy.deepcopy(cache_config))
    flux.compile(**FAST_COMPILE)
    denoise(flux, inputs, 2)  # shorter than cache-dit's max_warmup_steps: no cached step yet
    refresh = lambda: cache_dit.refresh_context(flux, cache_config=copy.deepcopy(cache_config))  # noqa: E731
    assert _first_request_graphs(flux, inputs, refresh) >= 1


@pytest.mark.parametrize("warmup_steps", [1, 2, SERVING_STEPS])
def test_prepare_leaves_nothing_to_compile(flux, inputs, cache_config, warmup_steps, audit_events):
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    lc.prepare(denoiser(inputs, warmup_steps))
    new_graphs = []
    for _ in range(3):
        with lc.request(num_inference_steps=SERVING_STEPS) as req:
            denoise(lc.module, inputs, SERVING_STEPS)
        new_graphs.append(req.new_graphs)
    assert new_graphs == [0, 0, 0]
    assert lc.stats()["recompiles_since_warmup"] == 0
    assert lc.stats()["compiles"] == 1
    warm = audit_events.of("lifecycle.transition")[-1]
    assert warm["trigger"] == "warm_up" and warm["cached_branch_covered"] is True
    assert audit_events.of("lifecycle.recompile") == []


def test_a_compile_after_warmup_is_counted_and_audited(flux, inputs, cache_config, shape, audit_events):
    """If a request does compile (new input shapes), the host sees it: stats and an audit event.
    (on_unwarmed="compile": the default, "eager", would serve that shape without compiling.)"""
    from dataclasses import replace

    from lifecycle.testing.tiny import flux_inputs

    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE,
                         serving=ServingPolicy(on_unwarmed="compile"))
    lc.prepare(denoiser(inputs, 2))
    other = flux_inputs(replace(shape, image_tokens=shape.image_tokens * 2))
    with lc.request(num_inference_steps=SERVING_STEPS) as req:
        denoise(lc.module, other, SERVING_STEPS)
    assert req.new_graphs > 0
    assert lc.stats()["recompiles_since_warmup"] == req.new_graphs
    (event,) = audit_events.of("lifecycle.recompile")
    assert event["new_graphs"] == req.new_graphs and event["request_id"] == req.request_id


def test_the_same_module_is_never_compiled_twice(flux, inputs, cache_config):
    first = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    second = ModuleLifecycle(flux, name="again", policy=first.policy, backend="cpu",
                             cache_config=cache_config, compile_options=FAST_COMPILE)
    first.mount_cache()
    first.compile()
    compiled_call = flux._compiled_call_impl
    second.mount_cache()  # adopts the mounted cache
    second.compile()
    assert flux._compiled_call_impl is compiled_call
    assert (first.stats()["compiles"], second.stats()["compiles"]) == (1, 0)
    assert second.history[-1].outcome == "ok"
    first.reset()  # second still holds the mount and the compiled code
    assert flux._compiled_call_impl is compiled_call and getattr(flux, "_is_cached", False)
    second.reset()  # the last holder undoes both
    assert flux._compiled_call_impl is None and not getattr(flux, "_is_cached", False)


def test_compiled_registry_does_not_keep_modules_alive(shape, cache_config):
    import gc
    import weakref

    from lifecycle.testing.tiny import tiny_flux

    module = tiny_flux(shape)
    lc = ModuleLifecycle(module, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    lc.mount_cache()
    lc.compile()
    ref = weakref.ref(module)
    del lc, module
    gc.collect()
    assert ref() is None
