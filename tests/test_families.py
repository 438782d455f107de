"""Every DiT family of ``tests/families.py`` through ``PipelineLifecycle.from_diffusers``:
a tiny real diffusers pipeline (random weights built in code) is prepared with a short warm-up,
serves identical requests (identical outputs, cached steps, 0 new graphs), and after ``reset``
gives what a never-managed pipeline from the same seed gives. A family cache-dit cannot wrap is
refused at ``mount_cache`` with a typed error naming it and the way out.

The last test checks that the "Supported pipelines" table (docs/pipelines.md) is the one these
very runs generate (``scripts/families_table.py`` writes it), so the table cannot drift. Set
``FAMILIES_RESULTS_JSON=path`` to keep the measured rows (``families_table.py --from-json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from families import (
    FAMILIES,
    SERVING_STEPS,
    FamilyCase,
    FamilyResult,
    NotInDiffusers,
    cache_config,
    case,
    output_of,
    readme_table,
    render_table,
    run_family,
    table_row,
    unavailable,
)
from torch import nn

from adapters import CacheDitAdapter
from lifecycle import LifecyclePolicy, ModuleLifecycle, PipelineLifecycle, State, UnsupportedModuleError

# One xdist worker runs this module in order: the last test compares the docs' table with the
# rows the family runs above recorded in this process.
pytestmark = pytest.mark.xdist_group("families")
PAGE = Path(__file__).resolve().parent.parent / "docs" / "pipelines.md"
# The slowest families on the 2-core CPU (``FamilyCase.slow``): `scripts/test.sh` leaves them out,
# `scripts/test_slow.sh` (CI runs it) runs them.
SLOW = frozenset(f.key for f in FAMILIES if f.slow)
RESULTS: dict[str, FamilyResult] = {}


def _available(key: str) -> FamilyCase:
    """The family, or a skip naming the class an older diffusers lacks (``families.unavailable``)."""
    family = case(key)
    reason = unavailable(family)
    if reason is not None:
        pytest.skip(reason)
    return family


@pytest.mark.parametrize(
    "key", [pytest.param(f.key, marks=[pytest.mark.slow] if f.key in SLOW else []) for f in FAMILIES]
)
def test_family_served_end_to_end(key: str, audit_events: Any) -> None:
    family = _available(key)
    try:
        result = run_family(family)
    except NotInDiffusers as exc:  # a class its build needs (the pipeline's is checked first)
        pytest.skip(f"{family.family}: {exc}")
    RESULTS[key] = result
    expected_members = ["transformer", "transformer_2"] if key == "wan22" else ["transformer"]
    assert result.members == expected_members

    if family.refused is not None:
        # Refused up front, at mount_cache, by a typed error naming the family and the way out;
        # nothing of cache-dit ran (no warm-up was attempted with the cache on).
        assert result.refused_error == UnsupportedModuleError.__name__
        assert result.refused_at == "mount_cache"
        message = result.refused_message or ""
        for needle in (family.pipeline_class, "cache_dit.BlockAdapter", "LifecyclePolicy(cache_dit=False)"):
            assert needle in message
        refused = [e for e in audit_events.of("lifecycle.transition") if e["outcome"] != "ok"]
        assert [(e["trigger"], e["outcome"]) for e in refused] == [("mount_cache", "refused")]
        warmups_with_cache = [
            e
            for e in audit_events.of("lifecycle.transition")
            if e["trigger"] == "warm_up" and e["policy"]["cache_dit"]
        ]
        assert warmups_with_cache == []
    else:
        assert result.refused_error is None
        # Each request cached steps (the same count every time), in some member.
        assert all(sum(c.values()) > 0 for c in result.cached_steps), result.cached_steps
        assert all(c == result.cached_steps[0] for c in result.cached_steps)
        # Separate-CFG exactly where the family runs guidance as separate cond/uncond calls.
        assert set(result.separate_cfg.values()) == {family.guidance == "separate"}, result.separate_cfg
        if family.guidance == "separate":
            # The uncond call of a step caches exactly when its cond call does.
            assert result.cfg_cached_steps == result.cached_steps
        # Warm-up changed nothing: the first request gives what a never-warmed pipeline with
        # the same mount gives (compiled vs eager: float noise only).
        assert result.first_vs_unwarmed_max_abs_diff <= 1e-4, result.first_vs_unwarmed_max_abs_diff

    assert result.warmed_up
    assert len(result.new_graphs) == 3
    assert all(v == 0 for graphs in result.new_graphs for v in graphs.values()), result.new_graphs
    # Nothing recompiled in the three requests (the second-resolution checks come after).
    assert [e for e in audit_events.of("lifecycle.recompile") if e["request_id"].startswith(f"{key}-")] == []
    served = [e for e in audit_events.of("lifecycle.request") if e["request_id"].startswith(f"{key}-")]
    assert [(e["request_id"], e["outcome"], e["new_graphs"]) for e in served] == [
        (f"{key}-{i}", "ok", 0) for i in range(3) for _ in result.members
    ]
    assert result.identical_outputs
    # A second resolution no warm-up saw: under on_unwarmed="eager" it is served without
    # compiling, under "fail" refused with UnwarmedShapeError, each a lifecycle.shape_miss;
    # the first resolution then serves as before.
    assert result.second_shape != result.first_shape, (result.first_shape, result.second_shape)
    assert result.first_again_identical
    if family.shape_gap is None:
        assert set(result.second_new_graphs.values()) == {0}, result.second_new_graphs
        assert result.second_fail_error == "UnwarmedShapeError"
        assert result.shape_misses >= 2
        assert set(result.first_again_new_graphs.values()) == {0}, result.first_again_new_graphs
    else:
        # A known gap (family.shape_gap): still there, or this family's case needs updating.
        assert sum(result.second_new_graphs.values()) > 0, f"{key}: shape gap fixed? {family.shape_gap}"
    assert result.reset_state == State.LOADED.value
    assert result.reset_matches_unmanaged, f"max abs diff {result.reset_max_abs_diff}"


@pytest.mark.parametrize("key", ["chroma", "hidream"])
def test_patch_functor_families_mount_again_after_reset(key: str) -> None:
    """cache-dit's patch functors (Chroma, HiDream) replace forward on the transformer and its
    blocks; reset must put all of it back, so the module serves again after a second mount and
    runs cache-dit-free in between (cache only: no compile, to stay fast)."""
    family = _available(key)
    pipe = family.build(0)
    transformer = pipe.transformer
    blocks_before = {name: "forward" in vars(m) for name, m in transformer.named_modules()}
    plc = PipelineLifecycle.from_diffusers(
        pipe, policy=LifecyclePolicy(compile=False), backend="cpu", cache_config=cache_config(family)
    )
    served = []
    for _ in range(2):
        plc.prepare(lambda p: p(**family.call(steps=2)), num_inference_steps=SERVING_STEPS)
        with plc.request(num_inference_steps=SERVING_STEPS):
            served.append(output_of(pipe(**family.call(steps=SERVING_STEPS))))
        plc.reset()
        assert {name: "forward" in vars(m) for name, m in transformer.named_modules()} == blocks_before
        assert not hasattr(transformer, "_is_patched")
    assert torch.equal(served[0], served[1])


def test_sd3_needs_the_pipeline_name_to_mount() -> None:
    """cache-dit registers SD3 as "StableDiffusion3" (the pipeline's name): the transformer alone
    is refused up front, with the pipeline's name it mounts through that adapter."""
    family = _available("sd3")
    transformer = family.build(0).transformer
    alone = ModuleLifecycle(
        transformer, policy=LifecyclePolicy(compile=False), backend="cpu", cache_config=cache_config(family)
    )
    with pytest.raises(
        UnsupportedModuleError, match=r"SD3Transformer2DModel.*LifecyclePolicy\(cache_dit=False\)"
    ):
        alone.mount_cache()
    assert alone.state is State.LOADED and not CacheDitAdapter().is_mounted(transformer)
    hinted = ModuleLifecycle(
        transformer,
        policy=LifecyclePolicy(compile=False),
        backend="cpu",
        cache_config=cache_config(family),
        cache_adapter=CacheDitAdapter("StableDiffusion3Pipeline"),
    )
    hinted.mount_cache()
    assert hinted.state is State.CACHE_MOUNTED and CacheDitAdapter().is_mounted(transformer)
    hinted.reset()
    assert not CacheDitAdapter().is_mounted(transformer) and "forward" not in vars(transformer)


class FluxLookalikeTransformer(nn.Module):
    """Named like a family cache-dit registers ("Flux"), but without Flux's blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(x)
        return out


def test_registered_adapter_that_cannot_wrap_is_refused_at_mount() -> None:
    """A registered adapter that rejects the module's structure fails inside cache-dit: the
    lifecycle turns it into a refusal at mount_cache, before anything is installed."""
    module = FluxLookalikeTransformer()
    lc = ModuleLifecycle(module, policy=LifecyclePolicy(compile=False), backend="cpu")
    with pytest.raises(UnsupportedModuleError) as caught:
        lc.mount_cache()
    message = str(caught.value)
    assert "'Flux' adapter cannot wrap FluxLookalikeTransformer" in message
    assert "cache_dit.BlockAdapter" in message and "LifecyclePolicy(cache_dit=False)" in message
    assert lc.state is State.LOADED and "forward" not in vars(module)


def test_readme_table_is_the_generated_one() -> None:
    """Runs last in this module: the docs' table rows are the ones rendered from the runs above
    (every row that ran; with every family run, the whole table and its counts)."""
    if not RESULTS:
        pytest.skip("no family ran in this session")
    ran_all = set(RESULTS) == {f.key for f in FAMILIES}
    target = os.environ.get("FAMILIES_RESULTS_JSON")
    if target and ran_all:  # rows for `scripts/families_table.py --from-json`, before comparing
        Path(target).write_text(json.dumps([RESULTS[f.key].as_dict() for f in FAMILIES], indent=1))
    readme = readme_table(PAGE.read_text())
    stale = "docs/pipelines.md's table is stale: run `python scripts/families_table.py --write`"
    rows = {line.split(" | ")[0]: line for line in readme.splitlines() if line.startswith("| ")}
    for key, result in RESULTS.items():
        assert rows.get(f"| {result.family}") == table_row(result), f"{key}: {stale}"
    if ran_all:
        assert readme == render_table([RESULTS[f.key] for f in FAMILIES]), stale
