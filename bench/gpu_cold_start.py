"""Cold start: whole-model compile vs regional compile vs warm restart from artifacts.

A Flux-architecture ``FluxTransformer2DModel`` with random weights (hidden 3072 = 24 heads x 128,
4 double + 8 single blocks, 4096 image + 512 text tokens, bf16), 28 denoising steps, inductor,
cache-dit DBCache F1B0 with a threshold under which cached steps occur. Every scenario runs in
its own process with empty inductor and Triton cache directories, as on a fresh replica; the
warm scenarios get only the artifact file their cold scenario saved at WarmedUp:

  whole-cold     ModuleLifecycle.prepare, whole-model compile     (saves artifacts)
  regional-cold  ModuleLifecycle.prepare, CompilePlan(scope="blocks") (saves artifacts)
  whole-warm     as whole-cold, artifacts loaded before compile
  regional-warm  as regional-cold, artifacts loaded before compile
  eager          cache-dit without compile (the steady-state floor compile must beat)

``--reproducible`` compiles every scenario with ``CompilePlan(reproducible=True)``
(adapters/reproducible.py); each restart's final latents are then compared with those of the
process that saved its artifacts (``bit_identical_to_saver``).

Cold start = ``prepare`` (mount + compile + warm-up, a 2-step warm-up callable); each scenario then
serves one first request and ``--requests`` more through ``lc.request()`` and records their time
and new graphs.

    python bench/gpu_cold_start.py                        # CUDA, results to bench/results/
    python bench/gpu_cold_start.py --tiny --device cpu    # a quick dry run of the script on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _machine import machine_info  # noqa: E402

from lifecycle.testing.tiny import (  # noqa: E402
    FluxShape,
    demo_cache_config,
    denoise,
    denoiser,
    flux_architecture,
    flux_inputs,
    tiny_flux,
)

SCENARIOS: dict[str, dict[str, Any]] = {
    "whole-cold": {"regional": False, "artifacts": "whole", "compile": True},
    "regional-cold": {"regional": True, "artifacts": "regional", "compile": True},
    "whole-warm": {"regional": False, "artifacts": "whole", "compile": True},
    "regional-warm": {"regional": True, "artifacts": "regional", "compile": True},
    "eager": {"regional": False, "artifacts": None, "compile": False},
}
FLUX_SHAPE = flux_architecture(4, 8)
TINY_SHAPE = FluxShape(num_layers=2, num_single_layers=3)


def _shape(args: argparse.Namespace) -> FluxShape:
    shape = TINY_SHAPE if args.tiny else FLUX_SHAPE
    if args.blocks:
        shape = dataclasses.replace(shape, num_layers=args.blocks[0], num_single_layers=args.blocks[1])
    return shape


# ---------------------------------------------------------------------------- one scenario
def run_scenario(args: argparse.Namespace) -> dict[str, Any]:
    import structlog

    from adapters import dynamo_graph_count
    from adapters.artifacts import inductor_cache_misses
    from lifecycle import LifecyclePolicy, ModuleLifecycle

    logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)
    spec = SCENARIOS[args.scenario]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = _shape(args)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    if args.blocks:  # large models: make the weights in bf16 directly (half the peak memory)
        torch.set_default_dtype(dtype)
    with device:  # weights made on the device: the same seed gives the same weights everywhere
        module = tiny_flux(shape, seed=0, dtype=dtype)
    torch.set_default_dtype(default_dtype)
    inputs = flux_inputs(shape, seed=1, device=device, dtype=dtype)
    sync()
    build_s = time.perf_counter() - started

    from lifecycle import CompilePlan

    options: dict[str, Any] = {"backend": args.compile_backend}
    plan = CompilePlan(scope="blocks" if spec["regional"] else "model", reproducible=args.reproducible)
    lc = ModuleLifecycle(
        module,
        backend="cuda" if device.type == "cuda" else "cpu",
        policy=LifecyclePolicy(compile=spec["compile"]),
        cache_config=demo_cache_config(args.steps, threshold=args.threshold),
        compile_options=options if spec["compile"] else None,
        compile_plan=plan,
        artifact_dir=(Path(args.artifact_root) / spec["artifacts"]) if spec["artifacts"] else None,
    )
    graphs_before = dynamo_graph_count()
    misses_before = inductor_cache_misses()
    with structlog.testing.capture_logs() as logs:
        sync()
        started = time.perf_counter()
        lc.prepare(denoiser(inputs, args.warmup_steps), num_inference_steps=args.steps)
        sync()
        prepare_s = time.perf_counter() - started
        graphs_in_prepare = dynamo_graph_count() - graphs_before
        inductor_misses = inductor_cache_misses() - misses_before

        records, outputs = [], []
        for index in range(1 + args.requests):
            with lc.request(num_inference_steps=args.steps, request_id=f"r{index}") as req:
                out = denoise(lc.module, inputs, args.steps)
            records.append(req)
            outputs.append(out)
    artifacts = [
        {k: e.get(k) for k in ("action", "status", "detail", "size_bytes", "differing_fields")}
        for e in logs if e["event"] == "lifecycle.artifacts"
    ]
    transitions = {
        e["trigger"]: e["duration_ms"] / 1000.0 for e in logs if e["event"] == "lifecycle.transition"
    }
    torch.save(out.cpu(), Path(args.output_dir) / f"{args.scenario}.pt")
    same_in_process = all(torch.equal(o, out) for o in outputs)
    steady = statistics.median(r.duration_ms / 1000.0 for r in records[1:])
    from torch._dynamo.utils import counters

    return {
        "scenario": args.scenario,
        "options": options if spec["compile"] else None,
        "build_s": build_s,
        "prepare_s": prepare_s,
        "phase_s": transitions,
        "graphs_in_prepare": graphs_in_prepare,
        "inductor_cache_misses": inductor_misses,
        "inductor_cache_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
        "artifacts": artifacts,
        "first_request_s": records[0].duration_ms / 1000.0,
        "graphs_in_first_request": records[0].new_graphs,
        "graphs_in_later_requests": sum(r.new_graphs for r in records[1:]),
        "steady_median_s": steady,
        "request_s": [r.duration_ms / 1000.0 for r in records],
        "cached_steps_per_request": [r.cached_steps for r in records],
        "cold_start_to_first_result_s": prepare_s + records[0].duration_ms / 1000.0,
        "recompiles_since_warmup": lc.stats()["recompiles_since_warmup"],
        "outputs_same_in_process": same_in_process,
        "compile_times_s": compile_times(),
    }


def compile_times(threshold_s: float = 0.2) -> dict[str, float]:
    """torch's own per-phase compile timings (dynamo, AOT, inductor, Triton), the larger ones."""
    try:
        text = torch._dynamo.utils.compile_times(repr="str", aggregate=True)
    except Exception as exc:  # a private API: report, never fail the benchmark
        return {"unavailable": repr(exc)}  # type: ignore[dict-item]
    times: dict[str, float] = {}
    for line in str(text).splitlines():
        # "name, 1.23" (torch 2.13) or a whitespace-aligned table (older releases).
        name, _, value = line.strip().replace(",", " ").rpartition(" ")
        name = name.strip()
        try:
            seconds = float(value)
        except ValueError:
            continue
        if seconds >= threshold_s:
            times[name] = round(seconds, 3)
    return times


