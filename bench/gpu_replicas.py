"""Replicas and restarts: do separate processes serve bit-identical outputs?

The ``bench/gpu_trap.py`` model (Flux architecture at FLUX.1 width, 2 double + 4 single blocks,
4096 image + 512 text tokens, bf16, random weights from one seed), 28 steps, cache-dit DBCache
F1B0 through ``ModuleLifecycle`` (prepare, then requests through ``lc.request()``), inductor.
Every process starts with empty inductor and Triton cache directories of its own (a cold
compile, as on a fresh replica), except a restart, which gets the compile-artifact file its
saving process wrote at WarmedUp (``artifact_dir=``) and nothing else.

Settings, interleaved so that slow drifts of the machine hit both alike:

  default-N      compile_options {"backend": "inductor"}
  repro-N        compile_options {"backend": "inductor"}, CompilePlan(reproducible=True)
  <setting>-restart   as <setting>-1, loading <setting>-1's artifacts
  eager-N        cache-dit without compile (the control: expected bit-identical)

Per process: the final latents of the first request (sha256 of the raw bf16 bytes, and the
tensor), whether every later request in the process matched the first, steady-state request
time (median of the later requests), and, for the diagnosis, what inductor chose: the names of
the generated source files (named by a hash of their code, so two processes that generated the
same code list the same names) and each autotuned kernel's winning config (its ``.best_config``
file) with the kernel's kind (pointwise / reduction / persistent_reduction).

    python bench/gpu_replicas.py                     # on a GPU; results to bench/results/
    python bench/gpu_replicas.py --tiny --device cpu --processes 2 --compile-backend aot_eager
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
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

FLUX_SHAPE = flux_architecture(2, 4)
TINY_SHAPE = FluxShape()
_KIND = re.compile(r"@triton_heuristics\.(\w+)")


def torch_facts() -> dict[str, Any]:
    """What this torch offers for reproducibility and restarts."""
    facts: dict[str, Any] = {"torch": torch.__version__}
    try:
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        facts["inductor_config_deterministic"] = hasattr(inductor_config, "deterministic")
        facts["inductor_config_batch_invariant"] = hasattr(inductor_config, "batch_invariant")
        facts["dynamo_caching_precompile"] = hasattr(dynamo_config, "caching_precompile")
        facts["torch_compiler_save_cache_artifacts"] = hasattr(torch.compiler, "save_cache_artifacts")
        facts["torch_compiler_load_compiled_function"] = hasattr(
            torch.compiler, "load_compiled_function"
        )
        facts["torch_dynamo_aot_compile"] = hasattr(torch._dynamo, "aot_compile")
        facts["compiled_function_aot_compile"] = hasattr(torch.compile(lambda x: x), "aot_compile")
    except Exception as exc:  # a probe: report, never fail the benchmark
        facts["error"] = repr(exc)
    return facts


# ---------------------------------------------------------------------------- one process
def run_process(args: argparse.Namespace) -> dict[str, Any]:
    from adapters.artifacts import inductor_cache_misses
    from lifecycle import LifecyclePolicy, ModuleLifecycle

    logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = TINY_SHAPE if args.tiny else FLUX_SHAPE
    setting = args.process.rsplit("-", 1)[0]
    compiled = setting != "eager"
    with device:  # weights made on the device: the same seed gives the same weights everywhere
        module = tiny_flux(shape, seed=0, dtype=dtype)
    inputs = flux_inputs(shape, seed=1, device=device, dtype=dtype)
    from lifecycle import CompilePlan

    options: dict[str, Any] = {"backend": args.compile_backend}
    lc = ModuleLifecycle(
        module,
        backend="cuda" if device.type == "cuda" else "cpu",
        policy=LifecyclePolicy(compile=compiled),
        cache_config=demo_cache_config(args.steps, threshold=args.threshold),
        compile_options=options if compiled else None,
        compile_plan=CompilePlan(reproducible=setting == "repro"),
        artifact_dir=args.artifact_dir if compiled else None,
    )
    import structlog

    with structlog.testing.capture_logs() as logs:
        started = time.perf_counter()
        lc.prepare(denoiser(inputs, args.warmup_steps), num_inference_steps=args.steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        prepare_s = time.perf_counter() - started
        outputs, records = [], []
        for index in range(1 + args.requests):
            with lc.request(num_inference_steps=args.steps, request_id=f"r{index}") as req:
                out = denoise(lc.module, inputs, args.steps)
            outputs.append(out)
            records.append(req)
    first = outputs[0]
    torch.save(first.cpu(), Path(args.output_dir) / f"{args.process}.pt")
    digest = hashlib.sha256(first.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    compile_events = [e for e in logs if e.get("event") == "lifecycle.transition"
                      and e.get("trigger") == "compile"]
    return {
        "process": args.process,
        "setting": setting,
        "options": options if compiled else None,
        "prepare_s": prepare_s,
        "output_sha256": digest,
        "same_in_process": all(torch.equal(o, first) for o in outputs[1:]),
        "first_request_s": records[0].duration_ms / 1000.0,
        "steady_median_s": statistics.median(r.duration_ms / 1000.0 for r in records[1:]),
        "request_s": [r.duration_ms / 1000.0 for r in records],
        "cached_steps": [r.cached_steps for r in records],
        "graphs_in_first_request": records[0].new_graphs,
        "inductor_cache_misses": inductor_cache_misses(),
        "artifacts": [
            {k: e.get(k) for k in ("action", "status", "detail")}
            for e in logs if e.get("event") == "lifecycle.artifacts"
        ],
        "reproducible_audit": compile_events[-1].get("reproducible") if compile_events else None,
        "inductor": inductor_choices(Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/nonexistent"))),
    }


def inductor_choices(cache_dir: Path) -> dict[str, Any]:
    """Generated Triton kernels (files named by a hash of their code) and autotuned winners."""
    kernels: dict[str, str | None] = {}  # source path -> kind
    for source in sorted(cache_dir.rglob("*.py")) if cache_dir.is_dir() else []:
        text = source.read_text(errors="replace")
        match = _KIND.search(text)
        if match and "async_compile" not in text:  # a kernel, not a graph's wrapper module
            kernels[str(source)] = match.group(1)
    owner: dict[str, str] = {}
    try:  # which kernel a .best_config belongs to: torch's own naming (private, so guarded)
        from torch._inductor.runtime.autotune_cache import AutotuneCache

        for kernel in kernels:
            key = AutotuneCache._prepare_key(kernel)
            owner[AutotuneCache._make_local_cache_key(os.path.dirname(kernel), key)] = kernel
    except Exception:
        pass
    winners: dict[str, Any] = {}
    for best in sorted(cache_dir.rglob("*.best_config")) if cache_dir.is_dir() else []:
        try:
            chosen = json.loads(best.read_text())
        except (OSError, ValueError):
            continue
        for volatile in ("time_taken_ms", "triton_cache_hash"):
            chosen.pop(volatile, None)
        kernel_path = owner.get(str(best))
        name = Path(kernel_path).stem if kernel_path else best.stem
        winners[name] = {"kind": kernels.get(kernel_path) if kernel_path else None, "config": chosen}
    return {"source_files": sorted(Path(k).name for k in kernels), "autotuned": winners}


# ---------------------------------------------------------------------------- the driver
def plan(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(process name, name of the process whose artifacts it loads, or None)."""
    order: list[tuple[str, str | None]] = []
    for index in range(1, args.processes + 1):
        order += [(f"{s}-{index}", None) for s in args.settings if s != "eager"]
    order += [(f"{s}-restart", f"{s}-1") for s in args.restarts]
    if "eager" in args.settings:
        order += [(f"eager-{i}", None) for i in range(1, args.eager_processes + 1)]
    return order


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="replicas-"))
    outputs = work / "outputs"
    outputs.mkdir()
    results: dict[str, Any] = {}
    for name, source in plan(args):
        artifacts = work / "artifacts" / name
        if source is not None:
            saved = work / "artifacts" / source
            if saved.is_dir():
                shutil.copytree(saved, artifacts)
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": str(work / "caches" / name / "inductor"),
            "TRITON_CACHE_DIR": str(work / "caches" / name / "triton"),
            "PYTHONUNBUFFERED": "1",
        }
        for var in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_FORCE_DISABLE_CACHES",
                    "TORCHINDUCTOR_DETERMINISTIC"):
            env.pop(var, None)
        json_path = work / f"{name}.json"
        command = [
            sys.executable, __file__, "--process", name, "--json-out", str(json_path),
            "--artifact-dir", str(artifacts), "--output-dir", str(outputs),
            "--device", args.device, "--steps", str(args.steps), "--requests", str(args.requests),
            "--warmup-steps", str(args.warmup_steps), "--threshold", str(args.threshold),
            "--compile-backend", args.compile_backend,
        ] + (["--tiny"] if args.tiny else [])
        started = time.perf_counter()
        try:
            code: Any = subprocess.run(command, env=env, cwd=ROOT, timeout=args.process_timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {args.process_timeout} s"
        wall = time.perf_counter() - started
        if code != 0 or not json_path.exists():
            results[name] = {"process": name, "error": code, "process_wall_s": wall}
            if args.fail_fast:
                break
            continue
        results[name] = {**json.loads(json_path.read_text()), "process_wall_s": wall}
        if source is not None:
            results[name]["restart_of"] = source
        r = results[name]
        if os.environ.get("OUT"):  # partial results survive a run cut short
            (Path(os.environ["OUT"]) / "gpu_replicas-partial.json").write_text(
                json.dumps(results, indent=1, default=str))
        print(f"[{name}] prepare {r['prepare_s']:.2f} s, steady {r['steady_median_s']:.4f} s, "
              f"sha {r['output_sha256'][:12]}, process {wall:.1f} s", flush=True)
    return {
        "benchmark": "gpu_replicas",
        "machine": machine_info(),
        "torch_facts": torch_facts(),
        "model": {"shape": dataclasses.asdict(TINY_SHAPE if args.tiny else FLUX_SHAPE),
                  "dtype": "bfloat16" if args.device == "cuda" else "float32"},
        "settings": {
            "steps": args.steps, "warmup_steps": args.warmup_steps, "requests": args.requests,
            "threshold": args.threshold, "compile_backend": args.compile_backend,
            "cache": "DBCache F1B0, max_warmup_steps 4",
            "caches": "empty TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR per process",
        },
        "processes": results,
        "summary": summarise(results, outputs),
    }


def summarise(results: dict[str, Any], outputs: Path) -> dict[str, Any]:
    ok = {n: r for n, r in results.items() if "error" not in r}
    by_setting: dict[str, list[str]] = {}
    for name, r in ok.items():
        if "restart_of" not in r:
            by_setting.setdefault(r["setting"], []).append(name)
    summary: dict[str, Any] = {}
    for setting, names in by_setting.items():
        diffs = max_abs_diffs(outputs, names)
        steady = [ok[n]["steady_median_s"] for n in names]
        summary[setting] = {
            "processes": names,
            "distinct_outputs": len({ok[n]["output_sha256"] for n in names}),
            "max_abs_diff_vs_first_process": diffs,
            "same_in_every_process": all(ok[n]["same_in_process"] for n in names),
            "steady_median_s_per_process": steady,
            "steady_median_s": statistics.median(steady),
            "cached_steps": sorted({tuple(ok[n]["cached_steps"]) for n in names}),
            "generated_code_identical": len({tuple(ok[n]["inductor"]["source_files"]) for n in names}) == 1,
            "autotuned_kernels_differing": differing_winners([ok[n] for n in names]),
        }
    for name, r in ok.items():
        if "restart_of" in r and r["restart_of"] in ok and (outputs / f"{name}.pt").exists():
            saver = ok[r["restart_of"]]
            a = torch.load(outputs / f"{name}.pt").float()
            b = torch.load(outputs / f"{r['restart_of']}.pt").float()
            summary[name] = {
                "bit_identical_to_saver": r["output_sha256"] == saver["output_sha256"],
                "max_abs_diff_vs_saver": float((a - b).abs().max()),
                "artifacts": r["artifacts"],
                "graphs_in_first_request": r["graphs_in_first_request"],
                "inductor_cache_misses": r["inductor_cache_misses"],
            }
    if "default" in summary and "repro" in summary:
        base = summary["default"]["steady_median_s"]
        ratios = [s / base for s in summary["repro"]["steady_median_s_per_process"]]
        summary["reproducible_cost"] = {
            "median_ratio": statistics.median(ratios), "worst_ratio": max(ratios),
            "per_process_ratio": ratios,
            "definition": "each repro process's steady median over the median of the default processes",
        }
    return summary


def max_abs_diffs(outputs: Path, names: list[str]) -> dict[str, float | None]:
    """Each process's first output against the first process's (None where one is missing)."""
    path = outputs / f"{names[0]}.pt"
    if not path.exists():
        return dict.fromkeys(names)
    reference = torch.load(path).float()
    return {
        n: float((torch.load(outputs / f"{n}.pt").float() - reference).abs().max())
        if (outputs / f"{n}.pt").exists() else None
        for n in names
    }


def _kind(entry: dict[str, Any]) -> str:
    """A kernel's kind: from its source when found, else from its config's keys."""
    if entry.get("kind"):
        return str(entry["kind"])
    config = entry.get("config") or {}
    if "R0_BLOCK" in config:
        return "reduction"
    family = str(config.get("configs_hash", ""))[:8]
    return f"candidates {family}"


def differing_winners(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Autotuned kernels whose winning config is not the same in every process, by kind."""
    names = sorted({k for r in runs for k in r["inductor"]["autotuned"]})
    differing: dict[str, Any] = {"count_autotuned": len(names), "by_kind": {}, "examples": {}}
    for kernel in names:
        seen = [r["inductor"]["autotuned"].get(kernel) for r in runs]
        configs = {json.dumps(s["config"], sort_keys=True) if s else None for s in seen}
        if len(configs) > 1:
            kind = next((_kind(s) for s in seen if s), "?")
            differing["by_kind"][kind] = differing["by_kind"].get(kind, 0) + 1
            differing["examples"][kernel] = [
                {k: v for k, v in s["config"].items() if k not in ("configs_hash", "found_by_coordesc")}
                if s else None for s in seen
            ]
    kinds: dict[str, int] = {}
    for kernel in names:
        found = [r["inductor"]["autotuned"][kernel] for r in runs if kernel in r["inductor"]["autotuned"]]
        kinds[_kind(found[0])] = kinds.get(_kind(found[0]), 0) + 1
    differing["autotuned_by_kind"] = kinds
    return differing


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny Flux (a CPU dry run)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--requests", type=int, default=10, help="requests after the first (10)")
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--processes", type=int, default=3, help="cold processes per setting (3)")
    parser.add_argument("--eager-processes", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=["default", "repro", "eager"],
                        choices=["default", "repro", "eager"])
    parser.add_argument("--restarts", nargs="*", default=["default", "repro"],
                        choices=["default", "repro"])
    parser.add_argument("--process-timeout", type=float, default=None)
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed process")
    parser.add_argument("--out", default=None)
    # Internal: one process.
    parser.add_argument("--process", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    parser.add_argument("--artifact-dir", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.process:
        Path(args.json_out).write_text(json.dumps(run_process(args), indent=2, default=str))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --tiny --device cpu for a dry run")
    report = run_all(args)
    gpu = report["machine"].get("gpu", "cpu").replace(" ", "-")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu_replicas-{gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / out.name).write_text(out.read_text())
    print(json.dumps(report["summary"], indent=1, default=str))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
