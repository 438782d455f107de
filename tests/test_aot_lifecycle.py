"""CompilePlan(scope="blocks", ahead_of_time=True) through the lifecycle: cache-dit mounted first,
each block kind exported from the warm-up's calls and AOTInductor-compiled once for every bucket,
a restart loading the packages (no dynamo, nothing traced), invalidate and reset.

Real parts: a tiny real Flux transformer, real cache-dit, real torch.export and AOTInductor on
the CPU (slow on two cores: one build per process, shared with the other AOT tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from aot_builds import flux_packages
from conftest import SERVING_STEPS

from adapters import _torch_internals as internals
from adapters import aot, dynamo_graph_count
from lifecycle import CompilePlan, InvalidConfigError, LifecyclePolicy, ModuleLifecycle, State
from lifecycle.testing.tiny import FluxShape, demo_cache_config, denoise, flux_inputs, tiny_flux

pytestmark = pytest.mark.slow
AOT = CompilePlan(scope="blocks", ahead_of_time=True)
BUCKETS = [{"tokens": 16}, {"tokens": 32}]


def _inputs(tokens: int) -> Any:
    return flux_inputs(FluxShape(image_tokens=tokens))


def run(module: torch.nn.Module, shape: dict[str, int]) -> None:
    with torch.no_grad():
        denoise(module, _inputs(shape["tokens"]), 2)


def _lifecycle(artifact_dir: Path, **kw: Any) -> ModuleLifecycle:
    kw.setdefault("compile_plan", AOT)
    return ModuleLifecycle(
        kw.pop("module", None) or tiny_flux(), backend="cpu", cache_config=demo_cache_config(SERVING_STEPS),
        artifact_dir=artifact_dir, **kw,
    )


def _serve(lc: ModuleLifecycle, tokens: int) -> tuple[Any, torch.Tensor]:
    with torch.no_grad(), lc.request(num_inference_steps=SERVING_STEPS) as req:
        out = denoise(lc.module, _inputs(tokens), SERVING_STEPS)
    return req, out


def _eager(tokens: int, module: torch.nn.Module | None = None) -> torch.Tensor:
    lc = ModuleLifecycle(module or tiny_flux(), backend="cpu", policy=LifecyclePolicy(compile=False),
                         cache_config=demo_cache_config(SERVING_STEPS))
    lc.prepare(run, shapes=BUCKETS)
    return _serve(lc, tokens)[1]


@pytest.fixture
def built() -> tuple[Path, list[dict[str, Any]]]:
    """One cold build per process (shared, see tests/aot_builds.py), its audit, and the directory
    a restart loads from."""
    directory, events = flux_packages()
    return directory, [dict(e) for e in events]


def test_a_cold_build_compiles_each_block_kind_once_for_every_bucket(built):
    _, events = built
    compile_event = next(e for e in events if e["trigger"] == "compile")
    assert compile_event["ahead_of_time"] == "compiled", compile_event.get("aot_problem")
    assert len(compile_event["aot_packages"]) == 2  # the double and the single block
    # The image-token dim dynamic between the smallest and largest bucket, the rotary length
    # (image + text tokens) with it.
    for bounds in compile_event["aot_bounds"].values():
        assert bounds["hidden_states"] == {"1": [16, 32]}
        assert bounds["image_rotary_emb[0]"] == {"0": [24, 40]}
    assert set(compile_event["aot_found"].values()) == {"missing"}
    assert compile_event["aot_blocks"] == 4


def test_a_restart_loads_the_packages_and_serves_every_size_between_the_buckets(built, audit_events):
    directory, _ = built
    torch._dynamo.reset()
    graphs = dynamo_graph_count()
    lc = _lifecycle(directory)
    lc.prepare(run, shapes=BUCKETS)
    compile_event = next(e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "compile")
    assert compile_event["ahead_of_time"] == "loaded"
    assert set(compile_event["aot_found"].values()) == {"ok"}
    assert lc.stats()["compiler"]["ahead_of_time"] == "loaded"
    assert all(row["ahead_of_time"] == "loaded" for row in lc.coverage())
    for tokens in (16, 24, 32):  # 24: between the buckets, never warmed
        req, out = _serve(lc, tokens)
        assert req.new_graphs == 0 and req.outcome == "ok"
        assert torch.allclose(out, _eager(tokens), atol=1e-4), tokens
    assert dynamo_graph_count() == graphs  # no dynamo anywhere: prepare and requests
    assert audit_events.of("lifecycle.shape_miss") == []
    blocks = aot.aot_blocks(lc.module)
    assert len(blocks) == 4
    # Outside the bounds: the blocks run eagerly, the request says so.
    req, out = _serve(lc, 64)
    assert req.outcome == "ok" and torch.allclose(out, _eager(64), atol=1e-4)
    (miss,) = audit_events.of("lifecycle.shape_miss")
    assert miss["detected"] == "aot_bounds" and miss["input_sizes"]["hidden_states"][1] == 64
    lc.reset()
    assert aot.aot_blocks(lc.module) == [] and lc.state is State.LOADED
    assert all(internals.compiled_call(block) is None for block in blocks)


def test_replaced_weights_are_bound_again_after_invalidate(built, audit_events):
    directory, _ = built
    module = tiny_flux()
    lc = _lifecycle(directory, module=module)
    lc.prepare(run, shapes=BUCKETS)
    # The host fuses new weights by assigning new tensors (as a LoRA fuse does).
    block = module.transformer_blocks[0]
    with torch.no_grad():
        block.ff.net[2].weight = torch.nn.Parameter(block.ff.net[2].weight * 1.5)
    lc.invalidate()
    lc.prepare(run, shapes=BUCKETS)
    warm = [e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "warm_up"][-1]
    assert warm["aot_rebound_blocks"] == 1  # the one block whose tensor was replaced
    reference = tiny_flux()
    with torch.no_grad():
        reference.transformer_blocks[0].ff.net[2].weight.mul_(1.5)
    _, out = _serve(lc, 24)
    assert torch.allclose(out, _eager(24, reference), atol=1e-4)
    lc.reset()


def test_a_corrupt_package_is_audited_and_rebuilt_never_loaded(built, tmp_path, audit_events):
    import shutil

    directory, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    for package in (copy / "aot" / "blobs").glob("*"):
        package.write_bytes(b"not a package")
    lc = _lifecycle(copy)
    lc.prepare(run, shapes=BUCKETS)
    compile_event = next(e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "compile")
    assert compile_event["ahead_of_time"] == "compiled"
    assert set(compile_event["aot_found"].values()) == {"corrupt"}
    assert compile_event["aot_store"] == "built" and compile_event["aot_store_events"].count("untrusted") == 2
    _, out = _serve(lc, 16)
    assert torch.allclose(out, _eager(16), atol=1e-4)
    lc.reset()


def test_ahead_of_time_needs_inductor(tmp_path):
    with pytest.raises(InvalidConfigError, match="AOTInductor"):
        _lifecycle(tmp_path, compile_options={"backend": "aot_eager"})


def test_outside_the_bounds_on_unwarmed_fail_refuses_typed(built, audit_events):
    from lifecycle import ServingPolicy, UnwarmedShapeError

    directory, _ = built
    lc = _lifecycle(directory, serving=ServingPolicy(on_unwarmed="fail"))
    lc.prepare(run, shapes=BUCKETS)
    req, _ = _serve(lc, 24)  # inside the bounds: served, no miss
    assert req.outcome == "ok"
    with pytest.raises(UnwarmedShapeError, match="outside the ahead-of-time packages' bounds"):
        _serve(lc, 64)
    assert lc.state is State.WARMED_UP and lc.ready
    (miss,) = audit_events.of("lifecycle.shape_miss")
    assert (miss["detected"], miss["policy"], miss["outcome"]) == ("aot_bounds", "fail", "refused")
    request = audit_events.of("lifecycle.request")[-1]
    assert request["outcome"] == "refused"
    req, _ = _serve(lc, 32)  # and it goes on serving
    assert req.outcome == "ok"
    lc.reset()


_RESTART = """
import json, sys, torch
from adapters import aot, dynamo_graph_count
from lifecycle import CompilePlan, ModuleLifecycle
from lifecycle.testing import capture_audit
from lifecycle.testing.tiny import FluxShape, demo_cache_config, denoise, flux_inputs, tiny_flux

