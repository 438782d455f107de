"""The lifecycle's own costs on the CPU: transition overhead, scale, contention.

    python bench/bench_cpu.py [overhead|scale|contention|all] [--quick]

- ``overhead``: one transition of ``ModuleLifecycle`` with the work stubbed out (``NoopBackend``,
  ``NoopCache``) and one JSON-rendered audit event per transition, written to a file as a host
  would configure structlog; median of many. Every trigger runs through the lifecycle's
  ``transitions.Machine`` (work in its ``before`` callback, audit from ``after``/``on_exception``);
  an empty ``request()`` is measured beside it. In the same run, interleaved round by round so that
  machine noise hits all alike, the floors it is built from: a bare ``transitions.Machine``
  trigger, a ``LockedMachine`` trigger, one structlog JSON event, an RLock round trip.
  Target: <= 30 us per transition.
- ``scale``: 1,000 lifecycles in one process: tracemalloc bytes per lifecycle (target < 10 KB)
  and construction time, with the no-op adapters and with the real CPU + cache-dit adapters.
- ``contention``: 32 threads race ``prepare`` on one lifecycle (a tiny real Flux, cache-dit,
  ``aot_eager``): exactly one compile; wall time. Also with the no-op adapters (locking only).

Results: bench/results/cpu_<bench>.json, each with the machine named.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402
import torch  # noqa: E402
from _machine import machine_info  # noqa: E402
from torch import nn  # noqa: E402
from transitions import Machine  # noqa: E402
from transitions.extensions import LockedMachine  # noqa: E402

from lifecycle import LifecyclePolicy, ModuleLifecycle  # noqa: E402
from lifecycle.testing import NoopBackend, NoopCache  # noqa: E402
from states import State, transitions_for  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TARGET_TRANSITION_US = 30.0
TARGET_BYTES_PER_LIFECYCLE = 10 * 1024
# One lap of the default policy: every trigger once, ending where it started.
LAP = ("mount_cache", "compile", "warm_up", "refresh", "invalidate", "reset")



def write(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"cpu_{name}.json"
    result = {"bench": name, "machine": machine_info(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                             time.gmtime()), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def quiet_cache_dit() -> None:
    """cache-dit sets its logger to INFO when imported: import it, then quiet it."""
    from adapters import CacheDitAdapter

    CacheDitAdapter().default_config()
    logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)


def configure_structlog(path: str) -> None:
    """A host's production set-up (structlog's recommended one): INFO and above, contextvars,
    level, ISO timestamp, JSON, one line per event to a file (structlog's WriteLogger flushes
    per event). This is a script, so it may configure structlog."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.WriteLoggerFactory(file=open(path, "a", encoding="utf-8")),
        cache_logger_on_first_use=True,
    )


# ----------------------------------------------------------------------------- overhead
def _bare_machine(cls: type[Machine]) -> Any:
    """The same table on a plain transitions machine, one model: the library's floor."""
    policy = LifecyclePolicy()

    class Model:
        pass

    model = Model()
    cls(
        model=model,
        states=list(State),
        transitions=[{"trigger": e.trigger.value, "source": e.source, "dest": e.dest}
                     for e in transitions_for(policy)],
        initial=State.LOADED,
        auto_transitions=False,
    )
    return model


