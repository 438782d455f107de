"""Fault injection: the work of a legal transition raises. After each fault the state is the one
API.md documents (unchanged), the module is still callable and consistent with that state, the
audit has the ``failed`` event, and the lifecycle recovers once the cause is gone.

Faults are injected by real means: a backend adapter subclass that raises, a dynamo backend that
crashes while warm-up compiles, a warm-up callable raising (out-of-memory included), and
cache-dit's own functions raising for one call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cache_dit
import pytest
import torch
from conftest import FAST_COMPILE, SERVING_STEPS
from torch import nn

from adapters.cpu import CpuAdapter
from lifecycle import (
    LifecyclePolicy,
    ModuleLifecycle,
    State,
    TransitionFailedError,
)
from lifecycle._warmup import MAX_WARMUP_RUNS, WarmupCoverageWarning
from lifecycle.testing import AuditEvents, NoopBackend, NoopCache
from lifecycle.testing.tiny import FluxInputs, denoise, denoiser


class CompilerCrashed(RuntimeError):
    pass


class CrashingCpu(CpuAdapter):
    """The real CPU adapter, except that its first ``compile`` raises."""

    name = "crashing-cpu"

    def __init__(self) -> None:
        self.crashes_left = 1

    def compile(self, module: nn.Module, options: Mapping[str, Any], plan: Any) -> None:
        if self.crashes_left:
            self.crashes_left -= 1
            raise CompilerCrashed("the compiler crashed")
        super().compile(module, options, plan)


def _crashing_dynamo_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    raise CompilerCrashed("the dynamo backend crashed while compiling a graph")


def _failed_event(events: AuditEvents, trigger: str) -> dict[str, Any]:
    transitions = events.of("lifecycle.transition")
    assert [e["seq"] for e in transitions] == list(range(1, len(transitions) + 1))
    failed = [e for e in transitions if e["outcome"] == "failed"]
    assert len(failed) == 1, failed
    event = failed[0]
    assert event["trigger"] == trigger
    assert event["source"] == event["dest"]
    assert event["error"]
    return event


def _eager_reference(module: nn.Module, inputs: FluxInputs) -> torch.Tensor:
    assert not getattr(module, "_is_cached", False) and module._compiled_call_impl is None
    return denoise(module, inputs, 2)


def _assert_pristine(module: nn.Module, inputs: FluxInputs, reference: torch.Tensor) -> None:
    """Not mounted, not compiled, the class's own forward: the original result, bit for bit."""
    assert not getattr(module, "_is_cached", False)
    assert "forward" not in vars(module)
    assert module._compiled_call_impl is None
    assert torch.equal(denoise(module, inputs, 2), reference)


# ----------------------------------------------------------------------------- compile raising
# (An unknown inductor option, which torch refuses only when asked to compile, is now refused at
# construction: tests/test_defects.py.)
def test_compile_raising_keeps_state_and_module_usable(flux, inputs, cache_config, audit_events):
    reference = _eager_reference(flux, inputs)
    lc = ModuleLifecycle(flux, backend=CrashingCpu(), cache_config=cache_config,
                         compile_options=FAST_COMPILE)
    cause_type: type[BaseException] = CompilerCrashed
    with pytest.raises(TransitionFailedError) as info:
        lc.prepare(denoiser(inputs, 2))
    assert isinstance(info.value.__cause__, cause_type)
    assert "CacheMounted" in str(info.value) and "compile" in str(info.value)

    assert lc.state is State.CACHE_MOUNTED  # mount succeeded, compile did not happen
    assert flux._compiled_call_impl is None
    assert lc.stats()["compiles"] == 0
    assert lc.cache.is_mounted(flux)
    assert torch.isfinite(denoise(lc.module, inputs, 2)).all()  # still callable, cached eagerly
    event = _failed_event(audit_events, "compile")
    assert event["source"] == "CacheMounted"
    assert [r.outcome for r in lc.history] == ["ok", "failed"]

    # The cause is gone: the same lifecycle finishes the walk.
    lc.prepare(denoiser(inputs, 2))
    assert lc.state is State.WARMED_UP and lc.stats()["compiles"] == 1
    with lc.request(num_inference_steps=SERVING_STEPS) as req:
        denoise(lc.module, inputs, SERVING_STEPS)
    assert req.new_graphs == 0
    lc.reset()
    _assert_pristine(flux, inputs, reference)


