"""Serving shapes: declared buckets on a tiny real Flux (aot_eager) and the tiny Wan 2.2
pipeline; each ``on_unwarmed`` policy at an undeclared shape; ``missed_shapes()`` warmed later;
buckets that share graphs; a plain warm-up that calls several sizes. Every
scenario's audit goes through a real JSONL file that ``python -m lifecycle audit verify`` reads."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cache_dit
import pytest
import structlog
import torch
from conftest import FAST_COMPILE, SERVING_STEPS

from adapters import dynamo_graph_count
from lifecycle import (
    InvalidConfigError,
    ModuleLifecycle,
    PipelineLifecycle,
    ServingPolicy,
    State,
    TransitionFailedError,
    UnwarmedShapeError,
)
from lifecycle._buckets import shape_key
from lifecycle.audit import configure_default
from lifecycle.testing.tiny import FluxInputs, FluxShape, denoise, flux_inputs, tiny_flux

STATIC = {**FAST_COMPILE, "dynamic": False}
# dynamo's backend "eager" runs the captured graphs as they are: the same graphs, guards and
# counts as aot_eager at a fraction of the compile time, for the tests that compare no outputs.
QUICK = {"backend": "eager"}
A = {"height": 64, "width": 64}  # 64 image tokens
B = {"height": 32, "width": 32}  # 16
C = {"height": 48, "width": 48}  # 36, never declared up front
D = {"height": 40, "width": 40}  # 25, never declared up front


BASE = FluxShape()


def at(shape: dict[str, int]) -> FluxInputs:
    """The tiny Flux's inputs at a host shape: one image token per 8x8 pixels."""
    return flux_inputs(replace(BASE, image_tokens=(shape["height"] // 8) * (shape["width"] // 8)))


def run(module: torch.nn.Module, shape: dict[str, int]) -> None:
    """The host's warm-up callable: one 2-step call at ``shape``."""
    denoise(module, at(shape), 2)


def serve(lc: ModuleLifecycle, shape: dict[str, int], *, named: bool = True, **kw: Any) -> Any:
    with lc.request(num_inference_steps=SERVING_STEPS, shape=shape if named else None, **kw) as req:
        out = denoise(lc.module, at(shape), SERVING_STEPS)
    return req, out


@pytest.fixture
def audit_file(tmp_path: Path) -> Iterator[Path]:
    saved = structlog.get_config()
    path = tmp_path / "audit.jsonl"
    sink = configure_default(path, echo=False)
    yield path
    if sink is not None:
        sink.close()
    structlog.configure(**saved)


def events(path: Path, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in lines if e.get("event") == name]


def verify_clean(path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lifecycle", "audit", "verify", str(path)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def lifecycle(flux: torch.nn.Module, cache_config: Any, **kw: Any) -> ModuleLifecycle:
    kw.setdefault("compile_options", STATIC)
    keys = ("on_unwarmed", "share_bucket_graphs", "measure_paths")
    serving = {key: kw.pop(key) for key in keys if key in kw}
    if serving:
        kw["serving"] = ServingPolicy(**serving)
    return ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, **kw)


# ---------------------------------------------------------------------------- buckets
def test_declared_buckets_are_warm_and_an_eager_miss_matches_eager(flux, cache_config, audit_file):
    lc = lifecycle(flux, cache_config)
    assert lc.serving.on_unwarmed == "eager"  # the default (README: why)
    lc.prepare(run, shapes=[A, B])
    assert lc.state is State.WARMED_UP and lc.ready
    coverage = {c["key"]: c for c in lc.coverage()}
    assert set(coverage) == {shape_key(A), shape_key(B)}
    assert all(c["warmed"] and c["covered"] and c["graphs"] > 0 for c in coverage.values())
    warmed = events(audit_file, "lifecycle.warmup_shape")
    assert [e["shape_key"] for e in warmed] == [shape_key(A), shape_key(B)]
    assert all(e["covered"] is True and e["graphs"] > 0 and e["seconds"] > 0 for e in warmed)
    settle = events(audit_file, "lifecycle.warmup_settle")
    assert [e["graphs"] for e in settle] == [0, 0]

    for shape in (A, B, A, B):  # named, then by signature: nothing compiles at a bucket
        for named in (True, False):
            req, _ = serve(lc, shape, named=named)
            assert req.new_graphs == 0 and req.outcome == "ok"
    assert {c["key"]: c["requests"] for c in lc.coverage()} == {shape_key(A): 4, shape_key(B): 4}
    assert all(c["first_request_ratio"] is not None for c in lc.coverage())

    # An undeclared shape under "eager": no graph, the output of an eager cache-mounted module.
    reference = tiny_flux(FluxShape())
    cache_dit.enable_cache(reference, cache_config=copy.deepcopy(cache_config))
    cache_dit.refresh_context(reference, cache_config=copy.deepcopy(cache_config))
    expected = denoise(reference, at(C), SERVING_STEPS)
    for named in (True, False):
        req, out = serve(lc, C, named=named)
        assert req.new_graphs == 0 and req.outcome == "ok"
        assert torch.equal(out, expected)
    misses = events(audit_file, "lifecycle.shape_miss")
    assert [(m["policy"], m["detected"], m["shape_key"]) for m in misses] == [
        ("eager", "shape", shape_key(C)), ("eager", "signature", None)]
    assert all(m["new_graphs"] == 0 and m["duration_ms"] > 0 for m in misses)
    assert lc.stats()["shapes"]["shape_misses"] == 2 and lc.stats()["recompiles_since_warmup"] == 0
    assert lc.missed_shapes() == [C]
    assert lc.ready  # a miss does not make a declared bucket cold
    verify_clean(audit_file)


def test_a_warmup_that_compiles_nothing_does_not_settle(flux, cache_config, audit_file):
    lc = lifecycle(flux, cache_config, compile_options=QUICK)
    lc.prepare(run, shapes=[A])
    first = events(audit_file, "lifecycle.transition")[-1]
    assert first["trigger"] == "warm_up" and first["settle_runs"] == 1
    assert len(events(audit_file, "lifecycle.warmup_settle")) == 1
    runs: list[dict[str, int]] = []

    def counted(module: torch.nn.Module, shape: dict[str, int]) -> None:
        runs.append(shape)
        run(module, shape)

    lc.invalidate()  # weights changed; every graph is already built
    graphs = dynamo_graph_count()
    lc.warm_up(counted)
    again = events(audit_file, "lifecycle.transition")[-1]
    assert again["trigger"] == "warm_up" and again["outcome"] == "ok"
    assert dynamo_graph_count() == graphs  # nothing compiled, so nothing to settle
    assert "settle_runs" not in again and again["warmup_runs"] == len(runs)
    assert len(events(audit_file, "lifecycle.warmup_settle")) == 1  # none added
    assert lc.ready
    req, _ = serve(lc, A)
    assert req.new_graphs == 0 and req.outcome == "ok"
    verify_clean(audit_file)


def test_fail_and_compile_policies_then_missed_shapes_are_warmed(flux, cache_config, audit_file):
    lc = lifecycle(flux, cache_config, on_unwarmed="fail")
    lc.prepare(run, shapes=[A])

    ran = []
    with pytest.raises(UnwarmedShapeError, match="warm_up\\(run, shapes="):
        with lc.request(num_inference_steps=SERVING_STEPS, shape=C):
            ran.append(True)  # never reached: refused before the block
    assert ran == [] and lc.state is State.WARMED_UP

    calls = {"completed": 0}
    inputs = at(D)
    with pytest.raises(UnwarmedShapeError) as caught:
        with lc.request(num_inference_steps=SERVING_STEPS):  # no shape: caught by the signature
            for _ in range(3):
                denoise(lc.module, inputs, 1)
                calls["completed"] += 1
    assert calls["completed"] == 0 and lc.state is State.WARMED_UP
    assert caught.value.module == "transformer"
    requests = events(audit_file, "lifecycle.request")
    assert [r["outcome"] for r in requests] == ["refused", "refused"]

    graphs = dynamo_graph_count()
    req, _ = serve(lc, C, on_unwarmed="compile")  # per-request override
    assert req.new_graphs > 0 and dynamo_graph_count() - graphs == req.new_graphs
    (recompile,) = events(audit_file, "lifecycle.recompile")
    assert recompile["request_id"] == req.request_id and recompile["new_graphs"] == req.new_graphs
    misses = events(audit_file, "lifecycle.shape_miss")
    assert [(m["policy"], m["detected"]) for m in misses] == [
        ("fail", "shape"), ("fail", "signature"), ("compile", "shape")]
    assert lc.stats()["shapes"]["shape_misses_by_policy"] == {"fail": 2, "compile": 1}

    # What was missed (and named) is warmed later; then it serves with 0 new graphs, even under fail.
    assert lc.missed_shapes() == [C]
    lc.warm_up(run, shapes=[*lc.missed_shapes(), D])
    assert lc.missed_shapes() == [] and lc.ready
    for shape in (C, D):
        for named in (True, False):
            req, _ = serve(lc, shape, named=named)
            assert req.new_graphs == 0 and req.outcome == "ok"
    verify_clean(audit_file)


def test_a_bucket_that_fails_to_warm_leaves_the_lifecycle_not_ready(flux, cache_config, audit_file):
    lc = lifecycle(flux, cache_config, compile_options={**QUICK, "dynamic": False})
    lc.prepare(run, shapes=[A])

    def broken(module: torch.nn.Module, shape: dict[str, int]) -> None:
        if shape == B:
            raise RuntimeError("no latents at this size")
        run(module, shape)

    for kw in ({"shape": "64x64"}, {"on_unwarmed": "maybe"}):  # bad request arguments: refused
        with pytest.raises(InvalidConfigError):
            with lc.request(num_inference_steps=SERVING_STEPS, **kw):
                pass
    assert [r["outcome"] for r in events(audit_file, "lifecycle.request")] == ["refused", "refused"]
    with pytest.raises(TransitionFailedError):
        lc.warm_up(broken, shapes=[B])
    assert lc.state is State.WARMED_UP and not lc.ready
    assert {c["key"]: c["warmed"] for c in lc.coverage()} == {shape_key(A): True, shape_key(B): False}
    req, _ = serve(lc, A)
    assert req.new_graphs == 0
    lc.prepare(run, shapes=[A, B])  # prepare warms what is declared and cold
    assert lc.ready
    lc.invalidate()
    assert not lc.ready and lc.state is State.COMPILED
    lc.prepare(run)  # the plan stays: run(target, shape) again for every bucket
    assert lc.ready and all(c["warmed"] for c in lc.coverage())
    verify_clean(audit_file)


@pytest.mark.parametrize(
    ("shapes", "on_unwarmed", "options"),
    [
        ({"height": 64}, "eager", STATIC),  # a mapping, not a list of them
        ([], "eager", STATIC),
        ([{"height": [64, None]}], "eager", STATIC),
        ([A], "sometimes", STATIC),
        ([A], "eager", {**FAST_COMPILE, "dynamic_buckets": True}),  # a setting moved to ServingPolicy
        ([A], "eager", {**FAST_COMPILE, "measure_paths": True}),
    ],
)
def test_bad_shape_arguments_are_refused_before_any_work(flux, cache_config, shapes, on_unwarmed, options):
    graphs = dynamo_graph_count()
    with pytest.raises(InvalidConfigError):
        lc = lifecycle(flux, cache_config, on_unwarmed=on_unwarmed, compile_options=options)
        lc.prepare(run, shapes=shapes)
    assert dynamo_graph_count() == graphs


# ---------------------------------------------------------------------------- shared graphs
def test_declared_buckets_share_one_compile_by_default(flux, cache_config, audit_file):
    # No "dynamic" given: three buckets declared before the compile share one dynamic compile
    # (ServingPolicy(share_bucket_graphs=True), the default chosen from the H200 numbers). The
    # decision is recorded in stats(), never written into the host's compile_options.
    lc = lifecycle(flux, cache_config, compile_options=QUICK)
    lc.prepare(run, shapes=[A, B, C])
    assert lc.stats()["shapes"]["shared_graphs"] is True and "dynamic" not in lc.compile_options
    assert lc.compile_options == QUICK
    graphs = [c["graphs"] for c in lc.coverage()]
    assert graphs[0] > 0 and graphs[1:] == [0, 0]  # one compile serves every bucket
    shared = lc.stats()["shapes"]["shared_dims"]
    assert shared == {"hidden_states[1]": [16, 64], "img_ids[0]": [16, 64]}
    for shape in (A, B, C):
        req, _ = serve(lc, shape)
        assert req.new_graphs == 0
    verify_clean(audit_file)


def test_measured_paths_are_audited_and_served(flux, cache_config, audit_file):
    lc = lifecycle(flux, cache_config, compile_options={**QUICK, "dynamic": False}, measure_paths=True)
    lc.prepare(run, shapes=[A])
    (path,) = events(audit_file, "lifecycle.warmup_path")
    assert path["path"] in ("compiled", "eager") and path["compiled_s"] > 0 and path["eager_s"] > 0
    assert path["path"] in path["reason"]
    assert lc.coverage()[0]["path"] == path["path"]
    req, _ = serve(lc, A)
    assert req.new_graphs == 0
    verify_clean(audit_file)


# ---------------------------------------------------------------------------- plain warm-ups at several sizes
def test_a_plain_warmup_that_calls_two_sizes_in_one_call_prepares(flux, cache_config, audit_file):
    lc = lifecycle(flux, cache_config, compile_options=QUICK)
    # Three steps at each size: each size's own (steered) context reaches the cached branch.
    lc.prepare(lambda module: (denoise(module, at(A), 3), denoise(module, at(B), 3)))
    assert lc.state is State.WARMED_UP
    for shape in (A, B):
        req, _ = serve(lc, shape, named=False, on_unwarmed="fail")  # both signatures were warmed
        assert req.new_graphs == 0
    verify_clean(audit_file)


def test_a_plain_warmup_with_a_new_size_on_each_rerun_fails_typed(flux, cache_config, audit_file):
    sizes = iter([A, B, A, B, A, B])
    lc = lifecycle(flux, cache_config, compile_options=QUICK)
    # One step per run: the warm-up re-runs it, each re-run at a new size. This used to raise a
    # size mismatch inside cache-dit (the steered context mixed two sizes' residuals); now each
    # size gets its own context, none can reach the cached branch in one step, and the error says
    # what to do.
    with pytest.raises(TransitionFailedError, match=r"prepare\(run, shapes=\[\.\.\.\]\)"):
        lc.prepare(lambda module: denoise(module, at(next(sizes)), 1))
    assert lc.state is State.COMPILED and lc.history[-1].outcome == "failed"
    lc.prepare(run, shapes=[A, B])  # declared, the same sizes prepare
    assert lc.ready
    verify_clean(audit_file)


# ---------------------------------------------------------------------------- a pipeline
def test_wan22_pipeline_buckets_and_a_miss(audit_file):
    from lifecycle._cli.pipeline_demo import pipeline_cache_config
    from lifecycle.testing.tiny_pipelines import WanShape, tiny_wan22_pipeline, wan_call

    pipe = tiny_wan22_pipeline()
    plc = PipelineLifecycle.from_diffusers(
        pipe, backend="cpu", cache_config=pipeline_cache_config("wan22", SERVING_STEPS),
        compile_options={**QUICK, "dynamic": False},
    )

    def call(shape: dict[str, int], steps: int) -> Any:
        wan = WanShape(height=shape["height"], width=shape["width"])
        return pipe(**wan_call(wan, steps=steps))

    small, wide = {"height": 16, "width": 16}, {"height": 16, "width": 32}
    square = {"height": 32, "width": 32}
    plc.prepare(lambda _pipe, shape: call(shape, 2), shapes=[small, wide])
    assert plc.ready
    coverage = plc.coverage()
    assert set(coverage) == {"transformer", "transformer_2"}
    assert all(c["warmed"] and c["covered"] for member in coverage.values() for c in member)
    for shape in (small, wide):
        with plc.request(num_inference_steps=SERVING_STEPS, shape=shape) as records:
            call(shape, SERVING_STEPS)
        assert [r.new_graphs for r in records.values()] == [0, 0]
    with pytest.raises(UnwarmedShapeError):
        with plc.request(num_inference_steps=SERVING_STEPS, shape=square, on_unwarmed="fail"):
            call(square, SERVING_STEPS)
    assert plc.state is State.WARMED_UP
    with plc.request(num_inference_steps=SERVING_STEPS, shape=square) as records:  # eager
        call(square, SERVING_STEPS)
    assert [r.new_graphs for r in records.values()] == [0, 0]
    assert plc.missed_shapes() == [square]
    plc.warm_up(lambda _pipe, shape: call(shape, 2), shapes=plc.missed_shapes())
    with plc.request(num_inference_steps=SERVING_STEPS, shape=square, on_unwarmed="fail") as records:
        call(square, SERVING_STEPS)
    assert [r.new_graphs for r in records.values()] == [0, 0] and plc.missed_shapes() == []
    verify_clean(audit_file)


# ---------------------------------------------------------------------------- the CLI
def test_demo_shapes_shows_buckets_each_policy_and_the_table():
    from lifecycle._cli.shapes_demo import format_shapes_demo, run_shapes_demo

    result = run_shapes_demo(backend="cpu", compile_backend="eager", steps=SERVING_STEPS)
    rows = {(r["label"], r["policy"]): r for r in result["requests"]}
    assert rows[("undeclared", "eager")]["new_graphs"] == 0
    assert rows[("undeclared", "fail")]["outcome"] == "refused"
    assert rows[("undeclared", "compile")]["new_graphs"] > 0
    assert result["ok"] and result["ready"] and result["missed_shapes"] == [{"height": 48, "width": 48}]
    text = format_shapes_demo(result)
    needles = ("declared buckets: 64x64, 32x32", "undeclared", "first/steady", "height=48,width=48", "OK")
    for needle in needles:
        assert needle in text
