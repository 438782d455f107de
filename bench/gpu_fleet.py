"""One build per fleet, at FLUX.1-dev's full size, on a GPU: cold starts, restarts, replicas together.

    CXX=/usr/bin/g++ python bench/gpu_fleet.py --out DIR [--blocks 19 38] [--replicas 4]
    python bench/gpu_fleet.py --device cpu --tiny --out /tmp/x           # a dry run on a CPU

A Flux transformer of ``--blocks`` double + single blocks at FLUX.1's width (19 + 38: FLUX.1-dev,
11.9B parameters; random weights, bf16) under cache-dit DBCache F1B0, 28 steps, the four buckets
1024x1024, 512x512, 768x1344 and 768x768, each scenario a process of its own with empty
compiler caches:

- ``jit-model``: ``CompilePlan(scope="model")``, compiled just in time (the baseline);
- ``jit-blocks``: ``CompilePlan(scope="blocks")``, just in time;
- ``aot-build``: ahead-of-time blocks, built into an empty local store;
- ``aot-restart-local``: the same lifecycle again, loading that store;
- ``aot-restart-s3``: loading the same packages from an S3-compatible store (moto on 127.0.0.1,
  started by this script) into an empty node cache;
- ``fleet``: ``--replicas`` processes started together on an empty S3 prefix: how many built,
  and the time from their start until all of them are WarmedUp.

Each reports prepare (to WarmedUp), dynamo graphs during prepare and during its requests, and per
bucket the first request and the median of the steady ones; restarts' outputs are compared with
the build's. Result: ``DIR/gpu_fleet-<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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
    finished,
    first_and_steady,
    model_arguments,
    run_child,
    write_report,
)

BUCKETS = {"1024x1024": 4096, "512x512": 1024, "768x1344": 4032, "768x768": 2304}
TINY_BUCKETS = {"b64": 64, "b16": 16, "b48": 48, "b32": 32}
SCENARIOS = ("jit-model", "jit-blocks", "aot-build", "aot-restart-local", "aot-restart-s3", "fleet")
BUCKET_NAME = "dit-fleet"


def _store_options(endpoint: str | None) -> dict[str, Any] | None:
    if endpoint is None:
        return None
    return {"key": "testing", "secret": "testing", "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"}}


def child(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import torch
    from _flux import bench_flux

    from adapters import dynamo_graph_count
    from lifecycle import CompilePlan, ModuleLifecycle
    from lifecycle.testing import capture_audit
    from lifecycle.testing.tiny import demo_cache_config, denoise

    started_process = float(args.started)
    device = torch.device(args.device)
    buckets = TINY_BUCKETS if args.tiny else BUCKETS
    if args.buckets:
        buckets = {name: buckets[name] for name in args.buckets}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    built_at = time.perf_counter()
    flux = bench_flux(device, args.blocks, tiny=args.tiny)
    model, inputs = flux.model, flux.inputs
    sync()
    result: dict[str, Any] = {"scenario": args.scenario, "index": args.index,
                              "model_build_s": round(time.perf_counter() - built_at, 2),
                              "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 2)}

    def run(module: torch.nn.Module, bucket: dict[str, int]) -> None:
        with torch.inference_mode():
            denoise(module, inputs(bucket["tokens"]), args.warmup_steps)

    aot = args.scenario.startswith(("aot", "fleet"))
    plan = CompilePlan(scope="model" if args.scenario == "jit-model" else "blocks", ahead_of_time=aot)
    extra: dict[str, Any] = {}
    if aot:
        remote = args.artifacts.startswith("s3://")
        extra = {"artifact_dir": args.artifacts,
                 "artifact_storage_options": _store_options(args.endpoint) if remote else None,
                 "cache_dir": args.cache_dir, "build_wait_s": args.timeout}
    lc = ModuleLifecycle(model, name="transformer", backend=device.type, compile_plan=plan,
                         cache_config=demo_cache_config(args.steps, threshold=args.threshold), **extra)
    graphs = dynamo_graph_count()
    with capture_audit() as events:
        sync()
        started = time.perf_counter()
        lc.prepare(run, shapes=[{"tokens": tokens} for tokens in buckets.values()])
        sync()
        result["prepare_s"] = round(time.perf_counter() - started, 3)
        result["warm_after_process_start_s"] = round(time.time() - started_process, 3)
        result["prepare_graphs"] = dynamo_graph_count() - graphs
        compile_event = next(e for e in events.of("lifecycle.transition") if e["trigger"] == "compile")
        result["compile"] = {k: v for k, v in compile_event.items()
                             if k not in ("event", "timestamp", "policy", "module_id", "level")}
        result["artifact_events"] = [{k: v for k, v in e.items() if k not in ("timestamp", "module_id")}
                                     for e in events.of("lifecycle.artifacts")][:20]
        graphs = dynamo_graph_count()
        served: dict[str, Any] = {}
        outputs = {}
        for name, tokens in buckets.items():
            times = []
            # Replicas sharing one GPU measure readiness, not serving: one request per bucket.
            for _ in range(1 + (args.repeats if args.scenario != "fleet" else 0)):
                sync()
                t = time.perf_counter()
                with torch.inference_mode(), lc.request(num_inference_steps=args.steps):
                    out = denoise(lc.module, inputs(tokens), args.steps)
                sync()
                times.append(time.perf_counter() - t)
            outputs[name] = out.float().cpu()
            served[name] = first_and_steady(tokens, times)
        result["requests"] = served
        result["request_graphs"] = dynamo_graph_count() - graphs
    torch.save(outputs, Path(args.outputs) / f"{args.scenario}-{args.index}.pt")
    return result


def _start_s3() -> tuple[Any, str]:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET_NAME)
    return server, endpoint


def _upload(folder: Path, endpoint: str, prefix: str) -> int:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    count = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET_NAME, f"{prefix}/{path.relative_to(folder).as_posix()}")
            count += 1
    return count


def _command(args: argparse.Namespace, scenario: str, index: int, artifacts: str, outputs: Path,
             endpoint: str | None, cache_dir: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", "--scenario", scenario,
            "--index", str(index), "--artifacts", artifacts, "--outputs", str(outputs),
            *model_arguments(args), "--repeats", str(args.repeats),
            *(["--buckets", *args.buckets] if args.buckets else []),
            "--timeout", str(args.timeout), "--cache-dir", cache_dir,
            "--started", repr(time.time()), *(["--endpoint", endpoint] if endpoint else [])]


def parent(args: argparse.Namespace) -> dict[str, Any]:
    from _machine import machine_info

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # A --work folder kept between runs lets the scenarios be split over several invocations
    # (the restarts load the store an earlier invocation built).
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fleet-"))
    local = work / "store"
    outputs = work / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"bench": "gpu_fleet", "machine": machine_info(), "args": vars(args),
                              "cxx": os.environ.get("CXX"), "runs": []}
    server, endpoint = _start_s3() if {"aot-restart-s3", "fleet"} & set(args.scenarios) else (None, None)

    def env_for(name: str) -> dict[str, str]:
        credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        return empty_compiler_caches(name, credentials)

    try:
        for scenario in [s for s in SCENARIOS if s in args.scenarios and s != "fleet"]:
            if scenario == "aot-restart-s3":
                if not local.exists():
                    continue
                report["s3_objects_uploaded"] = _upload(local, endpoint, "restart")
                artifacts = f"s3://{BUCKET_NAME}/restart"
            else:
                artifacts = str(local if scenario.startswith("aot") else work / f"own-{scenario}")
            entry = run_child(_command(args, scenario, 0, artifacts, outputs, endpoint,
                                       tempfile.mkdtemp(prefix="node-cache-")),
                              env_for(scenario), args.timeout, scenario=scenario, index=0)
            report["runs"].append(entry)
            print(json.dumps(entry)[:1500], flush=True)
            (out / "partial.json").write_text(json.dumps(report, indent=1))
        if "fleet" in args.scenarios:
            started = time.perf_counter()
            processes = [subprocess.Popen(_command(args, "fleet", index, f"s3://{BUCKET_NAME}/fleet", outputs,
                                                   endpoint, tempfile.mkdtemp(prefix="node-cache-")),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=env_for(f"fleet-{index}"))
                         for index in range(args.replicas)]
            entries = []
            for index, process in enumerate(processes):
                stdout, stderr = process.communicate(timeout=args.timeout)
                done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
                entries.append(finished(done, time.perf_counter() - started, scenario="fleet", index=index))
            report["runs"].extend(entries)
            warm = [e.get("warm_after_process_start_s") for e in entries]
            report["fleet"] = {
                "replicas": args.replicas,
                "all_warm_s": max(w for w in warm if w is not None) if None not in warm else None,
                "outcomes": [str(e.get("compile", {}).get("ahead_of_time")) for e in entries],
            }
            print(json.dumps(report["fleet"]), flush=True)
    finally:
        if server is not None:
            server.stop()
    reference_path = outputs / "aot-build-0.pt"
    if reference_path.exists():
        report["bit_identical_to_build"] = bit_identical(reference_path, [
            path for path in sorted(outputs.glob("*.pt"))
            if path.stem != "aot-build-0" and not path.stem.startswith("jit")])
    write_report(report, out, "gpu_fleet", "-" + "-".join(args.scenarios) if args.work else "")
    return report


def main() -> None:
    parser = bench_parser(__doc__, blocks=(19, 38), repeats=2, timeout=900)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--buckets", nargs="+", help="a subset of the buckets, by name")
    parser.add_argument("--work", help="keep the store and outputs here, across invocations")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--scenario")
    parser.add_argument("--outputs")
    parser.add_argument("--endpoint")
    parser.add_argument("--cache-dir")
    parser.add_argument("--started", default="0")
    dispatch(parser, child, parent)


if __name__ == "__main__":
    main()
