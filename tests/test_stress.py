"""Concurrency stress: 32 threads fire 1,000 random triggers each (and requests, prepares, bad
arguments, failing warm-ups) at a few shared lifecycles. Only the documented exceptions may
escape; afterwards every state is legal, each module's audit is gap-free and replays against the
API.md table (so no two transitions interleaved), and the compile bookkeeping matches the state.

The lifecycles use a real small module with the no-op backend and cache adapters, so the test
measures the lifecycle's own locking, not torch.compile.
"""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import structlog
import torch
from structlog.testing import capture_logs
from test_stateful import API_TABLE
from torch import nn

from lifecycle import (
    IllegalTransitionError,
    InvalidConfigError,
    LifecyclePolicy,
    ModuleLifecycle,
    State,
    TransitionFailedError,
)
from lifecycle._buckets import RECENT_MISSES
from lifecycle._module import HISTORY_LIMIT
from lifecycle.audit import JsonlSink
from lifecycle.audit.verify import verify_file
from lifecycle.testing import AuditEvents, NoopBackend, NoopCache

THREADS = 32
TRIGGERS_PER_THREAD = 1_000
X = torch.ones(1, 4)


class Injected(RuntimeError):
    """Raised by the failing warm-up callable; must come back as TransitionFailedError's cause."""


def _run(module: nn.Module) -> None:
    module(X)


def _failing_run(module: nn.Module) -> None:
    module(X)
    raise Injected("warm-up failed on purpose")


class Shared:
    """One shared lifecycle plus what the threads observe about it."""

    def __init__(self, policy: LifecyclePolicy, index: int) -> None:
        self.backend = NoopBackend()
        self.lc = ModuleLifecycle(
            nn.Linear(4, 4), name=f"m{index}", policy=policy, backend=self.backend,
            cache_adapter=NoopCache(),
        )
        self.in_request = 0
        self.overlaps = 0


def _act(shared: Shared, rng: random.Random) -> str:
    """One random call; returns what happened. Raises only what the API documents."""
    lc = shared.lc
    action = rng.choice(
        ["mount_cache", "compile", "warm_up", "warm_up_fail", "refresh", "refresh_bad",
         "invalidate", "reset", "prepare", "request", "request", "allowed"]
    )
    try:
        if action == "warm_up":
            lc.warm_up(_run)
        elif action == "warm_up_fail":
            lc.warm_up(_failing_run)
        elif action == "refresh":
            lc.refresh(num_inference_steps=rng.randint(1, 50))
        elif action == "refresh_bad":
            lc.refresh(num_inference_steps=rng.choice([0, -1]))
        elif action == "prepare":
            lc.prepare(_run)
        elif action == "request":
            with lc.request(num_inference_steps=8):
                shared.in_request += 1
                if shared.in_request != 1:
                    shared.overlaps += 1
                # Transitions wait for the request: the state cannot move under it.
                assert lc.state is State.WARMED_UP
                _run(lc.module)
                shared.in_request -= 1
        elif action == "allowed":
            # Read-only views are consistent snapshots while other threads move the state.
            history = lc.history
            assert [r.seq for r in history] == list(range(1, len(history) + 1))
            _ = lc.allowed_triggers(), lc.stats(), repr(lc)
        else:
            getattr(lc, action)()
        return "ok"
    except IllegalTransitionError:
        return "illegal"
    except InvalidConfigError:
        assert action == "refresh_bad"
        return "invalid"
    except TransitionFailedError as exc:
        assert isinstance(exc.__cause__, Injected)
        return "failed"


@pytest.mark.slow
def test_32_threads_random_triggers_on_shared_lifecycles(tmp_path: Path) -> None:
    # The audit goes through the JSONL sink as a host would attach it, and is captured as well.
    audit_file = tmp_path / "audit.jsonl"
    sink = JsonlSink(audit_file)
    with capture_logs(processors=[sink]) as logs:
        _stress(AuditEvents(logs))
    sink.close()
    # The file the 32 threads wrote replays clean through the project's own verifier.
    result = verify_file(audit_file)
    assert result.ok, (result.line, result.reason)
    assert result.transitions >= THREADS * TRIGGERS_PER_THREAD * 0.5
    assert result.modules == 8


