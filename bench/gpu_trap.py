"""The recompile trap on a GPU, and what the lifecycle does about it (issues 4 and 11).

A Flux-architecture ``FluxTransformer2DModel`` with random weights (hidden 3072 = 24 heads x 128,
2 double + 4 single blocks, 4096 image + 512 text tokens, bf16), 28 denoising steps, inductor,
cache-dit DBCache F1B0 with a threshold under which cached steps occur. Each scenario runs in its
own process with inductor's caches disabled, so every one pays its own compile:

  (a) compile -> 2-step warm-up -> mount cache-dit       (the old order)
  (b) mount -> compile -> 2-step warm-up, by hand         (right order, warm-up too short)
  (c) ModuleLifecycle.prepare with the same 2-step warm-up callable, requests via lc.request()
  (d) eager with cache-dit
  (e) compiled, no cache

(a), (b) and (d) refresh cache-dit's context with the serving config before each request, as a
careful host would by hand, so their steady state does the same work as (c)'s ``request()``.
Scenario (c) then also serves identical requests without ``request()``: the context
leaks from one request to the next.

    python bench/gpu_trap.py                        # all scenarios, CUDA, results to bench/results/
    python bench/gpu_trap.py --tiny --device cpu    # a quick dry run of the script on a CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _machine import machine_info  # noqa: E402

from adapters import CacheDitAdapter, dynamo_graph_count  # noqa: E402
from lifecycle.testing.tiny import (  # noqa: E402
    FluxShape,
    demo_cache_config,
    denoise,
    denoiser,
    flux_architecture,
    flux_inputs,
    tiny_flux,
)

SCENARIOS = {
    "a": "compile -> warm up -> mount cache-dit",
    "b": "mount -> compile -> 2-step warm-up (by hand)",
    "c": "ModuleLifecycle.prepare (2-step warm-up callable)",
    "d": "eager + cache-dit",
    "e": "compiled, no cache",
}
FLUX_SHAPE = flux_architecture(2, 4)
TINY_SHAPE = FluxShape()


# ---------------------------------------------------------------------------- one scenario
class Bench:
    """One scenario's model, inputs, serving config and measurements."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        self.shape = TINY_SHAPE if args.tiny else FLUX_SHAPE
        # Weights made on the device (fast): the same seed gives the same weights in every process.
        try:
            with self.device:
                self.module = tiny_flux(self.shape, seed=0, dtype=self.dtype)
        except Exception:  # a constructor that insists on the CPU: build there, then move
            self.module = tiny_flux(self.shape, seed=0, dtype=self.dtype).to(self.device)
        self.inputs = flux_inputs(self.shape, seed=1, device=self.device, dtype=self.dtype)
        self.config = demo_cache_config(args.steps, threshold=args.threshold)
        self.cache = CacheDitAdapter()
        self.compile_backend = "inductor" if args.device == "cuda" else args.cpu_compile_backend

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, call: Callable[[], Any]) -> tuple[Any, float]:
        self.sync()
        started = time.perf_counter()
        result = call()
        self.sync()
        return result, time.perf_counter() - started

    def warm_up_run(self) -> Any:
        return denoise(self.module, self.inputs, self.args.warmup_steps)

    def request(self) -> torch.Tensor:
        return denoise(self.module, self.inputs, self.args.steps)

    def refresh(self) -> None:
        self.cache.refresh(self.module, self.config, self.args.steps)

    def cached_steps(self) -> int | None:
        return self.cache.summary(self.module).cached_steps if self.cache.is_mounted(self.module) else None

    def serve(self, before: Callable[[], None] | None = None) -> list[dict[str, Any]]:
        """First real request plus ``--requests`` more, each timed with its new graphs."""
        records = []
        for _ in range(1 + self.args.requests):
            graphs = dynamo_graph_count()
            self.sync()
            started = time.perf_counter()
            if before is not None:
                before()
            out = self.request()
            self.sync()
            seconds = time.perf_counter() - started
            records.append(
                {
                    "seconds": seconds,
                    "new_graphs": dynamo_graph_count() - graphs,
                    "cached_steps": self.cached_steps(),
                    "out": out,
                }
            )
        return records


