"""DistributedLifecycle over gloo with real processes (torch.multiprocessing spawn): every rank
reaches each state together, and a fault on one rank leaves every rank where it was.

Each spawn costs a few seconds of imports per process, so one spawn runs a whole scenario and
each rank writes what it saw to a JSON file the test then checks."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adapters.cpu import CpuAdapter
from lifecycle import InvalidConfigError, LifecyclePolicy
from lifecycle._distributed import DistributedLifecycle, DistributedTransitionError

COMPILE = {"backend": "aot_eager"}
STEPS = 8
FAULTY_RANK = 1


class _FlakyCpu(CpuAdapter):
    """The real CPU adapter with one injected compile failure (used on one rank only)."""

    def __init__(self) -> None:
        self.failures_left = 1

    def compile(self, module, options, plan):
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("injected compile failure")
        super().compile(module, options, plan)


def _outcome(fn) -> dict[str, Any]:
    try:
        fn()
    except DistributedTransitionError as exc:
        return {"error": type(exc).__name__, "failed_ranks": sorted(exc.failed_ranks),
                "message": str(exc)}
    return {"error": None}


def _flux_scenario(rank: int, lc_kwargs: dict[str, Any], out: dict[str, Any]) -> None:
    from lifecycle.testing.tiny import demo_cache_config, denoise, flux_inputs, tiny_flux

    inputs = flux_inputs()
    backend = _FlakyCpu() if rank == FAULTY_RANK else "cpu"
    lc = DistributedLifecycle(tiny_flux(), backend=backend, cache_config=demo_cache_config(STEPS),
                              compile_options=COMPILE, **lc_kwargs)
    warmup_failures = [1 if rank == FAULTY_RANK else 0]

    def run(module):
        if warmup_failures[0]:
            warmup_failures[0] -= 1
            raise RuntimeError("injected warm-up failure")
        denoise(module, inputs, 1)

    out["compile_fault"] = _outcome(lambda: lc.prepare(run))
    out["after_compile_fault"] = {"state": lc.state.value,
                                  "compiled": lc.module._compiled_call_impl is not None}
    out["warmup_fault"] = _outcome(lambda: lc.prepare(run))
    out["after_warmup_fault"] = {"state": lc.state.value}
    out["retry"] = _outcome(lambda: lc.prepare(run))
    out["after_retry"] = {"state": lc.state.value}
    new_graphs = []
    for _ in range(2):
        with lc.request(num_inference_steps=STEPS) as req:
            denoise(lc.module, inputs, STEPS)
        new_graphs.append(req.new_graphs)
    out["request_new_graphs"] = new_graphs
    lc.refresh(num_inference_steps=STEPS)
    lc.reset()
    out["final"] = {"state": lc.state.value, "mounted": bool(getattr(lc.module, "_is_cached", False)),
                    "compiled": lc.module._compiled_call_impl is not None}


class _FlakyDecompile(CpuAdapter):
    """The real CPU adapter with one injected failure when dropping compiled code (reset)."""

    def __init__(self) -> None:
        self.failures_left = 1

    def decompile(self, module):
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("injected reset failure")
        super().decompile(module)


def _linear_scenario(rank: int, lc_kwargs: dict[str, Any], out: dict[str, Any]) -> None:
    """A module cache-dit does not know, compile-only: a warm-up fault on the last rank, ranks
    calling different triggers, and a reset that fails on rank 0 only."""
    from lifecycle import IllegalTransitionError
    from lifecycle._distributed import RankDivergenceError

    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    x = torch.randn(2, 8)
    world = dist.get_world_size()
    failures = [1 if rank == world - 1 else 0]

    def run(m):
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("injected warm-up failure")
        m(x)

    bad = {"backend": "no-such-compiler"} if rank == world - 1 else {"backend": "eager"}
    try:  # refused on the last rank only: every rank refuses, nobody waits in a later vote
        DistributedLifecycle(module, name="head", policy=LifecyclePolicy(cache_dit=False),
                             backend="cpu", compile_options=bad)
    except InvalidConfigError as exc:
        out["construct"] = "no-such-compiler" in str(exc)
    backend = _FlakyDecompile() if rank == 0 else "cpu"
    lc = DistributedLifecycle(module, name="head", policy=LifecyclePolicy(cache_dit=False),
                              backend=backend, compile_options={"backend": "eager"}, **lc_kwargs)
    out["warmup_fault"] = _outcome(lambda: lc.prepare(run))
    out["after_warmup_fault"] = {"state": lc.state.value}
    out["retry"] = _outcome(lambda: lc.prepare(run))
    out["after_retry"] = {"state": lc.state.value}
    try:
        lc.refresh()  # illegal under compile-only on every rank: refused everywhere alike
    except IllegalTransitionError as exc:
        out["refresh"] = type(exc).__name__
    try:  # rank 0 and the others call different triggers at the same point
        lc.invalidate() if rank == 0 else lc.warm_up(run)
    except RankDivergenceError as exc:
        out["divergence"] = type(exc).__name__
    out["after_divergence"] = {"state": lc.state.value}
    out["reset_fault"] = _outcome(lc.reset)
    out["after_reset_fault"] = {"state": lc.state.value}
    lc.reset()
    out["final"] = {"state": lc.state.value, "compiled": lc.module._compiled_call_impl is not None}

    # A pipeline of distributed members: its joint warm-up votes once per member, in order.
    from lifecycle import PipelineError, PipelineLifecycle

    plc = PipelineLifecycle({
        name: DistributedLifecycle(torch.nn.Linear(8, 8), name=name, policy=LifecyclePolicy(cache_dit=False),
                                   backend="cpu", compile_options={"backend": "eager"})
        for name in ("transformer", "transformer_2")
    })
    failures[0] = 1 if rank == world - 1 else 0
    joint = lambda modules: [run(m) for m in modules.values()]  # noqa: E731
    try:
        plc.prepare(joint)
    except PipelineError as exc:
        out["pipeline_fault"] = list(exc.members)
    out["pipeline_after_fault"] = [m.state.value for m in plc.members.values()]
    plc.prepare(joint)
    out["pipeline_after_retry"] = plc.state.value


SCENARIOS = {"flux": _flux_scenario, "linear": _linear_scenario}


def _worker(rank: int, world_size: int, tmp: str, scenario: str) -> None:
    from structlog.contextvars import merge_contextvars
    from structlog.testing import capture_logs

    from lifecycle.testing import AuditEvents

    torch.set_num_threads(1)
    logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    out: dict[str, Any] = {"rank": rank}
    try:
        with capture_logs(processors=[merge_contextvars]) as logs:
            events = AuditEvents(logs)
            SCENARIOS[scenario](rank, {}, out)
        transitions = events.of("lifecycle.transition")
        out["transitions"] = [
            {k: e.get(k) for k in ("module", "trigger", "outcome", "seq", "rank", "world_size", "error")}
            for e in transitions
        ]
        out["request_ranks"] = [e.get("rank") for e in events.of("lifecycle.request")]
    finally:
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(out))
        # Every rank reaches the end before any tears gloo down: a rank that destroys its group
        # while a peer's gloo threads still talk to it aborts that peer (std::terminate).
        dist.barrier()
        dist.destroy_process_group()


def _spawn(tmp_path: Path, world_size: int, scenario: str) -> list[dict[str, Any]]:
    mp.spawn(_worker, args=(world_size, str(tmp_path), scenario), nprocs=world_size, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]


def _ok_walk(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [(t["trigger"], t["outcome"]) for t in result["transitions"]]


@pytest.mark.slow
def test_two_ranks_agree_on_every_transition_and_on_faults(tmp_path):
    results = _spawn(tmp_path, 2, "flux")
    for rank, result in enumerate(results):
        # Compile failed on rank 1 only: every rank reports it and stays CacheMounted, eager.
        assert result["compile_fault"]["error"] == "DistributedTransitionError"
        assert result["compile_fault"]["failed_ranks"] == [FAULTY_RANK]
        assert "injected compile failure" in result["compile_fault"]["message"]
        assert result["after_compile_fault"] == {"state": "CacheMounted", "compiled": False}
        # Warm-up failed on rank 1 only: every rank stays Compiled.
        assert result["warmup_fault"]["failed_ranks"] == [FAULTY_RANK]
        assert "injected warm-up failure" in result["warmup_fault"]["message"]
        assert result["after_warmup_fault"] == {"state": "Compiled"}
        assert result["retry"] == {"error": None} and result["after_retry"] == {"state": "WarmedUp"}
        assert result["request_new_graphs"] == [0, 0]
        assert result["final"] == {"state": "Loaded", "mounted": False, "compiled": False}
        walk = _ok_walk(result)
        assert walk == [("mount_cache", "ok"), ("compile", "failed"), ("compile", "ok"),
                        ("warm_up", "failed"), ("warm_up", "ok"), ("refresh", "ok"), ("reset", "ok")]
        assert [t["seq"] for t in result["transitions"]] == list(range(1, len(walk) + 1))
        assert {(t["rank"], t["world_size"]) for t in result["transitions"]} == {(rank, 2)}
        assert result["request_ranks"] == [rank, rank]
        if rank != FAULTY_RANK:  # the healthy rank's audit names the rank that failed
            failed = [t for t in result["transitions"] if t["outcome"] == "failed"]
            assert all(f"rank {FAULTY_RANK}" in t["error"] for t in failed)


@pytest.mark.slow
def test_three_ranks_agree_on_faults_divergence_and_reset(tmp_path):
    results = _spawn(tmp_path, 3, "linear")
    for rank, result in enumerate(results):
        assert result["construct"] is True
        assert result["warmup_fault"]["failed_ranks"] == [2]
        assert result["after_warmup_fault"] == {"state": "Compiled"}
        assert result["after_retry"] == {"state": "WarmedUp"}
        assert result["refresh"] == "IllegalTransitionError"
        # Different triggers at the same point are caught, and nobody moved.
        assert result["divergence"] == "RankDivergenceError"
        assert result["after_divergence"] == {"state": "WarmedUp"}
        # A reset cannot be undone: the failed rank kept its state, the others are Loaded, and
        # every rank was told; a second reset everywhere converges.
        assert result["reset_fault"]["failed_ranks"] == [0]
        assert result["after_reset_fault"] == {"state": "WarmedUp" if rank == 0 else "Loaded"}
        assert "reset() again on every rank" in result["reset_fault"]["message"]
        assert result["final"] == {"state": "Loaded", "compiled": False}
        assert result["pipeline_fault"] == ["transformer", "transformer_2"]
        assert result["pipeline_after_fault"] == ["Compiled", "Compiled"]
        assert result["pipeline_after_retry"] == "WarmedUp"
        head = [t["seq"] for t in result["transitions"] if t["module"] == "head"]
        assert head == list(range(1, len(head) + 1))
        warm = [(t["module"], t["outcome"]) for t in result["transitions"]
                if t["module"].startswith("transformer") and t["trigger"] == "warm_up"]
        # Exits in reverse order of entry, on every rank alike: the votes pair up.
        assert warm == [("transformer_2", "failed"), ("transformer", "failed"),
                        ("transformer_2", "ok"), ("transformer", "ok")]


def test_needs_an_initialised_process_group(flux):
    assert not dist.is_initialized()
    with pytest.raises(InvalidConfigError, match="init_process_group"):
        DistributedLifecycle(flux, backend="cpu")