def _stress(audit_events: AuditEvents) -> None:
    policies = [LifecyclePolicy(cache_dit=c, compile=k) for c in (True, False) for k in (True, False)]
    shared = [Shared(policy, i) for i, policy in enumerate(policies * 2)]  # 8 lifecycles
    unexpected: list[BaseException] = []
    outcomes: Counter[str] = Counter()
    outcomes_lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        local: Counter[str] = Counter()
        start.wait()
        try:
            for _ in range(TRIGGERS_PER_THREAD):
                local[_act(rng.choice(shared), rng)] += 1
        except BaseException as exc:  # anything else is a bug: report it from the main thread
            unexpected.append(exc)
        with outcomes_lock:
            outcomes.update(local)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.perf_counter() - started
    assert not any(t.is_alive() for t in threads), "threads hung (deadlock?)"
    assert not unexpected, unexpected[:3]
    assert sum(outcomes.values()) == THREADS * TRIGGERS_PER_THREAD
    # Every kind of outcome happened, so the run exercised what it claims to.
    assert {"ok", "illegal", "invalid", "failed"} <= set(outcomes), outcomes
    assert elapsed < 120

    events = audit_events.of("lifecycle.transition")
    for s in shared:
        lc = s.lc
        assert s.overlaps == 0 and s.in_request == 0
        assert lc.state in lc.policy.path  # a legal, reachable state
        mine = [e for e in events if e["module_id"] == lc.module_id]
        # Gap-free and in order: emitted under the lifecycle's lock, one per attempt.
        assert [e["seq"] for e in mine] == list(range(1, len(mine) + 1))
        assert [(e["trigger"], e["source"], e["dest"], e["outcome"]) for e in mine] == [
            (r.trigger.value, r.source.value, r.dest.value, r.outcome) for r in lc.history
        ]
        # Replaying the audit against the API table ends where the lifecycle is: no transition
        # saw a state another thread was changing.
        table = API_TABLE[(lc.policy.cache_dit, lc.policy.compile)]
        state = "Loaded"
        for e in mine:
            assert e["source"] == state, e
            legal = table[e["trigger"]].get(state)
            if e["outcome"] == "ok":
                assert e["dest"] == legal
                state = legal
            elif e["error_type"] == "IllegalTransitionError":
                assert legal is None
            else:
                assert legal is not None and e["dest"] == state
        assert state == lc.state.value
        # Compile bookkeeping follows the state: compiled exactly while Compiled/WarmedUp.
        compiled_now = s.backend.compiles - s.backend.decompiles
        expected_compiled = lc.policy.compile and lc.state in (State.COMPILED, State.WARMED_UP)
        assert compiled_now == int(expected_compiled)
        assert s.backend.compiles == sum(
            1 for e in mine if e["trigger"] == "compile" and e["outcome"] == "ok"
        )
    requests = audit_events.of("lifecycle.request")
    assert requests and all(e["outcome"] in ("ok", "refused") for e in requests)


@pytest.mark.parametrize("policy", [LifecyclePolicy(), LifecyclePolicy(cache_dit=False)], ids=str)
@pytest.mark.slow
def test_32_threads_racing_prepare_compile_once(policy: LifecyclePolicy, audit_events) -> None:
    backend = NoopBackend()
    lc = ModuleLifecycle(nn.Linear(4, 4), policy=policy, backend=backend, cache_adapter=NoopCache())
    warmups = Counter[int]()

    def slow_run(module: nn.Module) -> None:
        warmups[threading.get_ident()] += 1
        time.sleep(0.02)  # widen the window in which the others arrive
        module(X)

    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def worker() -> None:
        start.wait()
        try:
            lc.prepare(slow_run)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert lc.state is State.WARMED_UP
    assert backend.compiles == 1 and lc.stats()["compiles"] == 1
    # One caller ran the warm-up (NoopCache is covered after one run; with compile, one settle
    # run in the serving context follows); the other 31 found it done.
    assert len(warmups) == 1 and sum(warmups.values()) <= 2
    ok = [e["trigger"] for e in audit_events.of("lifecycle.transition") if e["outcome"] == "ok"]
    assert ok == [
        {"CacheMounted": "mount_cache", "Compiled": "compile", "WarmedUp": "warm_up"}[s.value]
        for s in policy.path[1:]
    ]
    assert len(lc.history) == len(ok)  # the other 31 found the work done: no refused attempts