# ---------------------------------------------------------------------------- the driver
def machine() -> dict[str, Any]:
    return machine_info()


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    artifact_root, output_dir = work / "artifacts", work / "outputs"
    output_dir.mkdir(parents=True)
    results: dict[str, Any] = {}
    for name in args.scenarios:
        caches = work / f"caches-{name}"  # empty per process: nothing left by an earlier one
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
            "TRITON_CACHE_DIR": str(caches / "triton"),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("TORCHINDUCTOR_FX_GRAPH_CACHE", None)
        env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
        json_path = work / f"{name}.json"
        command = [
            sys.executable, __file__, "--scenario", name, "--json-out", str(json_path),
            "--artifact-root", str(artifact_root), "--output-dir", str(output_dir),
            "--device", args.device, "--steps", str(args.steps), "--requests", str(args.requests),
            "--warmup-steps", str(args.warmup_steps), "--threshold", str(args.threshold),
            "--compile-backend", args.compile_backend,
        ] + (["--tiny"] if args.tiny else []) + (["--reproducible"] if args.reproducible else []) + (
            ["--blocks", *map(str, args.blocks)] if args.blocks else [])
        started = time.perf_counter()
        try:
            returncode: Any = subprocess.run(
                command, env=env, cwd=ROOT, timeout=args.scenario_timeout
            ).returncode
        except subprocess.TimeoutExpired:
            returncode = f"timeout after {args.scenario_timeout} s"
        wall = time.perf_counter() - started
        if returncode != 0 or not json_path.exists():
            results[name] = {"scenario": name, "error": returncode, "process_wall_s": wall}
            if args.fail_fast:
                break
            continue
        results[name] = json.loads(json_path.read_text())
        results[name]["process_wall_s"] = wall
        if os.environ.get("OUT"):  # partial results survive a run cut short
            (Path(os.environ["OUT"]) / "gpu_cold_start-partial.json").write_text(
                json.dumps(results, indent=1, default=str))
        print(f"[{name}] prepare {results[name]['prepare_s']:.2f} s, steady "
              f"{results[name]['steady_median_s']:.4f} s, process {wall:.1f} s", flush=True)
    compare_outputs(results, output_dir)
    return {
        "benchmark": "gpu_cold_start",
        "machine": machine(),
        "model": {"shape": dataclasses.asdict(_shape(args)), "dtype": (
            "bfloat16" if args.device == "cuda" else "float32")},
        "settings": {
            "steps": args.steps, "warmup_steps": args.warmup_steps, "requests": args.requests,
            "threshold": args.threshold, "compile_backend": args.compile_backend,
            "reproducible": args.reproducible,
            "cache": "DBCache F1B0, max_warmup_steps 4",
            "caches": "empty TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR per process",
        },
        "scenarios": results,
        "targets": targets(results),
    }


