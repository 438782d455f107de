"""Ahead-of-time compiled blocks through the lifecycle, on a GPU: one build for four buckets, restarts.

    CXX=/usr/bin/g++ python bench/gpu_aot_lifecycle.py --out DIR [--blocks 2 4] [--steps 28]
    python bench/gpu_aot_lifecycle.py --device cpu --tiny --out /tmp/x      # a dry run on a CPU

A FLUX-width Flux transformer (hidden 3072, ``--blocks`` double + single, bf16, random weights)
under cache-dit DBCache F1B0, served through ``ModuleLifecycle`` at the buckets 1024x1024,
512x512, 768x1344 and 768x768 (image tokens 4096, 1024, 4032, 2304), each scenario in a process
of its own with empty compiler caches:

- ``jit-blocks``: ``CompilePlan(scope="blocks")``, compiled just in time (shared dynamic graphs);
- ``aot-one``: ``CompilePlan(scope="blocks", ahead_of_time=True)`` with one bucket (1024x1024);
- ``aot-build``: the same with the four buckets, cold, into an artifact directory;
- ``aot-restart`` (``--restarts`` processes): the same lifecycle again, loading that directory.

Each reports the prepare (to WarmedUp) and its compile transition's audit, dynamo graphs during
prepare and during the requests, and per bucket plus 640x640 (1600 tokens, inside the bounds,
never declared) the first request and the median of the steady ones, and shape misses; the
restarts' outputs are compared with the building process's. Result:
``DIR/gpu_aot_lifecycle-<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (  # noqa: E402
    bench_parser,
    bit_identical,
    dispatch,
    empty_compiler_caches,
    first_and_steady,
    model_arguments,
    run_child,
    write_report,
)

BUCKETS = {"1024x1024": 4096, "512x512": 1024, "768x1344": 4032, "768x768": 2304}
INSIDE = {"640x640": 1600}
TINY_BUCKETS = {"b64": 64, "b16": 16, "b48": 48, "b32": 32}
TINY_INSIDE = {"b24": 24}
SCENARIOS = ("jit-blocks", "aot-one", "aot-build", "aot-restart")


def child(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import torch
    from _flux import bench_flux

    from adapters import dynamo_graph_count
    from lifecycle import CompilePlan, ModuleLifecycle
    from lifecycle.testing import capture_audit
    from lifecycle.testing.tiny import demo_cache_config, denoise

    device = torch.device(args.device)
    buckets, inside = (TINY_BUCKETS, TINY_INSIDE) if args.tiny else (BUCKETS, INSIDE)
    declared = buckets if args.scenario != "aot-one" else dict(list(buckets.items())[:1])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    flux = bench_flux(device, args.blocks, tiny=args.tiny)
    model, inputs = flux.model, flux.inputs

    def run(module: torch.nn.Module, bucket: dict[str, int]) -> None:
        with torch.inference_mode():
            denoise(module, inputs(bucket["tokens"]), args.warmup_steps)

    plan = CompilePlan(scope="blocks", ahead_of_time=args.scenario.startswith("aot"))
    lc = ModuleLifecycle(
        model, name="transformer", backend=device.type, compile_plan=plan,
        cache_config=demo_cache_config(args.steps, threshold=args.threshold),
        artifact_dir=args.artifacts if plan.ahead_of_time else None,
    )
    graphs = dynamo_graph_count()
    result: dict[str, Any] = {"scenario": args.scenario, "declared": list(declared)}
    with capture_audit() as events:
        sync()
        started = time.perf_counter()
        lc.prepare(run, shapes=[{"tokens": tokens} for tokens in declared.values()])
        sync()
        result["prepare_s"] = round(time.perf_counter() - started, 3)
        result["prepare_graphs"] = dynamo_graph_count() - graphs
        compile_event = next(e for e in events.of("lifecycle.transition") if e["trigger"] == "compile")
        result["compile"] = {k: v for k, v in compile_event.items()
                             if k.startswith(("aot", "ahead", "duration", "compile_plan", "shared"))}
        result["warmup"] = {k: v for k, v in next(
            e for e in events.of("lifecycle.transition") if e["trigger"] == "warm_up").items()
            if k in ("duration_ms", "warmup_runs", "settle_runs", "settle_s", "buckets")}
        graphs = dynamo_graph_count()
        served: dict[str, Any] = {}
        outputs = {}
        for name, tokens in {**buckets, **inside}.items():
            times, new_graphs = [], 0
            for _ in range(1 + args.repeats):
                sync()
                t = time.perf_counter()
                with torch.inference_mode(), lc.request(num_inference_steps=args.steps) as req:
                    out = denoise(lc.module, inputs(tokens), args.steps)
                sync()
                times.append(time.perf_counter() - t)
                new_graphs += req.new_graphs
            outputs[name] = out.float().cpu()
            served[name] = {**first_and_steady(tokens, times), "new_graphs": new_graphs}
        result["requests"] = served
        result["request_graphs"] = dynamo_graph_count() - graphs
        result["shape_misses"] = len(events.of("lifecycle.shape_miss"))
    torch.save(outputs, Path(args.outputs) / f"{args.scenario}-{args.index}.pt")
    return result


def parent(args: argparse.Namespace) -> dict[str, Any]:
    from _machine import machine_info

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="aot-lifecycle-"))
    artifacts = work / "artifacts"
    outputs = work / "outputs"
    outputs.mkdir()
    report: dict[str, Any] = {"bench": "gpu_aot_lifecycle", "machine": machine_info(), "args": vars(args),
                              "cxx": os.environ.get("CXX"), "runs": []}
    plan = [("jit-blocks", 0), ("aot-one", 0), ("aot-build", 0)]
    plan += [("aot-restart", index) for index in range(args.restarts)]
    for scenario, index in plan:
        if scenario not in args.scenarios:
            continue
        directory = artifacts if scenario in ("aot-build", "aot-restart") else work / f"own-{scenario}"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", "--scenario", scenario,
                   "--index", str(index), "--artifacts", str(directory), "--outputs", str(outputs),
                   *model_arguments(args), "--repeats", str(args.repeats)]
        entry = run_child(command, empty_compiler_caches(f"{scenario}-{index}"), args.timeout,
                          scenario=scenario, index=index)
        report["runs"].append(entry)
        print(json.dumps(entry)[:1200], flush=True)
        (out / "partial.json").write_text(json.dumps(report, indent=1))
    built = outputs / "aot-build-0.pt"
    if built.exists():
        report["restarts_bit_identical_to_build"] = bit_identical(
            built, sorted(outputs.glob("aot-restart-*.pt")))
    write_report(report, out, "gpu_aot_lifecycle")
    return report


def main() -> None:
    parser = bench_parser(__doc__, blocks=(2, 4), repeats=3, timeout=400)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--scenario")
    parser.add_argument("--outputs")
    dispatch(parser, child, parent)


if __name__ == "__main__":
    main()
