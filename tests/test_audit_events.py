"""Audit events, captured with structlog's testing tools and checked key by key."""

from __future__ import annotations

import pytest
import structlog
from conftest import FAST_COMPILE, SERVING_STEPS

from lifecycle import (
    InvalidConfigError,
    LifecyclePolicy,
    ModuleLifecycle,
    State,
    TransitionFailedError,
    UnsupportedModuleError,
)
from lifecycle.audit import REQUEST_KEYS, TRANSITION_KEYS
from lifecycle.testing.tiny import denoise, denoiser


@pytest.mark.slow
def test_transition_events_key_by_key(flux, inputs, cache_config, audit_events):
    lc = ModuleLifecycle(flux, name="dit", backend="cpu", cache_config=cache_config,
                         compile_options=FAST_COMPILE)
    with structlog.contextvars.bound_contextvars(rank=3):
        lc.prepare(denoiser(inputs, 2))
    events = audit_events.of("lifecycle.transition", module="dit")
    assert [(e["trigger"], e["source"], e["dest"]) for e in events] == [
        ("mount_cache", "Loaded", "CacheMounted"),
        ("compile", "CacheMounted", "Compiled"),
        ("warm_up", "Compiled", "WarmedUp"),
    ]
    for seq, event in enumerate(events, start=1):
        assert set(TRANSITION_KEYS) <= set(event)
        assert event["module"] == "dit"
        assert event["module_id"] == lc.module_id
        assert event["outcome"] == "ok" and "error" not in event
        assert event["backend"] == "cpu"
        assert event["policy"] == {"cache_dit": True, "compile": True}
        assert event["seq"] == seq
        assert event["duration_ms"] >= 0
        assert event["log_level"] == "info"
    assert events[0]["cache_config"]["residual_diff_threshold"] == cache_config.residual_diff_threshold
    assert events[1]["compile_backend"] == "aot_eager"
    assert [r.seq for r in lc.history] == [1, 2, 3]
    assert [r.outcome for r in lc.history] == ["ok"] * 3


@pytest.mark.slow
def test_request_events_key_by_key(flux, inputs, cache_config, audit_events):
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    lc.prepare(denoiser(inputs, 2))
    with lc.request(num_inference_steps=SERVING_STEPS, request_id="r-17") as req:
        denoise(lc.module, inputs, SERVING_STEPS)
    (event,) = audit_events.of("lifecycle.request")
    assert set(REQUEST_KEYS) <= set(event)
    assert event["request_id"] == "r-17" and event["outcome"] == "ok"
    assert event["num_inference_steps"] == SERVING_STEPS
    assert event["cached_steps"] == req.cached_steps > 0
    assert event["new_graphs"] == 0
    assert event["duration_ms"] == pytest.approx(req.duration_ms, abs=0.01)


@pytest.mark.slow
def test_refused_and_failed_attempts_are_audited_and_keep_the_state(flux, inputs, cache_config, audit_events):
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    lc.mount_cache()
    lc.compile()

    def broken_warmup(module):
        raise ValueError("bad latents")

    with pytest.raises(TransitionFailedError) as info:
        lc.warm_up(broken_warmup)
    assert isinstance(info.value.__cause__, ValueError)
    assert lc.state is State.COMPILED
    message = str(info.value)
    assert "transformer" in message and "Compiled" in message and "warm_up(run)" in message
    with pytest.raises(InvalidConfigError):
        lc.warm_up("not callable")  # type: ignore[arg-type]
    assert lc.state is State.COMPILED
    lc.warm_up(denoiser(inputs, 2))  # still usable afterwards
    events = audit_events.of("lifecycle.transition")
    assert [e["outcome"] for e in events] == ["ok", "ok", "failed", "refused", "ok"]
    failed, refused = events[2], events[3]
    assert failed["error_type"] == "ValueError" and "bad latents" in failed["error"]
    assert failed["log_level"] == "error"
    assert (failed["source"], failed["dest"]) == ("Compiled", "Compiled")
    assert refused["error_type"] == "InvalidConfigError" and refused["log_level"] == "warning"
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]


def test_unsupported_module_refused_at_mount(cache_config, audit_events):
    import torch

    lc = ModuleLifecycle(torch.nn.Sequential(torch.nn.Linear(4, 4)), backend="cpu",
                         cache_config=cache_config, compile_options=FAST_COMPILE)
    with pytest.raises(UnsupportedModuleError) as info:
        lc.mount_cache()
    assert "BlockAdapter" in str(info.value)
    assert lc.state is State.LOADED
    (event,) = audit_events.of("lifecycle.transition")
    assert event["outcome"] == "refused" and event["error_type"] == "UnsupportedModuleError"


@pytest.mark.slow
def test_policy_without_cache_never_touches_cache_dit(flux, inputs, audit_events):
    lc = ModuleLifecycle(flux, policy=LifecyclePolicy(cache_dit=False), backend="cpu",
                         compile_options=FAST_COMPILE)
    lc.prepare(denoiser(inputs, 2))
    assert lc.state is State.WARMED_UP
    assert not getattr(flux, "_is_cached", False)
    assert [e["trigger"] for e in audit_events.of("lifecycle.transition")] == ["compile", "warm_up"]
