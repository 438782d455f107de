"""PipelineLifecycle over two tiny real Flux transformers: order, joint warm-up, refresh without
recompiling, invalidate after a weight change, reset back to the original forward, and what a
failing member leaves behind."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST_COMPILE, SERVING_STEPS

from adapters import CacheDitAdapter, dynamo_graph_count
from lifecycle import (
    IllegalTransitionError,
    InvalidConfigError,
    ModuleLifecycle,
    PipelineError,
    PipelineLifecycle,
    State,
    TransitionFailedError,
    UnsupportedModuleError,
)
from lifecycle.testing.tiny import denoise, tiny_flux


def _member(module, name, cache_config, **kwargs) -> ModuleLifecycle:
    return ModuleLifecycle(
        module, name=name, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE, **kwargs
    )


def _pair(flux, cache_config) -> PipelineLifecycle:
    return PipelineLifecycle({
        "transformer": _member(flux, "transformer", cache_config),
        "transformer_2": _member(tiny_flux(seed=1), "transformer_2", cache_config),
    })


def _run_all(inputs, steps):
    """The warm-up callable of a pipeline built without a diffusers pipeline: a dict of modules."""
    return lambda modules: [denoise(module, inputs, steps) for module in modules.values()]


def _ok_transitions(events):
    return [(e["module"], e["trigger"]) for e in events.of("lifecycle.transition") if e["outcome"] == "ok"]


@pytest.mark.slow
def test_prepare_refresh_invalidate_reset_on_two_members(flux, inputs, cache_config, audit_events):
    plc = _pair(flux, cache_config)
    first, second = plc.members.values()
    plc.prepare(_run_all(inputs, 1))
    assert plc.state is State.WARMED_UP
    # Mount and compile member by member in insertion order, then one joint warm-up.
    walk = _ok_transitions(audit_events)
    assert walk[:4] == [("transformer", "mount_cache"), ("transformer", "compile"),
                        ("transformer_2", "mount_cache"), ("transformer_2", "compile")]
    assert sorted(walk[4:]) == [("transformer", "warm_up"), ("transformer_2", "warm_up")]
    warm = [e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "warm_up"]
    assert all(e["joint_warmup"] == ["transformer", "transformer_2"] for e in warm)
    assert all(e["cached_branch_covered"] is True for e in warm)

    # A refresh between requests (new step count included) compiles nothing and stays WarmedUp.
    graphs = dynamo_graph_count()
    for steps in (SERVING_STEPS, 12):
        plc.refresh(num_inference_steps=steps)
        assert plc.state is State.WARMED_UP
        denoise(first.module, inputs, steps)  # the module as refreshed, outside request()
        with plc.request(num_inference_steps=steps) as records:
            for member in plc.members.values():
                denoise(member.module, inputs, steps)
        assert {name: r.new_graphs for name, r in records.items()} == {"transformer": 0, "transformer_2": 0}
        assert records["transformer"].cached_steps > 0  # the cached branch ran, without compiling
    assert dynamo_graph_count() == graphs
    assert [m.stats()["recompiles_since_warmup"] for m in (first, second)] == [0, 0]

    # New weights: invalidate -> Compiled, requests refused, prepare warms again without compiling.
    torch.manual_seed(7)
    new_weights = {k: torch.randn_like(v) * 0.02 for k, v in first.module.state_dict().items()}
    first.module.load_state_dict(new_weights)
    plc.invalidate()
    assert [m.state for m in (first, second)] == [State.COMPILED, State.COMPILED]
    with pytest.raises(IllegalTransitionError, match="prepare"), plc.request():
        pass
    warmups_before = len([e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "warm_up"])
    plc.prepare(_run_all(inputs, 1))
    assert plc.state is State.WARMED_UP
    warmups = [e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "warm_up"]
    assert len(warmups) == warmups_before + 2
    assert [m.stats()["compiles"] for m in (first, second)] == [1, 1]
    with plc.request(num_inference_steps=SERVING_STEPS) as records:
        cached_out = denoise(first.module, inputs, SERVING_STEPS)
    assert records["transformer"].new_graphs == 0

    # reset: unmounted, compiled code dropped, the original forward gives the uncached result.
    plc.reset()
    assert plc.state is State.LOADED and [m.state for m in (first, second)] == [State.LOADED] * 2
    for member in (first, second):
        assert not CacheDitAdapter().is_mounted(member.module)
        assert member.module._compiled_call_impl is None
        assert "forward" not in vars(member.module)
    never_mounted = tiny_flux()
    never_mounted.load_state_dict(new_weights)
    expected = denoise(never_mounted, inputs, SERVING_STEPS)
    after_reset = denoise(first.module, inputs, SERVING_STEPS)
    assert torch.equal(after_reset, expected)
    assert not torch.equal(cached_out, expected)  # the cache did change the result before reset


def test_joint_warmup_failure_names_every_member_and_keeps_them_compiled(flux, inputs, cache_config,
                                                                        audit_events):
    plc = _pair(flux, cache_config)

    def broken(modules):
        raise RuntimeError("warm-up input is wrong")

    with pytest.raises(PipelineError) as caught:
        plc.prepare(broken)
    error = caught.value
    assert error.members == ("transformer", "transformer_2")
    assert "transformer_2" in str(error) and "prepare(run)" in str(error)
    assert isinstance(error.__cause__, TransitionFailedError)
    assert [m.state for m in plc.members.values()] == [State.COMPILED, State.COMPILED]
    failed = [e for e in audit_events.of("lifecycle.transition") if e["outcome"] == "failed"]
    assert sorted(e["module"] for e in failed) == ["transformer", "transformer_2"]
    assert all("warm-up input is wrong" in e["error"] for e in failed)


def test_a_member_that_cannot_mount_is_named_and_leaves_the_others_consistent(flux, cache_config):
    plc = PipelineLifecycle({
        "transformer": _member(flux, "transformer", cache_config),
        "text_projector": _member(torch.nn.Linear(4, 4), "text_projector", cache_config),
    })
    with pytest.raises(PipelineError) as caught:
        plc.prepare(lambda modules: None)
    assert caught.value.member == "text_projector"
    assert isinstance(caught.value.__cause__, UnsupportedModuleError)
    # The member before it finished its own part of the walk; the failing one did not move.
    assert plc.members["transformer"].state is State.COMPILED
    assert plc.members["text_projector"].state is State.LOADED
    assert plc.state is State.LOADED
    plc.reset()
    assert not CacheDitAdapter().is_mounted(flux) and flux._compiled_call_impl is None


def test_refresh_is_all_or_none(flux, cache_config, audit_events):
    plc = _pair(flux, cache_config)
    plc.members["transformer"].mount_cache()
    with pytest.raises(PipelineError) as caught:
        plc.refresh(num_inference_steps=4)
    assert caught.value.member == "transformer_2"
    assert isinstance(caught.value.__cause__, IllegalTransitionError)
    with pytest.raises(PipelineError) as bad_steps:
        plc.refresh(num_inference_steps=0)
    assert isinstance(bad_steps.value.__cause__, InvalidConfigError)
    refreshes = [e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "refresh"]
    assert [(e["module"], e["outcome"]) for e in refreshes] == [
        ("transformer_2", "refused"), ("transformer", "refused"),
    ]
    assert plc.members["transformer"].state is State.CACHE_MOUNTED


class _UnmountFails(CacheDitAdapter):
    """cache-dit's real adapter, with a fault injected into unmounting."""

    def unmount(self, module):
        raise RuntimeError("injected unmount failure")


def test_reset_resets_every_member_and_names_the_one_that_failed(flux, cache_config):
    plc = PipelineLifecycle({
        "transformer": _member(flux, "transformer", cache_config, cache_adapter=_UnmountFails()),
        "transformer_2": _member(tiny_flux(seed=1), "transformer_2", cache_config),
    })
    for member in plc.members.values():
        member.mount_cache()
    with pytest.raises(PipelineError) as caught:
        plc.reset()
    assert caught.value.members == ("transformer",)
    assert "injected unmount failure" in str(caught.value)
    assert plc.members["transformer"].state is State.CACHE_MOUNTED  # unchanged, still usable
    assert plc.members["transformer_2"].state is State.LOADED
    assert not CacheDitAdapter().is_mounted(plc.members["transformer_2"].module)
