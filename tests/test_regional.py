"""Compiling the blocks (``CompilePlan(scope="blocks")``): the repeated blocks are compiled one by one, under
cache-dit's block wrappers, through the lifecycle's usual mount -> compile -> warm-up path."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST_COMPILE, SERVING_STEPS

from adapters.base import dynamo_graph_count
from adapters.regional import compiled_blocks, repeated_blocks
from lifecycle import (
    CompilePlan,
    IllegalTransitionError,
    InvalidConfigError,
    LifecyclePolicy,
    ModuleLifecycle,
    State,
)
from lifecycle.testing.tiny import FluxShape, denoise, denoiser, flux_inputs, tiny_flux

BLOCKS = CompilePlan(scope="blocks")


def _prepared(shape: FluxShape, cache_config, plan: CompilePlan = BLOCKS) -> tuple[ModuleLifecycle, int]:
    torch._dynamo.reset()
    lc = ModuleLifecycle(
        tiny_flux(shape), backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE,
        compile_plan=plan,
    )
    before = dynamo_graph_count()
    lc.prepare(denoiser(flux_inputs(shape), 2))
    return lc, dynamo_graph_count() - before


def test_only_the_repeated_blocks_are_compiled(cache_config):
    shape = FluxShape(num_layers=2, num_single_layers=3)
    lc, _ = _prepared(shape, cache_config)
    blocks = compiled_blocks(lc.module)
    names = sorted(type(b).__name__ for b in blocks)
    assert names == ["FluxSingleTransformerBlock"] * 3 + ["FluxTransformerBlock"] * 2
    assert blocks == repeated_blocks(lc.module)
    # The transformer itself (cache-dit's forward, embeddings, output) stays eager.
    assert lc.module._compiled_call_impl is None


def test_identical_blocks_share_graphs_whatever_their_number(cache_config):
    # Regional compiles each block class once (plus one input-layout variant of the single
    # block), so more blocks add no graph.
    small_shape, large_shape = FluxShape(1, 2), FluxShape(4, 6)
    _, small = _prepared(small_shape, cache_config)
    _, large = _prepared(large_shape, cache_config)
    assert small == large == 3
    # Whole-model compile of a cache-dit-mounted Flux does not grow with the blocks either:
    # cache-dit's forward breaks the graph (unittest.mock patching, torch.compiler.disable in
    # the block loop), so dynamo compiles each block's forward as its own frame, reused, plus
    # five graphs of the transformer's own code. Regional saves those five (GPU: bench/).
    _, whole_small = _prepared(small_shape, cache_config, CompilePlan())
    _, whole_large = _prepared(large_shape, cache_config, CompilePlan())
    assert whole_small == whole_large == small + 5


def test_first_request_adds_no_graph_and_matches_eager(cache_config, audit_events):
    shape = FluxShape()
    inputs = flux_inputs(shape)
    lc, _ = _prepared(shape, cache_config)
    with lc.request(num_inference_steps=SERVING_STEPS) as req:
        out = denoise(lc.module, inputs, SERVING_STEPS)
    assert req.new_graphs == 0
    assert lc.stats()["recompiles_since_warmup"] == 0
    assert req.cached_steps > 0  # the cached-step branch ran, through compiled blocks

    eager = ModuleLifecycle(
        tiny_flux(shape), backend="cpu", cache_config=cache_config,
        policy=LifecyclePolicy(compile=False),
    )
    eager.prepare(denoiser(inputs, 2))
    with eager.request(num_inference_steps=SERVING_STEPS) as eager_req:
        expected = denoise(eager.module, inputs, SERVING_STEPS)
    assert eager_req.cached_steps == req.cached_steps
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_reset_returns_every_block_to_eager(cache_config, inputs):
    reference = denoise(tiny_flux(), inputs, 3)
    lc = ModuleLifecycle(tiny_flux(), backend="cpu", cache_config=cache_config,
                         compile_options=FAST_COMPILE, compile_plan=BLOCKS)
    lc.prepare(denoiser(inputs, 2))
    lc.reset()
    assert lc.state is State.LOADED
    assert compiled_blocks(lc.module) == []
    before = dynamo_graph_count()
    assert torch.equal(denoise(lc.module, inputs, 3), reference)
    assert dynamo_graph_count() == before


def test_mount_before_compile_still_holds(flux, cache_config):
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config,
                         compile_options=FAST_COMPILE, compile_plan=BLOCKS)
    with pytest.raises(IllegalTransitionError):
        lc.compile()
    assert compiled_blocks(flux) == []
    assert lc.state is State.LOADED


def test_the_scope_must_be_model_or_blocks_and_regional_is_no_compile_option(flux):
    with pytest.raises(InvalidConfigError, match="scope"):
        CompilePlan(scope="regional")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match=r"CompilePlan\(scope='blocks'\)"):
        ModuleLifecycle(flux, backend="cpu", compile_options={**FAST_COMPILE, "regional": True})


def test_a_model_without_repeated_blocks_is_refused_at_construction_and_stays_eager():
    # A bad argument, refused before any work, not a failed compile.
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    with pytest.raises(InvalidConfigError, match="no repeated blocks"):
        ModuleLifecycle(
            model, backend="cpu", policy=LifecyclePolicy(cache_dit=False), compile_options=FAST_COMPILE,
            compile_plan=BLOCKS,
        )
    assert compiled_blocks(model) == [] and model._compiled_call_impl is None


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x)) + x


def test_plain_module_lists_are_found_without_diffusers_metadata():
    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = torch.nn.Linear(4, 4)
            self.layers = torch.nn.ModuleList(_Block() for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.inp(x)
            for layer in self.layers:
                x = layer(x)
            return x

    model = Stack()
    x = torch.randn(2, 4)
    expected = model(x)
    lc = ModuleLifecycle(
        model, backend="cpu", policy=LifecyclePolicy(cache_dit=False), compile_options=FAST_COMPILE,
            compile_plan=BLOCKS,
    )
    before = dynamo_graph_count()
    lc.prepare(lambda module: module(x))
    assert compiled_blocks(model) == list(model.layers)
    assert dynamo_graph_count() - before == 1  # three blocks, one graph
    torch.testing.assert_close(model(x), expected)
