"""Serving requests on one transformer: isolation, one at a time, the rule for refresh inside a
request, failures, and the audit (real cache-dit on a tiny real Flux; aot_eager compile)."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch
from conftest import FAST_COMPILE, SERVING_STEPS

from adapters import CacheDitAdapter
from lifecycle import (
    IllegalTransitionError,
    LifecyclePolicy,
    ModuleLifecycle,
    PipelineLifecycle,
    State,
    TransitionFailedError,
)
from lifecycle.audit import REQUEST_KEYS
from lifecycle.testing import NoopBackend, NoopCache
from lifecycle.testing.tiny import denoise, denoiser, tiny_flux

CACHE_ONLY = LifecyclePolicy(compile=False)


def _served(lc: ModuleLifecycle, inputs, steps: int = SERVING_STEPS, **kwargs):
    with lc.request(num_inference_steps=steps, **kwargs) as req:
        out = denoise(lc.module, inputs, steps)
    return out, req


def _never_warmed_first_request(shape, inputs, cache_config) -> tuple[torch.Tensor, int]:
    """What a freshly cache-mounted module (same weights, same config) gives on its first call."""
    module = tiny_flux(shape)
    cache = CacheDitAdapter()
    cache.mount(module, cache_config)
    out = denoise(module, inputs, SERVING_STEPS)
    return out, cache.summary(module).cached_steps


def test_requests_after_a_short_warmup_are_identical_fresh_and_compile_nothing(
    flux, shape, inputs, cache_config, audit_events
):
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    lc.prepare(denoiser(inputs, 2))  # shorter than cache-dit's own warm-up (4 steps)
    served = [_served(lc, inputs) for _ in range(3)]
    outs = [out for out, _ in served]
    reference, reference_cached = _never_warmed_first_request(shape, inputs, cache_config)

    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    # Compiled (aot_eager) vs eager: equal up to float reordering.
    torch.testing.assert_close(outs[0], reference, rtol=1e-4, atol=1e-5)
    assert [req.cached_steps for _, req in served] == [reference_cached] * 3
    assert reference_cached > 0  # the cached branch is really taken
    assert [req.new_graphs for _, req in served] == [0, 0, 0]
    assert lc.stats()["recompiles_since_warmup"] == 0
    assert audit_events.of("lifecycle.recompile") == []


def test_without_request_the_same_calls_leak_from_one_to_the_next(flux, inputs, cache_config):
    """The control for the test above: the trap request() closes is real in this cache-dit."""
    lc = ModuleLifecycle(flux, policy=CACHE_ONLY, backend="cpu", cache_config=cache_config)
    lc.prepare(denoiser(inputs, 2))
    isolated, _ = _served(lc, inputs)
    leaked = [denoise(lc.module, inputs, SERVING_STEPS) for _ in range(3)]
    assert any(not torch.equal(out, isolated) for out in leaked)
    again, _ = _served(lc, inputs)
    assert torch.equal(again, isolated)


@pytest.mark.parametrize("steps", [None, 4])
def test_request_outside_warmed_up_is_refused_naming_prepare(flux, cache_config, audit_events, steps):
    lc = ModuleLifecycle(flux, policy=CACHE_ONLY, backend="cpu", cache_config=cache_config)
    for prepare_step in (None, lc.mount_cache):
        if prepare_step is not None:
            prepare_step()
        state = lc.state
        with pytest.raises(IllegalTransitionError, match=r"prepare\(run\)") as info:
            with lc.request(num_inference_steps=steps, request_id="early"):
                pytest.fail("the body of a refused request must not run")
        assert info.value.state is state and lc.state is state
        assert info.value.module == "transformer"
    events = audit_events.of("lifecycle.request")
    assert [(e["outcome"], e["state"], e["request_id"]) for e in events] == [
        ("refused", "Loaded", "early"),
        ("refused", "CacheMounted", "early"),
    ]


def test_a_failing_request_is_recorded_and_changes_nothing(flux, inputs, cache_config, audit_events):
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    lc.prepare(denoiser(inputs, 2))
    good, _ = _served(lc, inputs)
    boom = RuntimeError("CUDA out of memory (pretend)")
    with pytest.raises(RuntimeError) as info:
        with lc.request(num_inference_steps=SERVING_STEPS, request_id="r-bad") as bad:
            denoise(lc.module, inputs, 3)  # dies mid-way, leaving a half-used context
            raise boom
    assert info.value is boom and info.value.__cause__ is None
    assert bad.outcome == "failed" and lc.state is State.WARMED_UP
    after, req = _served(lc, inputs, request_id="r-after")
    assert torch.equal(after, good) and req.outcome == "ok"

    failed = [e for e in audit_events.of("lifecycle.request") if e["request_id"] == "r-bad"]
    assert len(failed) == 1
    event = failed[0]
    assert set(REQUEST_KEYS) | {"error", "cfg_cached_steps", "state"} <= set(event)
    assert event["outcome"] == "failed" and event["log_level"] == "error"
    assert event["error"] == "RuntimeError: CUDA out of memory (pretend)"
    assert event["num_inference_steps"] == SERVING_STEPS and event["state"] == "WarmedUp"
    assert event["module"] == "transformer" and event["module_id"] == lc.module_id
    assert event["duration_ms"] == pytest.approx(bad.duration_ms, abs=0.01)
    assert lc.stats()["requests"] == 3


def test_four_threads_two_requests_each_on_one_lifecycle(flux, inputs, cache_config, audit_events):
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    lc.prepare(denoiser(inputs, 2))
    expected, _ = _served(lc, inputs)
    results: list[tuple[str, torch.Tensor, float, float]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(index: int) -> None:
        try:
            start.wait()
            for turn in range(2):
                with lc.request(num_inference_steps=SERVING_STEPS, request_id=f"t{index}-{turn}"):
                    entered = time.perf_counter()
                    out = denoise(lc.module, inputs, SERVING_STEPS)
                    left = time.perf_counter()
                results.append((f"t{index}-{turn}", out, entered, left))
        except BaseException as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 8
    for _, out, _, _ in results:
        assert torch.equal(out, expected)
    spans = sorted((entered, left) for _, _, entered, left in results)
    assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(spans))  # one at a time
    served = {e["request_id"]: e for e in audit_events.of("lifecycle.request")}
    assert {rid for rid, *_ in results} <= set(served)
    assert {served[rid]["cached_steps"] for rid, *_ in results} == {
        next(iter(audit_events.of("lifecycle.request")))["cached_steps"]
    }
    assert all(served[rid]["new_graphs"] == 0 for rid, *_ in results)


def test_refresh_inside_ones_own_request_starts_a_new_context(flux, inputs, cache_config):
    lc = ModuleLifecycle(flux, policy=CACHE_ONLY, backend="cpu", cache_config=cache_config)
    lc.prepare(denoiser(inputs, 2))
    plain, plain_req = _served(lc, inputs, steps=6)
    with lc.request(num_inference_steps=SERVING_STEPS) as req:
        denoise(lc.module, inputs, 3)  # a first attempt, abandoned
        lc.refresh(num_inference_steps=6)  # re-entrant: no deadlock
        out = denoise(lc.module, inputs, 6)
    assert torch.equal(out, plain)
    assert req.num_inference_steps == 6 and req.cached_steps == plain_req.cached_steps
    assert lc.history[-1].trigger.value == "refresh" and lc.history[-1].outcome == "ok"
    # The step count given to refresh is the serving default afterwards, as outside a request.
    with lc.request() as later:
        pass
    assert later.num_inference_steps == 6


def test_other_triggers_and_nested_requests_inside_a_request_are_refused(flux, inputs, cache_config):
    lc = ModuleLifecycle(flux, policy=CACHE_ONLY, backend="cpu", cache_config=cache_config)
    lc.prepare(denoiser(inputs, 2))
    expected, _ = _served(lc, inputs)
    with lc.request(num_inference_steps=SERVING_STEPS, request_id="outer") as req:
        for trigger in (lc.reset, lc.invalidate):
            with pytest.raises(IllegalTransitionError, match="'outer' is running in this thread"):
                trigger()
        with pytest.raises(IllegalTransitionError, match="do not nest"):
            with lc.request():
                pytest.fail("a nested request must not run")
        out = denoise(lc.module, inputs, SERVING_STEPS)
    assert torch.equal(out, expected) and req.outcome == "ok"
    assert [r.outcome for r in lc.history[-2:]] == ["refused", "refused"]
    lc.invalidate()  # legal again once the request is over
    assert lc.state is State.CACHE_MOUNTED


def test_a_transition_from_another_thread_waits_for_the_running_request(flux, inputs, cache_config):
    lc = ModuleLifecycle(flux, policy=CACHE_ONLY, backend="cpu", cache_config=cache_config)
    lc.prepare(denoiser(inputs, 2))
    inside, release = threading.Event(), threading.Event()
    done: dict[str, float] = {}

    def serve() -> None:
        with lc.request(num_inference_steps=SERVING_STEPS):
            inside.set()
            release.wait(timeout=30)
            denoise(lc.module, inputs, SERVING_STEPS)
            done["request"] = time.perf_counter()

    def reset() -> None:
        lc.reset()
        done["reset"] = time.perf_counter()

    server = threading.Thread(target=serve)
    server.start()
    assert inside.wait(timeout=30)
    resetter = threading.Thread(target=reset)
    resetter.start()
    resetter.join(timeout=0.3)
    assert resetter.is_alive() and lc.state is State.WARMED_UP  # waiting on the request
    release.set()
    server.join(timeout=60)
    resetter.join(timeout=60)
    assert done["reset"] > done["request"] and lc.state is State.LOADED


def test_a_pipeline_request_is_served_by_all_members_or_by_none(shape, inputs, cache_config, audit_events):
    warm = ModuleLifecycle(tiny_flux(shape), name="a", policy=CACHE_ONLY, backend="cpu",
                           cache_config=cache_config)
    cold = ModuleLifecycle(tiny_flux(shape), name="b", policy=CACHE_ONLY, backend="cpu",
                           cache_config=cache_config)
    warm.prepare(denoiser(inputs, 2))
    plc = PipelineLifecycle({"a": warm, "b": cold})
    with pytest.raises(IllegalTransitionError, match="prepare") as info:
        with plc.request(request_id="p-1"):
            pytest.fail("must not run")
    assert info.value.module == "b"
    events = audit_events.of("lifecycle.request")
    assert [(e["module"], e["outcome"]) for e in events] == [("b", "refused")]

    plc.prepare(lambda modules: [denoise(m, inputs, 2) for m in modules.values()])
    with plc.request(num_inference_steps=SERVING_STEPS, request_id="p-2") as records:
        for member in plc.members.values():
            denoise(member.module, inputs, SERVING_STEPS)
    assert set(records) == {"a", "b"}
    assert {r.request_id for r in records.values()} == {"p-2"}
    assert all(r.outcome == "ok" and r.cached_steps > 0 for r in records.values())

    boom = KeyError("latents")
    with pytest.raises(KeyError) as info:
        with plc.request(request_id="p-3") as records:
            raise boom
    assert info.value is boom
    assert [r.outcome for r in records.values()] == ["failed", "failed"]
    assert plc.state is State.WARMED_UP


class _RefreshBreaks(NoopCache):
    """Our own cache-adapter interface, made to fail its next refresh (cache-dit itself is
    exercised by every other test here)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def refresh(self, module, config, num_inference_steps=None) -> None:
        if self.broken:
            raise RuntimeError("context manager gone")
        super().refresh(module, config, num_inference_steps)


def test_a_request_whose_context_refresh_fails_is_typed_audited_and_never_runs(flux, audit_events):
    cache = _RefreshBreaks()
    lc = ModuleLifecycle(flux, backend=NoopBackend(), cache_adapter=cache)
    lc.prepare(lambda module: None)
    cache.broken = True
    with pytest.raises(TransitionFailedError, match="refreshing cache-dit's context failed") as info:
        with lc.request(request_id="r-x"):
            pytest.fail("must not run")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert lc.state is State.WARMED_UP
    (event,) = audit_events.of("lifecycle.request")
    assert event["outcome"] == "failed" and "context manager gone" in event["error"]