def _summarise(warmup_s: float, warmup_graphs: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    first, rest = records[0], records[1:]
    steady = statistics.median(r["seconds"] for r in rest)
    return {
        "warmup_s": warmup_s,
        "graphs_in_warmup": warmup_graphs,
        "first_request_s": first["seconds"],
        "steady_median_s": steady,
        "first_over_steady": first["seconds"] / steady,
        "graphs_in_first_request": first["new_graphs"],
        "graphs_in_later_requests": sum(r["new_graphs"] for r in rest),
        "cached_steps_first_request": first["cached_steps"],
        "cached_steps_per_request": [r["cached_steps"] for r in records],
        "request_s": [r["seconds"] for r in records],
    }


def _warm(bench: Bench, steps: Callable[[], None]) -> tuple[float, int]:
    graphs = dynamo_graph_count()
    _, seconds = bench.timed(steps)
    return seconds, dynamo_graph_count() - graphs


def scenario_a(bench: Bench) -> dict[str, Any]:
    def steps() -> None:
        bench.module.compile(backend=bench.compile_backend)
        bench.warm_up_run()
        bench.cache.mount(bench.module, bench.config)

    warmup_s, graphs = _warm(bench, steps)
    return _summarise(warmup_s, graphs, bench.serve(bench.refresh))


def scenario_b(bench: Bench) -> dict[str, Any]:
    def steps() -> None:
        bench.cache.mount(bench.module, bench.config)
        bench.module.compile(backend=bench.compile_backend)
        bench.warm_up_run()

    warmup_s, graphs = _warm(bench, steps)
    return _summarise(warmup_s, graphs, bench.serve(bench.refresh))


def scenario_d(bench: Bench) -> dict[str, Any]:
    def steps() -> None:
        bench.cache.mount(bench.module, bench.config)
        bench.warm_up_run()

    warmup_s, graphs = _warm(bench, steps)
    return _summarise(warmup_s, graphs, bench.serve(bench.refresh))


def scenario_e(bench: Bench) -> dict[str, Any]:
    def steps() -> None:
        bench.module.compile(backend=bench.compile_backend)
        bench.warm_up_run()

    warmup_s, graphs = _warm(bench, steps)
    return _summarise(warmup_s, graphs, bench.serve())


def scenario_c(bench: Bench) -> dict[str, Any]:
    import structlog

    from lifecycle import ModuleLifecycle
    from lifecycle.audit import JsonlSink

    audit_path = Path(bench.args.audit) if bench.args.audit else None
    if audit_path is not None:
        # The benchmark is the host here: it decides where the audit goes.
        structlog.configure(processors=[JsonlSink(audit_path, drop=True)])
    lc = ModuleLifecycle(
        bench.module,
        name="transformer",
        backend=bench.device.type,
        cache_config=bench.config,
        compile_options={"backend": bench.compile_backend},
    )
    graphs = dynamo_graph_count()
    _, warmup_s = bench.timed(lambda: lc.prepare(denoiser(bench.inputs, bench.args.warmup_steps)))
    warmup_graphs = dynamo_graph_count() - graphs

    with_request: list[dict[str, Any]] = []
    for _ in range(1 + bench.args.requests):
        graphs = dynamo_graph_count()
        bench.sync()
        started = time.perf_counter()
        with lc.request(num_inference_steps=bench.args.steps) as req:
            out = denoise(lc.module, bench.inputs, bench.args.steps)
        seconds = time.perf_counter() - started  # request() synchronizes the device on exit
        with_request.append(
            {
                "seconds": seconds,
                "new_graphs": dynamo_graph_count() - graphs,
                "cached_steps": req.cached_steps,
                "record_new_graphs": req.new_graphs,
                "out": out,
            }
        )
    result = _summarise(warmup_s, warmup_graphs, with_request)
    result["stats"] = {k: v for k, v in lc.stats().items() if k != "cache"}
    result["request_record_new_graphs"] = [r["record_new_graphs"] for r in with_request]

    # Issue 11: the same identical requests, served straight on the module with no refresh.
    without = bench.serve()
    result["isolation"] = {
        "with_request": _isolation(with_request),
        "without_request": _isolation(without, reference=with_request[0]["out"]),
        "with_over_without_median": result["steady_median_s"]
        / statistics.median(r["seconds"] for r in without[1:]),
    }
    return result


def _isolation(records: list[dict[str, Any]], reference: torch.Tensor | None = None) -> dict[str, Any]:
    first = records[0]["out"].float()
    summary: dict[str, Any] = {
        "max_abs_diff_to_first": [float((r["out"].float() - first).abs().max()) for r in records],
        "cached_steps": [r["cached_steps"] for r in records],
        "request_s": [r["seconds"] for r in records],
        "median_s": statistics.median(r["seconds"] for r in records),
    }
    if reference is not None:
        summary["max_abs_diff_to_first_request_with_request"] = [
            float((r["out"].float() - reference.float()).abs().max()) for r in records
        ]
    return summary


RUNNERS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "a": scenario_a,
    "b": scenario_b,
    "c": scenario_c,
    "d": scenario_d,
    "e": scenario_e,
}


