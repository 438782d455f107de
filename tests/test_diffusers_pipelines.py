"""Real diffusers pipelines end to end: a tiny FluxPipeline and a tiny Wan 2.2 WanPipeline (two
transformers, classifier-free guidance on) managed by ``PipelineLifecycle.from_diffusers``,
prepared with one short pipeline call and served through ``plc.request``."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST_COMPILE

from adapters import CacheDitAdapter
from lifecycle import InvalidConfigError, LifecyclePolicy, PipelineLifecycle, State
from lifecycle.cli.pipeline_demo import (
    format_pipeline_demo,
    pipeline_cache_config,
    run_pipeline_demo,
)
from lifecycle.testing.tiny_pipelines import (
    flux_call,
    pipeline_output,
    tiny_flux_pipeline,
    tiny_wan22_pipeline,
    wan_call,
)

STEPS = 8
CACHE_ONLY = LifecyclePolicy(compile=False)


def _serve(plc: PipelineLifecycle, call, count: int = 3):
    served = []
    for index in range(count):
        with plc.request(num_inference_steps=STEPS, request_id=f"q{index}") as records:
            out = pipeline_output(plc.pipeline(**call(steps=STEPS, output_type="latent")))
        served.append((out, records))
    return served


def _executed_steps(plc: PipelineLifecycle) -> dict[str, int]:
    """Denoising steps each member's current context counted (read after a request)."""
    return {n: m.cache.summary(m.module).executed_steps for n, m in plc.members.items()}


def test_flux_pipeline_prepared_and_served_end_to_end(audit_events):
    pipe = tiny_flux_pipeline()
    transformer = pipe.transformer
    plc = PipelineLifecycle.from_diffusers(
        pipe, backend="cpu", cache_config=pipeline_cache_config("flux", STEPS), compile_options=FAST_COMPILE
    )
    assert list(plc.members) == ["transformer"] and plc.pipeline is pipe
    plc.prepare(lambda p: p(**flux_call(steps=2, output_type="latent")))
    assert plc.state is State.WARMED_UP
    assert pipe.transformer is transformer is plc.members["transformer"].module  # still the user's pipe

    served = _serve(plc, flux_call)
    outs = [out for out, _ in served]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    records = [r["transformer"] for _, r in served]
    assert [r.new_graphs for r in records] == [0, 0, 0]
    assert len({r.cached_steps for r in records}) == 1 and records[0].cached_steps > 0
    assert plc.stats()["transformer"]["recompiles_since_warmup"] == 0

    # The same pipeline, cache-mounted and never warmed, gives the same first image.
    fresh = tiny_flux_pipeline()
    CacheDitAdapter().mount(fresh.transformer, pipeline_cache_config("flux", STEPS))
    reference = pipeline_output(fresh(**flux_call(steps=STEPS, output_type="latent")))
    torch.testing.assert_close(outs[0], reference, rtol=1e-4, atol=1e-5)

    events = audit_events.of("lifecycle.request")
    assert [(e["request_id"], e["outcome"], e["new_graphs"]) for e in events] == [
        ("q0", "ok", 0), ("q1", "ok", 0), ("q2", "ok", 0)
    ]


def test_wan22_pipeline_with_guidance_prepared_and_served_end_to_end(audit_events):
    pipe = tiny_wan22_pipeline()
    plc = PipelineLifecycle.from_diffusers(
        pipe, backend="cpu", cache_config=pipeline_cache_config("wan22", STEPS), compile_options=FAST_COMPILE
    )
    assert list(plc.members) == ["transformer", "transformer_2"]
    plc.prepare(lambda p: p(**wan_call(steps=2, output_type="latent")))  # one call warms both
    assert all(m.state is State.WARMED_UP for m in plc.members.values())
    assert all(m.stats()["warmup_covered_cached_branch"] for m in plc.members.values())

    served = _serve(plc, wan_call)
    outs = [out for out, _ in served]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    for _, records in served:
        assert {n: r.new_graphs for n, r in records.items()} == {"transformer": 0, "transformer_2": 0}
        assert records["transformer_2"].cached_steps > 0
        # Guidance rhythm: the uncond call of a step caches exactly when its cond call does.
        assert all(r.cfg_cached_steps == r.cached_steps for r in records.values())
    assert len({r["transformer_2"].cached_steps for _, r in served}) == 1
    # 16 transformer calls (8 steps x cond/uncond) counted as 8 steps, split by boundary_ratio.
    executed = _executed_steps(plc)
    assert sum(executed.values()) == STEPS and all(v > 0 for v in executed.values())
    assert {n: s["recompiles_since_warmup"] for n, s in plc.stats().items()} == {
        "transformer": 0, "transformer_2": 0
    }
    assert audit_events.of("lifecycle.recompile") == []


@pytest.mark.parametrize("separate_cfg, counts_every_step", [(None, False), (False, True)])
def test_wan_without_guidance_needs_separate_cfg_off(separate_cfg, counts_every_step):
    """Without guidance the transformer runs once per step: cache-dit's Wan default (separate
    CFG) would count two steps as one; the documented fix is enable_separate_cfg=False."""
    config = pipeline_cache_config("wan22", STEPS)
    config.enable_separate_cfg = separate_cfg
    pipe = tiny_wan22_pipeline()
    plc = PipelineLifecycle.from_diffusers(pipe, policy=CACHE_ONLY, backend="cpu", cache_config=config)
    plc.prepare(lambda p: p(**wan_call(steps=2, guidance_scale=1.0, output_type="latent")))
    first, second = _serve(plc, lambda **kw: wan_call(guidance_scale=1.0, **kw), count=2)
    assert torch.equal(first[0], second[0])
    # Separate CFG counts one step per call pair: ceil(calls / 2) per transformer.
    assert (sum(_executed_steps(plc).values()) == STEPS) is counts_every_step


def test_from_diffusers_needs_a_transformer():
    class NotAPipeline:
        transformer = None

    with pytest.raises(InvalidConfigError, match="no transformer"):
        PipelineLifecycle.from_diffusers(NotAPipeline(), backend="cpu")


def test_pipeline_demo_reports_identical_requests():
    result = run_pipeline_demo("wan22", backend="cpu", steps=4, requests=2, policy=CACHE_ONLY)
    assert result["pipeline"] == "WanPipeline" and result["members"] == ["transformer", "transformer_2"]
    assert result["identical_outputs"] is True
    assert [row["request_id"] for row in result["requests"]] == ["wan22-1", "wan22-2"]
    assert all(row["new_graphs"] == 0 and row["steps"] == 4 for row in result["requests"])
    assert set(result["requests"][0]["cached_steps"]) == {"transformer", "transformer_2"}
    text = format_pipeline_demo(result)
    assert "cached[transformer_2]" in text and "identical outputs" in text
    with pytest.raises(InvalidConfigError, match="flux, wan22"):
        run_pipeline_demo("sdxl", backend="cpu")