def bench_overhead(rounds: int, laps_per_round: int) -> dict[str, Any]:
    logging.getLogger("transitions").setLevel(logging.WARNING)
    audit_file = tempfile.NamedTemporaryFile(prefix="bench-audit-", suffix=".jsonl", delete=False)
    audit_file.close()
    configure_structlog(audit_file.name)
    lc = ModuleLifecycle(nn.Linear(4, 4), name="bench", backend=NoopBackend(), cache_adapter=NoopCache())
    run = lambda module: None  # noqa: E731
    lc_calls: list[Callable[[], None]] = [
        lc.mount_cache, lc.compile, lambda: lc.warm_up(run), lc.refresh, lc.invalidate, lc.reset,
    ]
    bare = _bare_machine(Machine)
    locked = _bare_machine(LockedMachine)
    bare_calls = [getattr(bare, t) for t in LAP]
    locked_calls = [getattr(locked, t) for t in LAP]
    log = structlog.get_logger("bench")
    fields = {
        "module": "bench", "module_id": "0123456789ab", "trigger": "compile", "source": "CacheMounted",
        "dest": "Compiled", "outcome": "ok", "duration_ms": 0.012, "backend": "noop",
        "policy": {"cache_dit": True, "compile": True}, "seq": 1,
    }
    rlock = threading.RLock()

    def lap(calls: list[Callable[[], Any]]) -> Callable[[], None]:
        def run_laps() -> None:
            for _ in range(laps_per_round):
                for call in calls:
                    call()
        return run_laps

    def structlog_events() -> None:
        for _ in range(laps_per_round * len(LAP)):
            log.info("lifecycle.transition", **fields)

    def rlock_round_trips() -> None:
        for _ in range(laps_per_round * len(LAP)):
            with rlock:
                pass

    def refused() -> None:  # an illegal trigger: raise, audit, catch
        for _ in range(laps_per_round * len(LAP)):
            try:
                lc.invalidate()
            except Exception:
                pass

    served = ModuleLifecycle(nn.Linear(4, 4), name="bench-served", backend=NoopBackend(),
                             cache_adapter=NoopCache())
    served.prepare(run)

    def requests() -> None:  # an empty request: lock, table check, fresh context, one event
        for _ in range(laps_per_round * len(LAP)):
            with served.request():
                pass

    cases: dict[str, Callable[[], None]] = {
        "lifecycle_transition": lap(lc_calls),
        "lifecycle_refused": refused,
        "lifecycle_request": requests,
        "transitions_Machine": lap(bare_calls),
        "transitions_LockedMachine": lap(locked_calls),
        "structlog_json_event": structlog_events,
        "rlock_round_trip": rlock_round_trips,
    }
    per_round = laps_per_round * len(LAP)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for case in cases.values():  # warm every path (caches, first-use logger binding)
        case()
    # No collection inside a timed case (it would land in whichever case happens to allocate
    # past a threshold), but a young-generation one before every round: a refused trigger
    # leaves cyclic garbage (its exception's traceback holds transitions' frame, which holds
    # the exception), and left to pile up over the run it slows every case that follows.
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            gc.collect(0)
            for name, case in cases.items():
                started = time.perf_counter()
                case()
                samples[name].append((time.perf_counter() - started) / per_round * 1e6)
    finally:
        gc.enable()
    # Each trigger on its own (one timer per call, so ~0.1 us of timer cost included).
    per_trigger: dict[str, list[float]] = {name: [] for name in LAP}
    for _ in range(rounds * laps_per_round // 4):
        for name, call in zip(LAP, lc_calls, strict=True):
            started = time.perf_counter()
            call()
            per_trigger[name].append((time.perf_counter() - started) * 1e6)
    lines = sum(1 for _ in open(audit_file.name, encoding="utf-8"))
    os.unlink(audit_file.name)
    us = {name: {"median_us": statistics.median(v), "p10_us": _pct(v, 10), "p90_us": _pct(v, 90)}
          for name, v in samples.items()}
    median = us["lifecycle_transition"]["median_us"]
    per_trigger_median = {name: statistics.median(v) for name, v in per_trigger.items()}
    per_trigger_mean = statistics.mean(per_trigger_median.values())
    return {
        "description": "per trigger; lifecycle = NoopBackend + NoopCache + lock + table check + "
        "history record + one JSON audit event written and flushed to a file",
        "rounds": rounds,
        "triggers_per_round": per_round,
        "audit_lines_written": lines,
        "results": us,
        "per_trigger_median_us": per_trigger_median,
        "target_us": TARGET_TRANSITION_US,
        "meets_target": median <= TARGET_TRANSITION_US,
        # The same lap, each trigger's median over its own calls, averaged: what a transition
        # costs when the VM's neighbours leave it alone. A lap of 120 timed together is a mean,
        # and on this shared VM single calls are right-skewed (p50 30 us, mean 40 us in one
        # sample), so the lap median follows the neighbours' load as much as the code.
        "per_trigger_median_mean_us": per_trigger_mean,
        "meets_target_by_per_trigger_medians": per_trigger_mean <= TARGET_TRANSITION_US,
        "lifecycle_minus_floors_us": median
        - us["transitions_Machine"]["median_us"] - us["structlog_json_event"]["median_us"],
    }


def _pct(values: list[float], pct: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, len(ordered) * pct // 100)]


# ----------------------------------------------------------------------------- scale
def bench_scale(count: int) -> dict[str, Any]:
    quiet_cache_dit()  # and imported before measuring
    configs: dict[str, Callable[[nn.Module, int], ModuleLifecycle]] = {
        "noop_adapters": lambda m, i: ModuleLifecycle(
            m, name=f"t{i}", backend=NoopBackend(), cache_adapter=NoopCache()),
        "cpu_and_cache_dit": lambda m, i: ModuleLifecycle(
            m, name=f"t{i}", backend="cpu", compile_options={"backend": "eager"}),
        "cpu_no_cache": lambda m, i: ModuleLifecycle(
            m, name=f"t{i}", policy=LifecyclePolicy(cache_dit=False), backend="cpu",
            compile_options={"backend": "eager"}),
    }
    results: dict[str, Any] = {}
    for label, make in configs.items():
        make(nn.Identity(), -1)  # first-use costs (backend registry, machine build) outside
        modules = [nn.Identity() for _ in range(count)]  # the host's modules, not ours to count
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        started = time.perf_counter()
        lifecycles = [make(module, i) for i, module in enumerate(modules)]
        elapsed = time.perf_counter() - started
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        stats = after.compare_to(before, "filename")
        total = sum(s.size_diff for s in stats)
        top = [
            {"file": str(s.traceback[0].filename).replace(str(ROOT) + "/", ""), "bytes": s.size_diff}
            for s in sorted(stats, key=lambda s: -s.size_diff)[:6]
        ]
        # Without tracemalloc's own slowdown: the construction time a host sees.
        modules2 = [nn.Identity() for _ in range(count)]
        started = time.perf_counter()
        lifecycles2 = [make(module, i) for i, module in enumerate(modules2)]
        plain = time.perf_counter() - started
        results[label] = {
            "lifecycles": count,
            "bytes_per_lifecycle": total / count,
            "construct_us_per_lifecycle": plain / count * 1e6,
            "construct_us_per_lifecycle_under_tracemalloc": elapsed / count * 1e6,
            "top_allocators": top,
            "meets_target": total / count < TARGET_BYTES_PER_LIFECYCLE,
        }
        del lifecycles, lifecycles2
        gc.collect()
    return {"target_bytes_per_lifecycle": TARGET_BYTES_PER_LIFECYCLE, "results": results}


# ----------------------------------------------------------------------------- contention
def bench_contention(threads: int, repeats: int) -> dict[str, Any]:
    quiet_cache_dit()
    from lifecycle.testing import capture_audit
    from lifecycle.testing.tiny import demo_cache_config, denoiser, flux_inputs, tiny_flux

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    def race(lc: ModuleLifecycle, run: Callable[[nn.Module], Any]) -> dict[str, Any]:
        barrier = threading.Barrier(threads + 1)
        errors: list[BaseException] = []

        def worker() -> None:
            barrier.wait()
            try:
                lc.prepare(run)
            except BaseException as exc:
                errors.append(exc)

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        with capture_audit() as events:
            for thread in pool:
                thread.start()
            barrier.wait()
            started = time.perf_counter()
            for thread in pool:
                thread.join()
            wall = time.perf_counter() - started
        ok = [e["trigger"] for e in events.of("lifecycle.transition") if e["outcome"] == "ok"]
        return {
            "threads": threads,
            "wall_s": wall,
            "errors": [repr(e) for e in errors],
            "state": lc.state.value,
            "compiles": lc.stats()["compiles"],
            "ok_transitions": ok,
            "transition_events": len(events.of("lifecycle.transition")),
            "exactly_one_compile": lc.stats()["compiles"] == 1 and ok.count("compile") == 1,
        }

    from adapters import dynamo_graph_count

    inputs = flux_inputs()

    def fresh() -> ModuleLifecycle:
        torch._dynamo.reset()
        return ModuleLifecycle(tiny_flux(), name="transformer", backend="cpu",
                               cache_config=demo_cache_config(8), compile_options={"backend": "aot_eager"})

    with capture_audit():  # first-use costs (imports, dynamo set-up) land in neither timing
        fresh().prepare(denoiser(inputs, 2))
    # Racing and single-threaded runs alternate, so that machine noise hits both alike.
    races: list[dict[str, Any]] = []
    alone_s: list[float] = []
    for _ in range(repeats):
        real = fresh()
        graphs_before = dynamo_graph_count()
        races.append(race(real, denoiser(inputs, 2)))
        races[-1]["graphs_compiled"] = dynamo_graph_count() - graphs_before
        alone = fresh()  # the same prepare with no one else waiting
        with capture_audit():
            started = time.perf_counter()
            alone.prepare(denoiser(inputs, 2))
            alone_s.append(time.perf_counter() - started)
    flux = {
        **races[-1],
        "wall_s": statistics.median(r["wall_s"] for r in races),
        "wall_s_runs": [r["wall_s"] for r in races],
        "single_thread_prepare_s": statistics.median(alone_s),
        "single_thread_prepare_s_runs": alone_s,
        "exactly_one_compile": all(r["exactly_one_compile"] for r in races),
        "compiles": max(r["compiles"] for r in races),
        "setup": "tiny FluxTransformer2DModel, cache-dit DBCache, cpu backend aot_eager, 2-step warm-up",
    }

    noop_lc = ModuleLifecycle(nn.Linear(4, 4), backend=NoopBackend(), cache_adapter=NoopCache())
    noop = race(noop_lc, lambda module: None)
    noop["setup"] = "NoopBackend + NoopCache: the lock and the idempotent walk only"
    return {"results": {"tiny_flux": flux, "noop": noop}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="?", default="all", choices=["overhead", "scale", "contention", "all"])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    args = parser.parse_args()
    todo = ["overhead", "scale", "contention"] if args.which == "all" else [args.which]
    if "overhead" in todo:
        result = bench_overhead(rounds=30 if args.quick else 300, laps_per_round=20)
        write("overhead", result)
        r = result["results"]
        print("per trigger, median us: " + ", ".join(f"{k} {v['median_us']:.1f}" for k, v in r.items()))
    if "scale" in todo:
        result = bench_scale(count=100 if args.quick else 1000)
        write("scale", result)
        for label, r in result["results"].items():
            print(f"{label}: {r['bytes_per_lifecycle'] / 1024:.1f} KB/lifecycle, "
                  f"{r['construct_us_per_lifecycle']:.0f} us to construct")
    if "contention" in todo:
        result = bench_contention(threads=32, repeats=1 if args.quick else 3)
        write("contention", result)
        for label, r in result["results"].items():
            print(f"{label}: wall {r['wall_s']:.3f} s, compiles {r['compiles']}, "
                  f"exactly one compile: {r['exactly_one_compile']}")


if __name__ == "__main__":
    main()