def run_one(args: argparse.Namespace) -> None:
    logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)
    bench = Bench(args)
    result = RUNNERS[args.scenario](bench)
    result.update(
        scenario=args.scenario,
        description=SCENARIOS[args.scenario],
        inductor_caches_disabled=os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES") == "1",
    )
    Path(args.json).write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------- the driver
def machine() -> dict[str, Any]:
    return machine_info()


def run_all(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.scenarios:
            json_path = Path(tmp) / f"{key}.json"
            env = {
                **os.environ,
                "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
                "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / f"inductor-{key}"),
                "PYTHONUNBUFFERED": "1",
            }
            command = [sys.executable, __file__, "--scenario", key, "--json", str(json_path),
                       *_child_args(args)]
            if key == "c" and args.audit:
                command += ["--audit", args.audit]
            started = time.perf_counter()
            proc = subprocess.run(command, env=env, timeout=args.timeout, check=False)
            wall = time.perf_counter() - started
            if proc.returncode != 0 or not json_path.exists():
                results[key] = {"scenario": key, "description": SCENARIOS[key], "error": proc.returncode}
            else:
                results[key] = json.loads(json_path.read_text())
            results[key]["process_wall_s"] = wall
            print(f"[{key}] done in {wall:.1f} s", flush=True)
    report = {
        "benchmark": "gpu_trap",
        "machine": machine(),
        "model": {"class": "diffusers.FluxTransformer2DModel", "weights": "random", **asdict(
            TINY_SHAPE if args.tiny else FLUX_SHAPE)},
        "dtype": "bfloat16" if args.device == "cuda" else "float32",
        "compile_backend": "inductor" if args.device == "cuda" else args.cpu_compile_backend,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "steady_requests": args.requests,
        "cache_config": CacheDitAdapter().describe_config(demo_cache_config(args.steps, args.threshold)),
        "scenarios": results,
        "targets": targets(results),
    }
    out.write_text(json.dumps(report, indent=2))
    print(table(results))
    print(json.dumps(report["targets"], indent=2))
    print(f"written to {out}")


def targets(results: dict[str, Any]) -> dict[str, Any]:
    def get(key: str, field: str) -> Any:
        return results.get(key, {}).get(field)

    checks: dict[str, Any] = {}
    if get("c", "first_over_steady") is not None:
        checks["c_first_within_1.05x_steady"] = get("c", "first_over_steady") <= 1.05
        checks["c_zero_new_graphs"] = get("c", "graphs_in_first_request") == 0
    for key in ("a", "b"):
        if get(key, "graphs_in_first_request") is not None:
            checks[f"{key}_shows_trap"] = get(key, "graphs_in_first_request") > 0
    if get("b", "steady_median_s") and get("c", "steady_median_s"):
        checks["c_steady_over_b_steady"] = get("c", "steady_median_s") / get("b", "steady_median_s")
    isolation = results.get("c", {}).get("isolation")
    if isolation:
        checks["request_identical_outputs"] = max(isolation["with_request"]["max_abs_diff_to_first"]) == 0.0
        checks["request_over_bare_median"] = isolation["with_over_without_median"]
    return checks


def table(results: dict[str, Any]) -> str:
    lines = [
        "| scenario | warm-up s | first request s | steady median s | first/steady | graphs in first "
        "request | cached steps (first) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        if "error" in r:
            lines.append(f"| ({key}) {r['description']} | failed: exit {r['error']} | | | | | |")
            continue
        lines.append(
            f"| ({key}) {r['description']} | {r['warmup_s']:.2f} | {r['first_request_s']:.3f} | "
            f"{r['steady_median_s']:.3f} | {r['first_over_steady']:.2f}x | "
            f"{r['graphs_in_first_request']} | {r['cached_steps_first_request']} |"
        )
    return "\n".join(lines)


def _child_args(args: argparse.Namespace) -> list[str]:
    child = ["--device", args.device, "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
             "--requests", str(args.requests), "--threshold", str(args.threshold),
             "--cpu-compile-backend", args.cpu_compile_backend]
    return [*child, "--tiny"] if args.tiny else child


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny Flux (dry run of the script)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--requests", type=int, default=7, help="requests after the first (steady state)")
    parser.add_argument("--threshold", type=float, default=0.6, help="DBCache residual_diff_threshold")
    parser.add_argument("--cpu-compile-backend", default="aot_eager")
    parser.add_argument("--scenarios", default="abcde", type=lambda s: list(s))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_trap.json"))
    parser.add_argument("--audit", default=None, help="JSONL audit file for scenario (c)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per scenario process")
    parser.add_argument("--scenario", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --tiny --device cpu for a dry run")
    if args.scenario:
        run_one(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