def run(module, shape):
    with torch.no_grad():
        denoise(module, flux_inputs(FluxShape(image_tokens=shape["tokens"])), 2)

with capture_audit() as events:
    lc = ModuleLifecycle(tiny_flux(), backend="cpu", cache_config=demo_cache_config(8),
                         compile_plan=CompilePlan(scope="blocks", ahead_of_time=True),
                         artifact_dir=sys.argv[1])
    lc.prepare(run, shapes=[{"tokens": 16}, {"tokens": 32}])
    outputs = {}
    for tokens in (16, 24, 32):
        with torch.no_grad(), lc.request(num_inference_steps=8):
            outputs[tokens] = denoise(lc.module, flux_inputs(FluxShape(image_tokens=tokens)), 8)
compile_event = next(e for e in events.of("lifecycle.transition") if e["trigger"] == "compile")
torch.save(outputs, sys.argv[2])
print(json.dumps({"graphs": dynamo_graph_count(), "aot": compile_event["ahead_of_time"]}))
"""


def test_restarts_in_fresh_processes_compile_nothing_and_agree_bit_for_bit(built, tmp_path):
    import json
    import subprocess
    import sys

    directory, _ = built
    root = Path(__file__).resolve().parents[1]
    here = tmp_path / "builder.pt"
    first = subprocess.run([sys.executable, "-c", _RESTART, str(directory), str(here)], cwd=root,
                           capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode == 0, first.stderr[-2000:]
    again = tmp_path / "restart.pt"
    second = subprocess.run([sys.executable, "-c", _RESTART, str(directory), str(again)], cwd=root,
                            capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stderr[-2000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result == {"graphs": 0, "aot": "loaded"}  # no dynamo anywhere in the restarted process
    a, b = torch.load(here), torch.load(again)
    assert all(torch.equal(a[tokens], b[tokens]) for tokens in (16, 24, 32))
