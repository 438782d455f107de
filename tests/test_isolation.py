"""Lifecycles in one process never change each other, nor the host: no process-wide compile
stance per request, duck shaping restored after every trace, the host's tensors never marked.

Real parts: tiny real Flux transformers, cache-dit, torch.compile (aot_eager and a counting
backend), several threads interleaving eager misses while another lifecycle prepares."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import pytest
import torch
from conftest import SERVING_STEPS

from adapters import _torch_internals as internals
from adapters import dynamo_graph_count
from adapters.errors import TorchInternalsMoved
from lifecycle import BackendUnavailableError, LifecyclePolicy, ModuleLifecycle, ServingPolicy, State
from lifecycle.testing.tiny import FluxShape, demo_cache_config, denoise, flux_inputs, tiny_flux

ROUNDS = 6
STATIC = {"backend": "aot_eager", "dynamic": False}


class CountingBackend:
    """A dynamo backend that runs the graph as traced and counts calls of compiled code."""

    def __init__(self) -> None:
        self.calls = 0
        self.compiles = 0
        self.lock = threading.Lock()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.compiles += 1

        def run(*args: Any) -> Any:
            with self.lock:
                self.calls += 1
            return gm.forward(*args)

        return run


def _stance() -> str:
    from torch._dynamo import eval_frame

    return str(eval_frame._stance.stance)


def _lifecycle(shape: FluxShape, options: dict[str, Any], **kw: Any) -> ModuleLifecycle:
    return ModuleLifecycle(
        tiny_flux(shape), backend="cpu", cache_config=demo_cache_config(SERVING_STEPS),
        compile_options=options, **kw,
    )


@pytest.mark.slow
def test_eager_misses_in_threads_while_another_prepares_leave_the_process_alone(audit_events):
    warm = FluxShape()
    cold = replace(warm, image_tokens=16)  # no warm-up calls this size: a miss by input sizes
    counting, counting_a = CountingBackend(), CountingBackend()
    a = _lifecycle(warm, {"backend": counting_a, "dynamic": False})
    b = _lifecycle(warm, {"backend": counting, "dynamic": False})
    run = lambda module: denoise(module, flux_inputs(warm), 2)  # noqa: E731
    a.prepare(run, num_inference_steps=SERVING_STEPS)
    b.prepare(run, num_inference_steps=SERVING_STEPS)
    compiled_for_a = counting_a.compiles
    assert compiled_for_a > 0
    # The third one has other widths: its warm-up must compile graphs of its own.
    other = FluxShape(attention_head_dim=8, num_attention_heads=4, image_tokens=32)
    c = _lifecycle(other, STATIC)

    barrier = threading.Barrier(2)
    errors: list[BaseException] = []
    records: dict[str, list[Any]] = {"a": [], "b": []}
    compiled_calls_during_b: list[int] = []

    def serve_a() -> None:
        try:
            for _ in range(ROUNDS):
                barrier.wait()  # A starts, B starts, A ends, B ends: the interleaving that broke
                with a.request(num_inference_steps=2) as req:
                    denoise(a.module, flux_inputs(cold), 2)
                    barrier.wait()
                records["a"].append(req)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    def serve_b() -> None:
        try:
            for _ in range(ROUNDS):
                barrier.wait()
                before = counting.calls
                with b.request(num_inference_steps=2) as req:
                    barrier.wait()  # A is inside its eager miss now
                    denoise(b.module, flux_inputs(warm), 2)  # warmed: compiled code serves it
                compiled_calls_during_b.append(counting.calls - before)
                records["b"].append(req)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=serve_a), threading.Thread(target=serve_b)]
    for thread in threads:
        thread.start()
    c.prepare(lambda module: denoise(module, flux_inputs(other), 2), num_inference_steps=SERVING_STEPS)
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(records["a"]) == len(records["b"]) == ROUNDS

    # A's misses ran A's eager path: nothing was compiled for them.
    assert all(r.outcome == "ok" for r in records["a"])
    assert counting_a.compiles == compiled_for_a
    misses = audit_events.of("lifecycle.shape_miss")
    assert len(misses) == ROUNDS and {m["policy"] for m in misses} == {"eager"}
    assert all(m["input_sizes"]["hidden_states"] == [1, 16, 16] for m in misses)
    # B's warmed requests ran compiled code meanwhile: A's eager path was A's alone.
    assert all(calls > 0 for calls in compiled_calls_during_b)
    # C prepared while the others served: its warm-up compiled, its first requests compile nothing.
    assert c.state is State.WARMED_UP and c.ready
    assert sum(bucket["graphs"] for bucket in c.coverage()) > 0
    for _ in range(2):
        with c.request(num_inference_steps=SERVING_STEPS) as req:
            denoise(c.module, flux_inputs(other), SERVING_STEPS)
        assert req.new_graphs == 0
    assert c.stats()["recompiles_since_warmup"] == 0
    # The process is as it was: default stance, duck shaping on, and the host's own compile compiles.
    assert _stance() == "default"
    assert internals.duck_shape() is True

    def host_function(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 2 + 1

    before = dynamo_graph_count()
    compiled = torch.compile(host_function, backend="aot_eager")
    assert torch.equal(compiled(torch.ones(3)), host_function(torch.ones(3)))
    assert dynamo_graph_count() == before + 1


@pytest.mark.slow
def test_an_eager_miss_runs_eager_and_matches_a_never_compiled_module(audit_events):
    warm = FluxShape()
    cold = replace(warm, image_tokens=16)
    lc = _lifecycle(warm, STATIC)
    lc.prepare(lambda module: denoise(module, flux_inputs(warm), 2), num_inference_steps=SERVING_STEPS)
    graphs = dynamo_graph_count()
    with lc.request(num_inference_steps=SERVING_STEPS) as req:
        out = denoise(lc.module, flux_inputs(cold), SERVING_STEPS)
    assert req.new_graphs == 0 and dynamo_graph_count() == graphs
    eager = ModuleLifecycle(
        tiny_flux(warm), backend="cpu", policy=LifecyclePolicy(compile=False),
        cache_config=demo_cache_config(SERVING_STEPS),
    )
    eager.prepare(lambda module: denoise(module, flux_inputs(warm), 2), num_inference_steps=SERVING_STEPS)
    with eager.request(num_inference_steps=SERVING_STEPS):
        expected = denoise(eager.module, flux_inputs(cold), SERVING_STEPS)
    assert torch.allclose(out, expected, atol=1e-5)
    assert _stance() == "default"


@pytest.mark.slow
def test_shared_bucket_dims_mark_aliases_never_the_hosts_tensors(audit_events):
    a, b = FluxShape(image_tokens=16), FluxShape(image_tokens=64)
    seen: list[torch.Tensor] = []

    def run(module: torch.nn.Module, shape: dict[str, int]) -> None:
        inputs = flux_inputs(replace(a, image_tokens=shape["tokens"]))
        seen.append(inputs.latents)
        denoise(module, inputs, 2)

    lc = _lifecycle(a, {"backend": "aot_eager"})
    lc.prepare(run, shapes=[{"tokens": 16}, {"tokens": 64}], num_inference_steps=SERVING_STEPS)
    assert lc.stats()["shapes"]["shared_graphs"] is True
    assert lc.stats()["shapes"]["shared_dims"]  # the dims that differ between the buckets
    assert "dynamic" not in lc.compile_options  # decided, recorded, never written back
    for tensor in seen:
        assert not hasattr(tensor, "_dynamo_dynamic_indices")
    host = flux_inputs(b)
    with lc.request(num_inference_steps=SERVING_STEPS, shape={"tokens": 64}) as req:
        denoise(lc.module, host, SERVING_STEPS)
    assert req.new_graphs == 0
    assert not hasattr(host.latents, "_dynamo_dynamic_indices")
    assert internals.duck_shape() is True


@pytest.mark.slow
def test_identical_lifecycles_over_one_module_stay_identical_after_buckets(audit_events):
    module = tiny_flux(FluxShape(image_tokens=16))
    config = demo_cache_config(SERVING_STEPS)
    options = {"backend": "aot_eager"}
    first = ModuleLifecycle(module, backend="cpu", cache_config=config, compile_options=options)

    def run(target: torch.nn.Module, shape: dict[str, int]) -> None:
        denoise(target, flux_inputs(FluxShape(image_tokens=shape["tokens"])), 2)

    first.prepare(run, shapes=[{"tokens": 16}, {"tokens": 32}], num_inference_steps=SERVING_STEPS)
    assert dict(first.compile_options) == options  # never rewritten
    second = ModuleLifecycle(module, backend="cpu", cache_config=config, compile_options=options)
    second.prepare(run, shapes=[{"tokens": 16}, {"tokens": 32}], num_inference_steps=SERVING_STEPS)
    assert second.state is State.WARMED_UP


def test_a_torch_that_moved_an_internal_is_a_typed_error_at_construction(monkeypatch):
    import torch.fx.experimental._config as fx_config

    internals.forget_check()
    monkeypatch.delattr(fx_config, "use_duck_shape")
    try:
        with pytest.raises(BackendUnavailableError, match="use_duck_shape"):
            _lifecycle(FluxShape(), STATIC)
    finally:
        monkeypatch.undo()
        internals.forget_check()
    _lifecycle(FluxShape(), STATIC)  # the real torch passes


def test_a_torch_whose_module_call_ignores_the_slot_is_refused(monkeypatch):
    internals.forget_check()

    def call_without_slot(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self._call_impl(*args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", call_without_slot)
    try:
        with pytest.raises(TorchInternalsMoved, match="no longer calls _compiled_call_impl"):
            internals.check()
    finally:
        monkeypatch.undo()
        internals.forget_check()


@pytest.mark.slow
def test_an_inline_compile_miss_waits_for_a_trace_in_progress(audit_events):
    lc = _lifecycle(FluxShape(), STATIC, serving=ServingPolicy(on_unwarmed="compile"))
    lc.prepare(lambda module: denoise(module, flux_inputs(FluxShape()), 2), num_inference_steps=SERVING_STEPS)
    cold = flux_inputs(FluxShape(image_tokens=16))
    entered = threading.Event()
    done = threading.Event()

    def serve() -> None:
        entered.set()
        with lc.request(num_inference_steps=2):
            denoise(lc.module, cold, 2)
        done.set()

    with internals.tracing(duck_shape=False):  # another warm-up is tracing
        thread = threading.Thread(target=serve)
        thread.start()
        entered.wait(5)
        assert not done.wait(1.0)  # the inline compile waits: it would trace with duck shaping off
        assert internals.duck_shape() is False
    thread.join(60)
    assert done.is_set() and internals.duck_shape() is True
