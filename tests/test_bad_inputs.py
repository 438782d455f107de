"""Bad inputs: each is refused with its typed error, before any work, and the state is unchanged.
Errors raised by a trigger are audited as ``refused``; errors at construction leave no lifecycle."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import FAST_COMPILE, SERVING_STEPS
from torch import nn

from lifecycle import (
    BackendUnavailableError,
    IllegalTransitionError,
    InvalidConfigError,
    LifecycleError,
    LifecyclePolicy,
    ModuleLifecycle,
    State,
    UnsupportedModuleError,
)
from lifecycle.testing import AuditEvents, NoopBackend, NoopCache
from lifecycle.testing.tiny import denoise, denoiser

NO_CACHE = LifecyclePolicy(cache_dit=False)


def _small() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU())


def _refused(events: AuditEvents, trigger: str, error_type: type[BaseException]) -> dict[str, Any]:
    transitions = events.of("lifecycle.transition")
    assert transitions, "no transition event"
    event = transitions[-1]
    assert (event["trigger"], event["outcome"]) == (trigger, "refused")
    assert event["source"] == event["dest"]
    assert event["error_type"] == error_type.__name__
    return event


# ----------------------------------------------------------------------------- construction
@pytest.mark.parametrize("module", [None, "transformer", 42, lambda x: x, torch.ones(2)],
                         ids=["none", "str", "int", "function", "tensor"])
def test_not_an_nn_module(module: Any) -> None:
    with pytest.raises(UnsupportedModuleError, match=r"torch\.nn\.Module") as info:
        ModuleLifecycle(module, backend="cpu")
    assert info.value.module == "transformer"
    assert type(module).__name__ in str(info.value)


@pytest.mark.parametrize(
    "config", [{"residual_diff_threshold": 0.1}, "DBCacheConfig()", 0.3, object()],
    ids=["dict", "str", "float", "object"],
)
def test_wrong_typed_cache_config(config: Any) -> None:
    with pytest.raises(InvalidConfigError, match="DBCacheConfig") as info:
        ModuleLifecycle(_small(), backend="cpu", cache_config=config)
    assert info.value.state is State.LOADED
    assert type(config).__name__ in str(info.value)


def test_cache_config_with_non_positive_steps() -> None:
    from lifecycle.testing.tiny import demo_cache_config

    config = demo_cache_config()
    config.num_inference_steps = 0
    with pytest.raises(InvalidConfigError, match="num_inference_steps"):
        ModuleLifecycle(_small(), backend="cpu", cache_config=config)


@pytest.mark.parametrize("backend", ["tpu", "CPU", "", "inductor"])
def test_unknown_backend_name(backend: str) -> None:
    with pytest.raises(InvalidConfigError, match="unknown backend") as info:
        ModuleLifecycle(_small(), backend=backend)
    message = str(info.value)
    assert repr(backend) in message
    for known in ("auto", "cpu", "cuda", "npu"):
        assert known in message  # the message lists what would work


@pytest.mark.parametrize("backend", [42, None, object])
def test_backend_of_wrong_type(backend: Any) -> None:
    with pytest.raises(InvalidConfigError, match="BackendAdapter"):
        ModuleLifecycle(_small(), backend=backend)


@pytest.mark.parametrize("backend", ["cuda", "npu"])
def test_missing_backend_runtime(backend: str) -> None:
    from adapters import get_backend
    from adapters.errors import BackendUnavailable

    try:
        get_backend(backend)
    except BackendUnavailable:
        pass
    else:
        pytest.skip(f"{backend} is available on this machine")
    with pytest.raises(BackendUnavailableError) as info:
        ModuleLifecycle(_small(), backend=backend)
    assert backend in str(info.value).lower()


@pytest.mark.parametrize(
    "options, bad",
    [
        ({"backnd": "eager"}, "backnd"),
        ({"backend": "eager", "fullgraph": True, "compile_twice": True}, "compile_twice"),
        ({"dynamic": True, "max_autotune": True}, "max_autotune"),
    ],
)
def test_unknown_compile_options_keys(options: dict[str, Any], bad: str) -> None:
    with pytest.raises(InvalidConfigError, match=bad) as info:
        ModuleLifecycle(_small(), policy=NO_CACHE, backend="cpu", compile_options=options)
    assert "accepted" in str(info.value)  # says what is accepted
    assert info.value.state is State.LOADED


@pytest.mark.parametrize(
    "options",
    [["backend", "eager"], {"backend": "no_such_backend"}, {"mode": "fastest"},
     {"backend": "eager", "mode": "max-autotune"}],
    ids=["list", "unknown-dynamo-backend", "unknown-mode", "mode-without-inductor"],
)
def test_bad_compile_options_values(options: Any) -> None:
    with pytest.raises(InvalidConfigError):
        ModuleLifecycle(_small(), policy=NO_CACHE, backend="cpu", compile_options=options)


@pytest.mark.parametrize("policy", [{"cache_dit": False}, "default", (True, True)])
def test_policy_of_wrong_type(policy: Any) -> None:
    with pytest.raises(InvalidConfigError, match="LifecyclePolicy"):
        ModuleLifecycle(_small(), policy=policy, backend="cpu")


@pytest.mark.parametrize("name", ["", None, 3])
def test_bad_name(name: Any) -> None:
    with pytest.raises(InvalidConfigError, match="name"):
        ModuleLifecycle(_small(), name=name, backend="cpu")


# ----------------------------------------------------------------------------- at a trigger
def test_module_cache_dit_cannot_wrap_names_block_adapter(audit_events: AuditEvents) -> None:
    module = _small()
    lc = ModuleLifecycle(module, backend="cpu", compile_options=FAST_COMPILE)  # default policy
    with pytest.raises(UnsupportedModuleError) as info:
        lc.mount_cache()
    message = str(info.value)
    assert "BlockAdapter" in message and "Sequential" in message
    assert "LifecyclePolicy(cache_dit=False)" in message  # the other way out
    assert lc.state is State.LOADED
    assert not getattr(module, "_is_cached", False) and "forward" not in vars(module)
    _refused(audit_events, "mount_cache", UnsupportedModuleError)
    # prepare() stops at the same place with the same error, and the module still runs.
    with pytest.raises(UnsupportedModuleError, match="BlockAdapter"):
        lc.prepare(lambda m: m(torch.ones(1, 4)))
    assert lc.state is State.LOADED
    assert module(torch.ones(1, 4)).shape == (1, 4)


@pytest.mark.parametrize("run", [None, "denoise", 8, torch.ones(1)], ids=["none", "str", "int", "tensor"])
def test_warm_up_argument_not_callable(run: Any, audit_events: AuditEvents) -> None:
    backend = NoopBackend()
    lc = ModuleLifecycle(_small(), backend=backend, cache_adapter=NoopCache())
    lc.mount_cache()
    lc.compile()
    with pytest.raises(InvalidConfigError, match="callable") as info:
        lc.warm_up(run)
    assert info.value.state is State.COMPILED
    assert type(run).__name__ in str(info.value)
    assert lc.state is State.COMPILED
    _refused(audit_events, "warm_up", InvalidConfigError)
    with pytest.raises(InvalidConfigError, match="callable"):
        lc.prepare(run)
    assert lc.state is State.COMPILED
    # prepare's refusal is audited too.
    assert [r.outcome for r in lc.history] == ["ok", "ok", "refused", "refused"]


@pytest.mark.parametrize("steps", [0, -1, -28, True, False, 2.5, "28"])
def test_refresh_with_bad_step_count(steps: Any, flux, inputs, cache_config, audit_events) -> None:
    lc = ModuleLifecycle(flux, policy=LifecyclePolicy(compile=False), backend="cpu",
                         cache_config=cache_config)
    lc.prepare(denoiser(inputs, 2))
    before = lc.stats()["cache"]
    with pytest.raises(InvalidConfigError, match="positive int") as info:
        lc.refresh(num_inference_steps=steps)
    assert info.value.state is State.WARMED_UP
    assert lc.state is State.WARMED_UP
    _refused(audit_events, "refresh", InvalidConfigError)
    assert lc.stats()["cache"]["config"] == before["config"]  # the context was not touched
    # Requests and prepare refuse the same step counts, and the lifecycle keeps serving.
    with pytest.raises(InvalidConfigError, match="positive int"):
        with lc.request(num_inference_steps=steps):
            pass
    with pytest.raises(InvalidConfigError, match="positive int"):
        lc.prepare(denoiser(inputs, 2), num_inference_steps=steps)
    with lc.request(num_inference_steps=SERVING_STEPS) as req:
        denoise(lc.module, inputs, SERVING_STEPS)
    assert req.outcome == "ok"
    refused = [e for e in audit_events.of("lifecycle.request") if e["outcome"] == "refused"]
    assert len(refused) == 1 and "positive int" in refused[0]["error"]


def test_every_error_is_a_lifecycle_error_naming_the_module() -> None:
    lc = ModuleLifecycle(_small(), name="unet", backend=NoopBackend(), cache_adapter=NoopCache())
    errors: list[LifecycleError] = []
    for call in (lambda: lc.compile(), lambda: lc.refresh(0), lambda: lc.warm_up(None),
                 lambda: lc.invalidate()):
        with pytest.raises(LifecycleError) as info:
            call()
        errors.append(info.value)
    assert all(isinstance(e, RuntimeError) and "unet" in str(e) for e in errors)
    assert isinstance(errors[0], IllegalTransitionError)
    assert lc.state is State.LOADED