def test_dynamo_backend_crashing_in_warm_up(flux, inputs, cache_config, audit_events):
    # torch.compile is lazy: a broken compiler backend surfaces in the first call, i.e. warm-up.
    reference = _eager_reference(flux, inputs)
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config,
                         compile_options={"backend": _crashing_dynamo_backend})
    with pytest.raises(TransitionFailedError) as info:
        lc.prepare(denoiser(inputs, 2))
    assert "crashed" in str(info.value.__cause__)
    assert lc.state is State.COMPILED
    _failed_event(audit_events, "warm_up")
    # The cache context was handed back to the serving config, not left steered for warm-up.
    assert lc.stats()["cache"]["config"]["residual_diff_threshold"] == pytest.approx(0.3)
    assert lc.stats()["cache"]["config"]["num_inference_steps"] == SERVING_STEPS
    # Documented way out: reset() returns the module to eager, and it runs as before.
    lc.reset()
    assert lc.state is State.LOADED
    _assert_pristine(flux, inputs, reference)


# ----------------------------------------------------------------------------- warm-up raising
class FailingRun:
    """A warm-up callable that runs the real denoiser, then raises on call number ``fail_on``."""

    def __init__(self, inputs: FluxInputs, error: BaseException, fail_on: int = 1) -> None:
        self.inputs, self.error, self.fail_on, self.calls = inputs, error, fail_on, 0

    def __call__(self, module: nn.Module) -> None:
        self.calls += 1
        denoise(module, self.inputs, 2)
        if self.calls == self.fail_on:
            raise self.error