def compare_outputs(results: dict[str, Any], output_dir: Path) -> None:
    """Final latents of each scenario against whole-cold's (same weights, inputs and steps), and
    of each restart against the process that saved its artifacts (its kind's cold scenario)."""
    def load(name: str) -> torch.Tensor | None:
        path = output_dir / f"{name}.pt"
        return torch.load(path) if path.exists() else None

    reference = load("whole-cold")
    for name, result in results.items():
        mine = load(name)
        if mine is None:
            continue
        if reference is not None:
            result["max_abs_diff_vs_whole_cold"] = float((mine.float() - reference.float()).abs().max())
        if name.endswith("-warm"):
            saver = load(name.replace("-warm", "-cold"))
            if saver is not None:
                result["bit_identical_to_saver"] = bool(torch.equal(mine, saver))
                result["max_abs_diff_vs_saver"] = float((mine.float() - saver.float()).abs().max())


def targets(results: dict[str, Any]) -> dict[str, Any]:
    def get(name: str, key: str) -> Any:
        return results.get(name, {}).get(key)

    out: dict[str, Any] = {}
    whole, regional = get("whole-cold", "prepare_s"), get("regional-cold", "prepare_s")
    if whole and regional:
        out["regional_cold_speedup"] = whole / regional  # a fact, no target
    whole_ss, regional_ss = get("whole-cold", "steady_median_s"), get("regional-cold", "steady_median_s")
    if whole_ss and regional_ss:
        out["regional_steady_vs_whole"] = regional_ss / whole_ss - 1.0
        out["regional_steady_within_3pct"] = abs(regional_ss / whole_ss - 1.0) <= 0.03
    for kind in ("whole", "regional"):
        cold, warm = get(f"{kind}-cold", "prepare_s"), get(f"{kind}-warm", "prepare_s")
        if cold and warm:
            out[f"{kind}_warm_restart_speedup"] = cold / warm
            out[f"{kind}_restart_over_cold"] = warm / cold
            out[f"{kind}_restart_target_0.15x"] = warm / cold <= 0.15
            out[f"{kind}_restart_bit_identical_to_saver"] = get(f"{kind}-warm", "bit_identical_to_saver")
    if whole and get("regional-warm", "prepare_s"):
        out["regional_warm_vs_whole_cold_speedup"] = whole / get("regional-warm", "prepare_s")
    firsts = {name: r.get("graphs_in_first_request") for name, r in results.items()}
    out["graphs_in_first_request"] = firsts
    out["first_request_adds_no_graph"] = all(v == 0 for v in firsts.values())
    return out


def table(report: dict[str, Any]) -> str:
    rows = ["| scenario | prepare (cold start) | first request | steady 28 steps | graphs in prepare "
            "| graphs in 1st request | artifacts | same output as saver |", "|---" * 8 + "|"]
    for name, r in report["scenarios"].items():
        if "error" in r:
            rows.append(f"| {name} | failed ({r['error']}) | | | | | | |")
            continue
        arts = ", ".join(f"{a['action']}: {a['status']}" for a in r["artifacts"]) or "-"
        rows.append(
            f"| {name} | {r['prepare_s']:.2f} s | {r['first_request_s']:.3f} s | "
            f"{r['steady_median_s']:.4f} s | {r['graphs_in_prepare']} | "
            f"{r['graphs_in_first_request']} | {arts} | {r.get('bit_identical_to_saver', '-')} |"
        )
    return "\n".join(rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny Flux (a CPU dry run)")
    parser.add_argument("--blocks", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"),
                        help="other block counts, e.g. 19 38 for FLUX.1-dev's (default 4 8)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--requests", type=int, default=5, help="requests after the first (5)")
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed scenario")
    parser.add_argument("--reproducible", action="store_true",
                        help="CompilePlan(reproducible=True) in every compiled scenario")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--out", default=None, help="results JSON (default: bench/results/...)")
    parser.add_argument("--scenario-timeout", type=float, default=None, help="seconds per scenario")
    # Internal: one scenario in this process.
    parser.add_argument("--scenario", choices=list(SCENARIOS), help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    parser.add_argument("--artifact-root", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.scenario:
        Path(args.json_out).write_text(json.dumps(run_scenario(args), indent=2, default=str))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --tiny --device cpu for a dry run")
    report = run_all(args)
    gpu = report["machine"].get("gpu", "cpu").replace(" ", "-")
    size = f"-{args.blocks[0]}x{args.blocks[1]}" if args.blocks else ""
    size += "-reproducible" if args.reproducible else ""
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu_cold_start-{gpu}{size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / out.name).write_text(out.read_text())
    print(table(report))
    print(json.dumps(report["targets"], indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
