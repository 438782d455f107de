"""Issue 8: a rank-consistent lifecycle over NCCL, on 2 GPUs (one process per GPU).

Each rank holds a full replica of a Flux-architecture ``FluxTransformer2DModel`` (random weights,
the same seed on every rank: hidden 3072 = 24 heads x 128, 2 double + 4 single blocks, 4096 image
+ 512 text tokens, bf16, 28 steps, cache-dit DBCache F1B0) and takes it through
``lifecycle._distributed.DistributedLifecycle``:

  phase "clean":    mount_cache -> compile (inductor) -> warm_up (2-step callable) -> requests
  phase "failure":  a second replica: mount_cache -> compile -> warm_up whose callable raises on
                    one rank (a simulated warm-up failure such as an OOM) -> every rank must
                    raise and stay Compiled -> prepare again with a good callable -> a request

Per rank it reports the states reached, graphs compiled after warm-up (0 expected), first
request vs steady state, and the states around the injected failure.

    python bench/gpu_distributed.py                    # 2 GPUs, NCCL
    python bench/gpu_distributed.py --device cpu --tiny # dry run of the script: 2 CPU processes, gloo
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _machine import machine_info  # noqa: E402

from adapters import dynamo_graph_count  # noqa: E402
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
# NVLink multicast stays off on shared hosts (device/KINDS.md): forced, not defaulted.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class InjectedFailure(RuntimeError):
    """The failure the benchmark injects into one rank's warm-up."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    shape = FluxShape() if args.tiny else FLUX_SHAPE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        return tiny_flux(shape, seed=0, dtype=dtype)


def _timed(device: torch.device, call: Any) -> float:
    _sync(device)
    started = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - started


def _lifecycle(module: torch.nn.Module, name: str, args: argparse.Namespace, device: torch.device) -> Any:
    from lifecycle._distributed import DistributedLifecycle

    return DistributedLifecycle(
        module,
        name=name,
        backend=device.type,
        cache_config=demo_cache_config(args.steps, threshold=args.threshold),
        compile_options={"backend": "inductor" if device.type == "cuda" else "aot_eager"},
    )


def phase_clean(args: argparse.Namespace, rank: int, device: torch.device, inputs: Any) -> dict[str, Any]:
    lc = _lifecycle(_build(args, device), "transformer", args, device)
    states = [lc.state.value]
    seconds: dict[str, float] = {}
    graphs = dynamo_graph_count()
    seconds["mount_cache"] = _timed(device, lc.mount_cache)
    states.append(lc.state.value)
    seconds["compile"] = _timed(device, lc.compile)
    states.append(lc.state.value)
    seconds["warm_up"] = _timed(device, lambda: lc.warm_up(denoiser(inputs, args.warmup_steps)))
    states.append(lc.state.value)
    graphs_in_warmup = dynamo_graph_count() - graphs

    requests = []
    for index in range(1 + args.requests):
        started = time.perf_counter()
        with lc.request(num_inference_steps=args.steps, request_id=f"rank{rank}-r{index}") as req:
            out = denoise(lc.module, inputs, args.steps)
        requests.append(
            {"seconds": time.perf_counter() - started, "new_graphs": req.new_graphs,
             "cached_steps": req.cached_steps}
        )
        if index == 0:
            first_out = out
    # Replicas with the same weights and inputs: every rank's first output against rank 0's.
    outs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outs, first_out.float().cpu())
    steady = statistics.median(r["seconds"] for r in requests[1:])
    return {
        "states": states,
        "transition_s": seconds,
        "graphs_in_warmup": graphs_in_warmup,
        "warmup_covered_cached_branch": lc.stats()["warmup_covered_cached_branch"],
        "graphs_after_warmup": sum(r["new_graphs"] for r in requests),
        "recompiles_since_warmup": lc.stats()["recompiles_since_warmup"],
        "first_request_s": requests[0]["seconds"],
        "steady_median_s": steady,
        "first_over_steady": requests[0]["seconds"] / steady,
        "request_s": [r["seconds"] for r in requests],
        "cached_steps": [r["cached_steps"] for r in requests],
        "max_abs_diff_to_rank0_first_output": float((first_out.float().cpu() - outs[0]).abs().max()),
        "final_state": lc.state.value,
        "history": [(h.trigger.value, h.source.value, h.dest.value, h.outcome) for h in lc.history],
    }