# Run in a child process: a deadlock there fails this test instead of hanging the whole suite.
_CHURN = """
import gc, sys, threading, time, weakref
from torch import nn
from lifecycle import LifecyclePolicy, ModuleLifecycle
from lifecycle._machine import machine_for
from lifecycle.testing import NoopBackend, NoopCache

policy = LifecyclePolicy(cache_dit=True, compile=False)
def make():
    return ModuleLifecycle(nn.Identity(), policy=policy, backend=NoopBackend(), cache_adapter=NoopCache())
refs = []
def churn():
    for _ in range(300):
        cycle = [make()]
        refs.append(weakref.ref(cycle[0]))
        cycle.append(cycle)  # only the garbage collector frees it
        del cycle
machine = machine_for(policy)
gc.collect()
gc.set_threshold(50, 1, 1)  # collect often, in the middle of constructions
threads = [threading.Thread(target=churn, daemon=True) for _ in range(4)]
for t in threads:
    t.start()
deadline = time.monotonic() + 60
for t in threads:
    t.join(timeout=max(0.0, deadline - time.monotonic()))
if any(t.is_alive() for t in threads):
    print("DEADLOCK", flush=True)
    sys.exit(3)
gc.collect()
print("models", len(machine.models), "alive", sum(r() is not None for r in refs), flush=True)
"""


def test_lifecycles_dropped_while_others_are_built_do_not_deadlock_or_leak() -> None:
    # Regression (the former design added every lifecycle to a shared machine and detached it in a
    # finalizer, which once deadlocked inside add_model): lifecycles built and dropped from four
    # threads under frequent GC never deadlock, the machine holds none of them, all are freed.
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", _CHURN], cwd=root, capture_output=True, text=True, timeout=150,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])},
    )
    assert "DEADLOCK" not in result.stdout, "lifecycle construction deadlocked"
    assert result.returncode == 0, result.stderr[-2000:]
    assert "models 0 alive 0" in result.stdout, result.stdout


def test_shared_module_stays_compiled_while_another_lifecycle_needs_it() -> None:
    module = nn.Linear(4, 4)
    policy = LifecyclePolicy(cache_dit=False)
    first = ModuleLifecycle(module, name="first", policy=policy, backend="cpu",
                            compile_options={"backend": "eager"})
    second = ModuleLifecycle(module, name="second", policy=policy, backend="cpu",
                             compile_options={"backend": "eager"})
    first.compile()
    second.compile()  # reuses the compiled module: compiled once (API.md)
    first.reset()
    assert second.state is State.COMPILED
    assert module._compiled_call_impl is not None  # what second's state promises
    second.reset()  # the last holder lets go: the module is eager again
    assert module._compiled_call_impl is None


# ---------------------------------------------------------------------------- long serving
def _drop(_logger: object, _name: str, _event: object) -> object:
    raise structlog.DropEvent


@pytest.mark.slow
def test_memory_does_not_grow_with_requests_misses_or_transitions():
    """A server keeps a lifecycle for months: what it keeps per request, per shape miss and per
    transition is bounded (counts of all, the latest of each); the audit has every event."""
    saved = structlog.get_config()
    structlog.configure(processors=[_drop], cache_logger_on_first_use=False)
    try:
        lc = ModuleLifecycle(nn.Linear(4, 4), backend=NoopBackend(), cache_adapter=NoopCache())
        warm, cold = {"n": 2}, {"n": 3}
        lc.prepare(lambda module, shape: module(torch.zeros(shape["n"], 4)), shapes=[warm])

        def serve(shape: dict[str, int]) -> None:
            with lc.request(shape=shape):
                lc.module(torch.zeros(shape["n"], 4))

        def rounds(count: int) -> None:
            for _ in range(count):
                serve(warm)
                serve(cold)  # a miss, served eagerly (the default policy)

        tracemalloc.start()
        try:
            rounds(RECENT_MISSES + 200)  # past every bound: what is kept is all traced now
            gc.collect()
            before, _ = tracemalloc.get_traced_memory()
            rounds(1_500)
            gc.collect()
            after, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Unbounded, 1,500 rounds would keep 1,500 request times and 1,500 misses (~400 KB).
        assert after - before < 64 * 1024
        served = RECENT_MISSES + 200 + 1_500
        (bucket,) = lc.coverage()
        assert bucket["requests"] == served and bucket["first_request_ratio"] is not None
        stats = lc.stats()["shapes"]
        assert stats["shape_misses"] == served and stats["shape_misses_by_policy"] == {"eager": served}
        assert lc.missed_shapes() == [cold]

        before_refreshes = len(lc.history)
        for _ in range(HISTORY_LIMIT + 10):
            lc.refresh()
        history = lc.history
        assert len(history) == HISTORY_LIMIT  # the latest ones, oldest first
        seqs = [record.seq for record in history]
        assert seqs == list(range(seqs[0], seqs[0] + HISTORY_LIMIT))
        assert seqs[-1] == before_refreshes + HISTORY_LIMIT + 10
    finally:
        structlog.configure(**saved)
