"""Where a first request at an undeclared size between the buckets spends its time, on a GPU.

    CXX=/usr/bin/g++ python bench/gpu_first_request.py --out DIR [--repeats 3]
    python bench/gpu_first_request.py --device cpu --tiny --out /tmp/x       # a dry run on a CPU

A FLUX-width Flux transformer (``--blocks`` double + single, bf16, random weights) with
ahead-of-time blocks for the four buckets (1024x1024, 512x512, 768x1344, 768x768) is built once;
then every variant restarts from those packages in ``--repeats`` processes of its own and serves
each bucket and the undeclared sizes inside the bounds (640x640 and 896x896): first request,
median of the steady ones. Variants:

- ``baseline``: the lifecycle as it is;
- ``eager-loading``: ``CUDA_MODULE_LOADING=EAGER`` (every kernel of every library loaded at start);
- ``between``: after ``prepare``, one extra unmeasured request at two other sizes inside the bounds
  (1280 and 3200 image tokens), as a warm-up that covers the range rather than its points;
- ``profile``: one process with ``torch.profiler`` over the first and a steady 640x640 request,
  the CUDA runtime/driver calls and kernels of both compared by count and time.

Result: ``DIR/gpu_first_request-<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import (  # noqa: E402
    bench_parser,
    dispatch,
    empty_compiler_caches,
    first_and_steady,
    model_arguments,
    run_child,
    write_report,
)

BUCKETS = {"1024x1024": 4096, "512x512": 1024, "768x1344": 4032, "768x768": 2304}
INSIDE = {"640x640": 1600, "896x896": 3136}
BETWEEN = (1280, 3200)
TINY_BUCKETS = {"b64": 64, "b16": 16, "b48": 48, "b32": 32}
TINY_INSIDE = {"b24": 24, "b40": 40}
TINY_BETWEEN = (20, 56)
VARIANTS = ("baseline", "eager-loading", "between", "profile")


def _profile_table(prof: Any) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for event in prof.key_averages():
        rows[event.key] = {"count": event.count, "cpu_us": round(event.self_cpu_time_total, 1),
                           "device_us": round(getattr(event, "self_device_time_total", 0.0), 1)}
    return rows


def _compare(first: dict[str, dict[str, float]], steady: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    zero = {"count": 0, "cpu_us": 0.0, "device_us": 0.0}
    diffs = []
    for key in set(first) | set(steady):
        a, b = first.get(key, zero), steady.get(key, zero)
        diffs.append({"name": key[:120], "first_count": a["count"], "steady_count": b["count"],
                      "first_cpu_us": a["cpu_us"], "steady_cpu_us": b["cpu_us"],
                      "first_device_us": a["device_us"], "steady_device_us": b["device_us"],
                      "extra_us": round(max(a["cpu_us"] - b["cpu_us"], a["device_us"] - b["device_us"]), 1)})
    diffs.sort(key=lambda row: -row["extra_us"])
    return diffs[:40]


def child(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import torch
    from _flux import bench_flux

    from adapters import dynamo_graph_count
    from lifecycle import CompilePlan, ModuleLifecycle
    from lifecycle.testing.tiny import demo_cache_config, denoise

    device = torch.device(args.device)
    buckets, inside, between = ((TINY_BUCKETS, TINY_INSIDE, TINY_BETWEEN) if args.tiny
                                else (BUCKETS, INSIDE, BETWEEN))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    flux = bench_flux(device, args.blocks, tiny=args.tiny)
    model, inputs = flux.model, flux.inputs

    def run(module: torch.nn.Module, bucket: dict[str, int]) -> None:
        with torch.inference_mode():
            denoise(module, inputs(bucket["tokens"]), args.warmup_steps)

    lc = ModuleLifecycle(model, name="transformer", backend=device.type,
                         compile_plan=CompilePlan(scope="blocks", ahead_of_time=True),
                         cache_config=demo_cache_config(args.steps, threshold=args.threshold),
                         artifact_dir=args.artifacts)
    result: dict[str, Any] = {"variant": args.variant, "index": args.index,
                              "cuda_module_loading": os.environ.get("CUDA_MODULE_LOADING")}
    sync()
    started = time.perf_counter()
    if args.sdpa == "no-cudnn" and args.variant == "build":
        # The attention op is chosen when a block is exported: without cuDNN's, the packages call
        # flash attention, which builds no per-sequence-length plan on a first call.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            lc.prepare(run, shapes=[{"tokens": tokens} for tokens in buckets.values()])
    else:
        lc.prepare(run, shapes=[{"tokens": tokens} for tokens in buckets.values()])
    sync()
    result["prepare_s"] = round(time.perf_counter() - started, 3)
    if args.variant == "build":
        return result

    def serve(tokens: int) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode(), lc.request(num_inference_steps=args.steps):
            denoise(lc.module, inputs(tokens), args.steps)
        sync()
        return time.perf_counter() - t

    if args.variant == "between":
        started = time.perf_counter()
        for tokens in between:
            serve(tokens)
        result["between_s"] = round(time.perf_counter() - started, 3)
    graphs = dynamo_graph_count()
    if args.variant == "profile":
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        tokens = next(iter(inside.values()))
        tables = []
        for _ in range(3):
            with profile(activities=activities) as prof:
                serve(tokens)
            tables.append(_profile_table(prof))
        result["first_vs_steady"] = _compare(tables[0], tables[2])
        result["cuda_api_first"] = {k: v for k, v in tables[0].items() if k.startswith(("cu", "cuda"))}
        result["cuda_api_steady"] = {k: v for k, v in tables[2].items() if k.startswith(("cu", "cuda"))}
        if device.type == "cuda":
            result["allocator"] = {k: v for k, v in torch.cuda.memory_stats().items()
                                   if k.startswith(("num_alloc_retries", "num_device_alloc", "segment.all"))}
        return result
    served: dict[str, Any] = {}
    for name, tokens in {**buckets, **inside}.items():
        times = [serve(tokens) for _ in range(1 + args.repeats_in_process)]
        served[name] = first_and_steady(tokens, times)
    result["requests"] = served
    result["request_graphs"] = dynamo_graph_count() - graphs
    return result


def parent(args: argparse.Namespace) -> dict[str, Any]:
    from _machine import machine_info

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="first-request-"))
    artifacts = work / "artifacts"
    report: dict[str, Any] = {"bench": "gpu_first_request", "machine": machine_info(), "args": vars(args),
                              "cxx": os.environ.get("CXX"), "runs": []}
    plan = [("build", 0)] + [(variant, index) for index in range(args.repeats) for variant in args.variants
                             if variant != "profile"]
    plan += [("profile", 0)] if "profile" in args.variants else []
    for variant, index in plan:
        env = empty_compiler_caches(f"{variant}-{index}",
                                    {"CUDA_MODULE_LOADING": "EAGER"} if variant == "eager-loading" else None)
        command = [sys.executable, str(Path(__file__).resolve()), "--child", "--variant", variant,
                   "--index", str(index), "--artifacts", str(artifacts), *model_arguments(args),
                   "--repeats-in-process", str(args.repeats_in_process), "--sdpa", args.sdpa]
        entry = run_child(command, env, args.timeout, variant=variant, index=index)
        report["runs"].append(entry)
        bulky = ("first_vs_steady", "cuda_api_first", "cuda_api_steady")
        brief = {k: v for k, v in entry.items() if k not in bulky}
        print(json.dumps(brief)[:1500], flush=True)
    summary: dict[str, Any] = {}
    for variant in args.variants:
        runs = [r for r in report["runs"] if r["variant"] == variant and "requests" in r]
        if not runs:
            continue
        summary[variant] = {name: {"median": round(statistics.median(
                                       r["requests"][name]["first_over_steady"] for r in runs), 3),
                                   "worst": max(r["requests"][name]["first_over_steady"] for r in runs)}
                            for name in runs[0]["requests"]}
    report["first_over_steady"] = summary
    print(json.dumps(summary, indent=1))
    write_report(report, out, "gpu_first_request", "" if args.sdpa == "default" else f"-{args.sdpa}")
    return report


def main() -> None:
    parser = bench_parser(__doc__, blocks=(2, 4), repeats=3, timeout=400,
                          repeats_help="processes per variant")
    parser.add_argument("--repeats-in-process", type=int, default=3, help="steady requests per size")
    parser.add_argument("--sdpa", choices=("default", "no-cudnn"), default="default",
                        help="no-cudnn: export the blocks with cuDNN attention off")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--variant")
    dispatch(parser, child, parent)


if __name__ == "__main__":
    main()