def phase_failure(args: argparse.Namespace, rank: int, device: torch.device, inputs: Any) -> dict[str, Any]:
    from lifecycle._distributed import DistributedTransitionError

    lc = _lifecycle(_build(args, device), "transformer_failure", args, device)
    lc.mount_cache()
    lc.compile()
    before = lc.state.value

    def failing_warmup(module: torch.nn.Module) -> Any:
        if rank == args.fail_rank:
            raise InjectedFailure(f"injected warm-up failure on rank {rank} (as an OOM would)")
        return denoise(module, inputs, args.warmup_steps)

    error: dict[str, Any] = {"raised": None}
    try:
        lc.warm_up(failing_warmup)
    except DistributedTransitionError as exc:
        error = {
            "raised": type(exc).__name__,
            "failed_ranks": {str(k): v for k, v in exc.failed_ranks.items()},
            "cause": type(exc.__cause__).__name__,
            "message": str(exc),
        }
    except Exception as exc:  # recorded, so a wrong error type shows in the results
        error = {"raised": type(exc).__name__, "message": str(exc)}
    after = lc.state.value
    last = lc.history[-1]

    # Recovery: a good warm-up on every rank, then a request that compiles nothing.
    recovery_s = _timed(device, lambda: lc.prepare(denoiser(inputs, args.warmup_steps)))
    with lc.request(num_inference_steps=args.steps, request_id=f"rank{rank}-after-failure") as req:
        denoise(lc.module, inputs, args.steps)
    return {
        "fail_rank": args.fail_rank,
        "state_before": before,
        "error": error,
        "state_after_failure": after,
        "kept_previous_state": after == before,
        "last_transition": {"trigger": last.trigger.value, "source": last.source.value,
                            "dest": last.dest.value, "outcome": last.outcome},
        "recovery_prepare_s": recovery_s,
        "state_after_recovery": lc.state.value,
        "request_after_recovery": {"new_graphs": req.new_graphs, "cached_steps": req.cached_steps,
                                   "seconds": req.duration_ms / 1000.0},
    }


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)
    if args.audit_dir:
        import structlog

        from lifecycle.audit import JsonlSink

        # The benchmark is the host: one JSONL audit file per rank.
        path = Path(args.audit_dir) / f"gpu_distributed_audit_rank{rank}.jsonl"
        structlog.configure(processors=[structlog.contextvars.merge_contextvars, JsonlSink(path, drop=True)])
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=args.group_timeout),
    )
    try:
        inputs = flux_inputs(FluxShape() if args.tiny else FLUX_SHAPE, seed=1, device=device,
                             dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        result: dict[str, Any] = {"rank": rank, "device": str(device)}
        if device.type == "cuda":
            result["gpu"] = torch.cuda.get_device_name(device)
        result["clean"] = phase_clean(args, rank, device, inputs)
        result["failure"] = phase_failure(args, rank, device, inputs)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            Path(args.json).write_text(json.dumps(gathered, indent=2))
    finally:
        dist.destroy_process_group()


def machine() -> dict[str, Any]:
    return machine_info(env={key: os.environ.get(key) for key in NO_MULTICAST})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--requests", type=int, default=5, help="requests after the first")
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--fail-rank", type=int, default=1)
    parser.add_argument("--group-timeout", type=float, default=600.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_distributed.json"))
    parser.add_argument("--audit-dir", default=None)
    args = parser.parse_args(argv)
    os.environ.update(NO_MULTICAST)
    if args.device == "cuda" and torch.cuda.device_count() < args.world_size:
        raise SystemExit(f"needs {args.world_size} GPUs, found {torch.cuda.device_count()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    args.json = str(out.with_suffix(".ranks.tmp.json"))
    started = time.perf_counter()
    mp.spawn(worker, args=(args.world_size, _free_port(), args), nprocs=args.world_size, join=True)
    ranks = json.loads(Path(args.json).read_text())
    Path(args.json).unlink()
    report = {
        "benchmark": "gpu_distributed",
        "machine": machine(),
        "mode": "per-rank replica (no context parallelism), DistributedLifecycle votes over "
        + ("NCCL" if args.device == "cuda" else "gloo"),
        "world_size": args.world_size,
        "model": {"class": "diffusers.FluxTransformer2DModel", "weights": "random",
                  **(FluxShape() if args.tiny else FLUX_SHAPE).__dict__},
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "wall_s": time.perf_counter() - started,
        "ranks": ranks,
    }
    out.write_text(json.dumps(report, indent=2))
    for r in ranks:
        c, f = r["clean"], r["failure"]
        print(
            f"rank {r['rank']}: states {' -> '.join(c['states'])}; graphs after warm-up "
            f"{c['graphs_after_warmup']}; first {c['first_request_s']:.3f} s vs steady "
            f"{c['steady_median_s']:.3f} s ({c['first_over_steady']:.2f}x); failure: "
            f"{f['error']['raised']} {f['state_before']} -> {f['state_after_failure']}, recovered to "
            f"{f['state_after_recovery']} with {f['request_after_recovery']['new_graphs']} new graphs"
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
