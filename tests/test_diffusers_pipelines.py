"""The demo's tiny diffusers pipelines (``lifecycle.testing.tiny_pipelines``): Wan without
guidance, ``from_diffusers`` without a transformer, and the ``--pipeline`` demo. Every family's
end-to-end serving story (Flux and Wan 2.2 included) is ``tests/test_families.py``."""

from __future__ import annotations

import pytest
import torch

from lifecycle import InvalidConfigError, LifecyclePolicy, PipelineLifecycle
from lifecycle._cli.pipeline_demo import (
    format_pipeline_demo,
    pipeline_cache_config,
    run_pipeline_demo,
)
from lifecycle.testing.tiny_pipelines import (
    pipeline_output,
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