@pytest.mark.parametrize(
    "error",
    [
        ValueError("warm-up callable raised"),
        # What the CUDA caching allocator raises; a RuntimeError subclass, simulated here.
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
    ids=["value-error", "torch-oom", "runtime-oom"],
)
def test_warm_up_raising_keeps_compiled_and_recovers(error, flux, inputs, cache_config, audit_events):
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    lc.mount_cache()
    lc.compile()
    # Fails in the middle of the steered warm-up (its 2nd run), after graphs were compiled.
    failing = FailingRun(inputs, error, fail_on=2)
    with pytest.raises(TransitionFailedError) as info:
        lc.warm_up(failing)
    assert info.value.__cause__ is error
    assert lc.state is State.COMPILED
    event = _failed_event(audit_events, "warm_up")
    assert event["error"] == f"{type(error).__name__}: {error}"
    assert event["error_type"] == type(error).__name__
    stats = lc.stats()
    assert stats["cache"]["config"]["residual_diff_threshold"] == pytest.approx(0.3)
    assert stats["cache"]["config"]["num_inference_steps"] == SERVING_STEPS
    assert torch.isfinite(denoise(lc.module, inputs, 2)).all()

    # Retrying warm-up finishes the walk, and the first request is what a lifecycle that never
    # failed gives (a fresh cache context, nothing compiled on the request path).
    lc.warm_up(denoiser(inputs, 2))
    assert lc.state is State.WARMED_UP
    with lc.request(num_inference_steps=SERVING_STEPS) as req:
        out = denoise(lc.module, inputs, SERVING_STEPS)
    assert req.new_graphs == 0
    assert lc.stats()["recompiles_since_warmup"] == 0

    from lifecycle.testing.tiny import tiny_flux

    clean = ModuleLifecycle(tiny_flux(), name="clean", backend="cpu", cache_config=cache_config,
                            compile_options=FAST_COMPILE)
    clean.prepare(denoiser(inputs, 2))
    with clean.request(num_inference_steps=SERVING_STEPS) as clean_req:
        expected = denoise(clean.module, inputs, SERVING_STEPS)
    assert clean_req.cached_steps == req.cached_steps
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_keyboard_interrupt_in_warm_up_is_audited_and_propagates(flux, inputs, audit_events):
    lc = ModuleLifecycle(flux, policy=LifecyclePolicy(cache_dit=False), backend="cpu",
                         compile_options=FAST_COMPILE)
    lc.compile()
    with pytest.raises(KeyboardInterrupt):
        lc.warm_up(FailingRun(inputs, KeyboardInterrupt()))
    assert lc.state is State.COMPILED
    _failed_event(audit_events, "warm_up")
    lc.warm_up(denoiser(inputs, 2))
    assert lc.state is State.WARMED_UP


# ----------------------------------------------------------------------------- cache-dit raising
@pytest.mark.parametrize("when", ["before-installing", "after-installing"])
def test_enable_cache_raising(when, flux, inputs, cache_config, audit_events, monkeypatch):
    reference = _eager_reference(flux, inputs)
    real_enable = cache_dit.enable_cache

    def enable_then_fail(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(cache_dit, "enable_cache", real_enable)  # fail this one call only
        if when == "after-installing":
            real_enable(*args, **kwargs)  # hooks are in place when it fails
        raise RuntimeError("cache-dit failed to enable the cache")

    monkeypatch.setattr(cache_dit, "enable_cache", enable_then_fail)
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    with pytest.raises(TransitionFailedError) as info:
        lc.mount_cache()
    assert "failed to enable" in str(info.value.__cause__)
    assert lc.state is State.LOADED
    event = _failed_event(audit_events, "mount_cache")
    assert "failed to enable" in event["error"]
    # Nothing half-installed is left behind: the module is the original.
    _assert_pristine(flux, inputs, reference)

    lc.prepare(denoiser(inputs, 2))
    assert lc.state is State.WARMED_UP and lc.cache.is_mounted(flux)


def test_disable_cache_raising_during_reset(flux, inputs, cache_config, audit_events, monkeypatch):
    reference = _eager_reference(flux, inputs)
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    lc.prepare(denoiser(inputs, 2))
    real_disable = cache_dit.disable_cache

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(cache_dit, "disable_cache", real_disable)
        raise RuntimeError("cache-dit failed to release its hooks")

    monkeypatch.setattr(cache_dit, "disable_cache", fail_once)
    with pytest.raises(TransitionFailedError) as info:
        lc.reset()
    assert "release its hooks" in str(info.value.__cause__)
    assert lc.state is State.WARMED_UP
    event = _failed_event(audit_events, "reset")
    assert event["source"] == "WarmedUp"
    # Still mounted, still compiled, still serving without compiling anything new.
    assert lc.cache.is_mounted(flux) and flux._compiled_call_impl is not None
    with lc.request(num_inference_steps=SERVING_STEPS) as req:
        assert torch.isfinite(denoise(lc.module, inputs, SERVING_STEPS)).all()
    assert req.new_graphs == 0 and req.outcome == "ok"

    lc.reset()
    assert lc.state is State.LOADED
    _assert_pristine(flux, inputs, reference)


# ----------------------------------------------------------------------------- coverage impossible
class _NeverCovered(NoopCache):
    """A cache whose steered context never reports the cached branch as run."""

    def warmup_covered(self, module: nn.Module) -> bool:
        return False


def test_warmup_that_cannot_cover_the_cached_branch_warns_and_audits(audit_events):
    runs: list[int] = []
    lc = ModuleLifecycle(nn.Linear(4, 4), backend=NoopBackend(), cache_adapter=_NeverCovered())
    with pytest.warns(WarmupCoverageWarning, match="did not reach cache-dit's cached-step branch"):
        lc.prepare(lambda module: runs.append(1))
    assert len(runs) >= MAX_WARMUP_RUNS  # re-run until the limit (plus any settle run), then a word
    assert lc.state is State.WARMED_UP
    assert lc.stats()["warmup_covered_cached_branch"] is False
    (coverage,) = audit_events.of("lifecycle.warmup_coverage")
    assert coverage["covered"] is False and coverage["warmup_runs"] == MAX_WARMUP_RUNS
    warm = audit_events.of("lifecycle.transition")[-1]
    assert warm["trigger"] == "warm_up" and warm["cached_branch_covered"] is False
