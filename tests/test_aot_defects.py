"""Ahead-of-time blocks: wrong results, lying audits, failed starts, data loss, races and late
errors, each pinned by a test. Real parts throughout: real torch.export and AOTInductor builds
(a small ``Stack`` of blocks, or the tiny Flux build shared by the process, see
``tests/aot_builds.py``), real read-only directories (``chattr +i``), real threads."""

from __future__ import annotations

import gc
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from aot_builds import (
    FLUX_BUCKETS,
    STACK_BUCKETS,
    Stack,
    copy_of,
    flux_lifecycle,
    flux_packages,
    flux_run,
    serve_stack,
    stack_input,
    stack_lifecycle,
    stack_run,
)

from adapters import _torch_internals as internals
from adapters import aot
from adapters.aot import compiler as aot_compiler
from adapters.aot.store import LocalFiles, inductor_configs
from lifecycle import (
    BackendUnavailableError,
    CompilePlan,
    InvalidConfigError,
    LifecyclePolicy,
    ServingPolicy,
    State,
    UnwarmedShapeError,
)
from lifecycle.testing.tiny import FluxShape, denoise, flux_inputs, tiny_flux


def _compile_event(events: Any) -> dict[str, Any]:
    return dict(next(e for e in events.of("lifecycle.transition") if e["trigger"] == "compile"))


def _examples(lc: Any, run: Any, buckets: list[dict[str, int]]) -> list[Any]:
    return [lambda shape=shape: run(lc.module, shape) for shape in buckets]



# ---------------------------------------------------------------------- construction refusals
@pytest.mark.parametrize("options, match", [
    ({"options": {"aot_inductor.package_constants_in_so": True}}, "package_constants_in_so"),
    ({"shapes_spec": 5}, "shapes_spec"),
])
def test_options_without_an_ahead_of_time_meaning_are_refused_at_construction(
    tmp_path: Path, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidConfigError, match=match):
        stack_lifecycle(Stack(), tmp_path, compile_options=options)


def test_mode_reaches_the_packages_inductor_configs(tmp_path: Path) -> None:
    lc = stack_lifecycle(Stack(), tmp_path, compile_options={"mode": "max-autotune-no-cudagraphs"})
    configs = lc.stats()["compiler"]["inductor_configs"]
    assert configs["max_autotune"] is True
    assert configs["aot_inductor.package_constants_in_so"] is False


def test_reproducible_builds_in_deterministic_mode_and_the_key_records_it() -> None:
    block = Stack().blocks[0]
    plain, deterministic = inductor_configs({}), inductor_configs({}, reproducible=True)
    assert deterministic["deterministic"] is True and "deterministic" not in plain
    assert aot.package_key(block, configs=plain) != aot.package_key(block, configs=deterministic)


def test_the_key_records_which_attention_backends_export_may_choose() -> None:
    # A host that exports with cuDNN attention off (fewer first-call plans at new sizes) gets
    # packages of its own; a replica with torch's default flags never loads them, nor they its.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = Stack().blocks[0]
    default = aot.package_key(block)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        without_cudnn = aot.package_key(block)
    assert without_cudnn != default
    assert aot.package_key(block) == default  # the flags are back, and so is the key


# ------------------------------------------------------------------------ attributes and kinds
@pytest.mark.slow
def test_blocks_differing_in_a_plain_attribute_get_their_own_package_and_check(
    tmp_path: Path, audit_events: Any
) -> None:
    module = Stack(scales=(1.0, 0.5))
    lc = stack_lifecycle(module, tmp_path, compile_plan=CompilePlan(
        scope="blocks", ahead_of_time=True, reproducible=True))
    lc.prepare(stack_run, shapes=STACK_BUCKETS)
    event = _compile_event(audit_events)
    assert event["ahead_of_time"] == "compiled", event.get("aot_problem")
    assert len(event["aot_packages"]) == 2  # one per distinct scale, each checked
    assert event["aot_deterministic"] is True
    for manifest in (tmp_path / "aot" / "manifests").glob("*.json"):
        data = json.loads(manifest.read_text())["meta"]
        assert data["inductor_options"]["deterministic"] is True and data["check"]["outcome"] == "passed"
    torch.testing.assert_close(serve_stack(lc, 6), Stack(scales=(1.0, 0.5))(stack_input(6)).detach())
    lc.reset()

    # The setting changes: a restart must not load the old value.
    changed = Stack(scales=(1.0, 2.0))
    again = stack_lifecycle(changed, tmp_path, compile_plan=CompilePlan(
        scope="blocks", ahead_of_time=True, reproducible=True))
    again.prepare(stack_run, shapes=STACK_BUCKETS)
    restart = [e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "compile"][-1]
    assert restart["ahead_of_time"] == "compiled" and "missing" in restart["aot_found"].values()
    torch.testing.assert_close(serve_stack(again, 6), Stack(scales=(1.0, 2.0))(stack_input(6)).detach())
    again.reset()


# ------------------------------------------------------------------- other bounds, same volume
@pytest.mark.slow
def test_packages_for_other_bounds_do_not_overwrite_each_other(tmp_path: Path, audit_events: Any) -> None:
    for buckets in (STACK_BUCKETS, [{"tokens": 4}, {"tokens": 16}], STACK_BUCKETS):
        lc = stack_lifecycle(Stack(), tmp_path)
        lc.prepare(stack_run, shapes=buckets)
        lc.reset()
    compiles = [e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "compile"]
    outcomes = [e["ahead_of_time"] for e in compiles]
    assert outcomes == ["compiled", "compiled", "loaded"]
    assert len(list((tmp_path / "aot" / "manifests").glob("*.json"))) == 2


# ------------------------------------------------------------------------------------ races
@pytest.mark.slow
def test_two_builds_at_once_in_one_process_both_succeed(tmp_path: Path) -> None:
    results: dict[int, Any] = {}

    def build(index: int) -> None:
        model = Stack()
        with torch.no_grad():
            calls = aot.capture_calls(model, [lambda t=t: model(stack_input(t)) for t in (4, 8)])
        try:
            results[index] = aot.build(model, calls, tmp_path / str(index), verify=False)
        except Exception as error:  # recorded, asserted below
            results[index] = error

    threads = [threading.Thread(target=build, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(result, aot.AotBuild) and result.packages for result in results.values()), results


def test_writes_use_unique_staging_names_and_never_tear(tmp_path: Path) -> None:
    files = LocalFiles(tmp_path)
    files.ensure()
    payloads = [bytes([index]) * 2_000_000 for index in range(6)]
    errors: list[BaseException] = []

    def write(data: bytes) -> None:
        try:
            for _ in range(5):
                files.write_atomic("package.pt2", data)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(data,)) for data in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert files.read_bytes("package.pt2") in payloads
    assert os.listdir(tmp_path) == ["package.pt2"]  # no staging file left behind


# ----------------------------------------------------------------- starts that must not crash
def _fallback_start(artifact_dir: Path, audit_events: Any) -> dict[str, Any]:
    lc = stack_lifecycle(Stack(), artifact_dir)
    lc.compile(examples=_examples(lc, stack_run, STACK_BUCKETS))
    assert lc.state is State.COMPILED
    event = _compile_event(audit_events)
    lc.reset()
    return event


# A store that cannot be read or written builds on this replica (nothing shared), audited.
@pytest.mark.slow
def test_an_artifact_dir_that_is_a_file_builds_locally_audited(tmp_path: Path, audit_events: Any) -> None:
    path = tmp_path / "file"
    path.write_text("not a directory")
    event = _fallback_start(path, audit_events)
    assert event["ahead_of_time"] == "compiled" and event["aot_store"] in {"unreachable", "missing"}
    assert path.read_text() == "not a directory"


@pytest.mark.slow
def test_a_symlink_loop_builds_locally_audited(tmp_path: Path, audit_events: Any) -> None:
    (tmp_path / "aot").symlink_to(tmp_path / "aot")
    event = _fallback_start(tmp_path, audit_events)
    assert event["ahead_of_time"] == "compiled" and event["aot_store"] in {"unreachable", "missing"}


@pytest.mark.slow
def test_a_read_only_empty_volume_builds_locally_audited(
    tmp_path: Path, audit_events: Any, immutable: Any
) -> None:
    (tmp_path / "volume").mkdir()
    volume = immutable(tmp_path / "volume")
    event = _fallback_start(volume, audit_events)
    assert event["ahead_of_time"] == "compiled" and event["aot_store"] in {"unreachable", "missing"}
    assert not list(volume.iterdir())


@pytest.mark.slow
def test_a_read_only_volume_checked_elsewhere_still_loads(
    tmp_path: Path, audit_events: Any, immutable: Any
) -> None:
    directory, _ = flux_packages()
    volume = copy_of(directory, tmp_path / "volume")
    for manifest in (volume / "aot" / "manifests").glob("*.json"):
        data = json.loads(manifest.read_text())  # unsigned: the store trusts its SHA-256s
        data["meta"]["verified_on"] = "another-host"
        manifest.write_text(json.dumps(data))
    immutable(volume)
    lc = flux_lifecycle(volume, cache_dir=tmp_path / "node-cache")
    lc.prepare(flux_run, shapes=FLUX_BUCKETS)
    event = _compile_event(audit_events)
    assert event["ahead_of_time"] == "loaded", event.get("aot_problem")
    # Checked here in a child process, remembered in the node's cache, not in the store.
    assert sorted(event["aot_checked_here"]) == sorted(event["aot_packages"])
    assert list((tmp_path / "node-cache").rglob("notes/*"))
    assert lc.ready
    lc.reset()


@pytest.mark.slow
def test_a_deeply_nested_manifest_is_corrupt_not_a_crash(tmp_path: Path) -> None:
    kind = next(iter(aot.block_kinds(tiny_flux())))
    victim = tmp_path / f"{kind}.{'0' * 20}.json"  # a private directory's layout
    victim.write_text("[" * 100_000 + "]" * 100_000)
    found = aot.open_packages(tiny_flux(), tmp_path)
    assert found[kind].status == "corrupt" and "nested" in found[kind].reason


# ------------------------------------------------------------------------------ the public step
@pytest.mark.slow
def test_compile_alone_defers_until_the_warm_up_brings_calls(audit_events: Any) -> None:
    directory, _ = flux_packages()
    lc = flux_lifecycle(directory)
    lc.mount_cache()
    lc.compile()
    assert lc.state is State.COMPILED
    assert _compile_event(audit_events)["ahead_of_time"] == "deferred"
    lc.warm_up(flux_run, shapes=FLUX_BUCKETS)
    warm = [e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "warm_up"][-1]
    assert warm["outcome"] == "ok" and warm["ahead_of_time"] == "loaded"
    assert len(aot.aot_blocks(lc.module)) == 4 and lc.ready
    with pytest.raises(InvalidConfigError, match="zero-argument callables"):
        flux_lifecycle(directory).compile(examples=[1, 2])  # type: ignore[list-item]
    lc.reset()


# ------------------------------------------------------------------ after a fallback to JIT
@pytest.mark.slow
def test_after_a_fallback_on_unwarmed_fail_and_reproducible_still_hold(
    tmp_path: Path, audit_events: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    real = internals.compile_in_place

    def spy(target: torch.nn.Module, owner: torch.nn.Module, options: dict[str, Any]) -> None:
        seen.append(options)
        real(target, owner, options)

    monkeypatch.setattr(internals, "compile_in_place", spy)

    def failing_build(*args: Any, **kwargs: Any) -> Any:
        raise aot.AotBuildFailed("Stack", "a build that fails")

    monkeypatch.setattr(aot_compiler, "build", failing_build)
    lc = stack_lifecycle(
        Stack(), None, serving=ServingPolicy(on_unwarmed="fail"),
        compile_plan=CompilePlan(scope="blocks", ahead_of_time=True, reproducible=True),
    )
    lc.prepare(stack_run, shapes=STACK_BUCKETS)
    event = _compile_event(audit_events)
    assert event["ahead_of_time"] == "fallback" and event["reproducible"]
    assert seen and all(options["options"]["deterministic"] is True for options in seen)
    assert lc.stats()["compiler"]["binding"] is None
    with pytest.raises(UnwarmedShapeError):
        with torch.no_grad(), lc.request(shape={"tokens": 16}):
            lc.module(stack_input(16))
    with pytest.raises(UnwarmedShapeError):
        with torch.no_grad(), lc.request():
            lc.module(stack_input(16))
    misses = audit_events.of("lifecycle.shape_miss")
    assert len(misses) == 2 and all(miss["policy"] == "fail" for miss in misses)
    lc.reset()


# --------------------------------------------------------------- warming outside the bounds
@pytest.mark.slow
def test_warming_a_shape_outside_the_bounds_leaves_it_cold(audit_events: Any) -> None:
    directory, _ = flux_packages()
    lc = flux_lifecycle(directory, serving=ServingPolicy(on_unwarmed="fail"))
    lc.prepare(flux_run, shapes=FLUX_BUCKETS)
    assert lc.ready
    lc.warm_up(flux_run, shapes=[{"tokens": 64}])
    row = next(row for row in lc.coverage() if row["shape"] == {"tokens": 64})
    assert not row["warmed"] and not lc.ready
    warm = [e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "warm_up"][-1]
    assert warm["outside_compiled_bounds"]
    lc.reset()


# ------------------------------------------------------------------- weights swapped in place
@pytest.mark.slow
def test_a_non_contiguous_weight_is_bound_as_a_copy_and_served_correctly(audit_events: Any) -> None:
    directory, _ = flux_packages()
    module = tiny_flux()
    lc = flux_lifecycle(directory, module=module)
    lc.prepare(flux_run, shapes=FLUX_BUCKETS)
    layer = module.transformer_blocks[0].ff.net[2]
    reference = tiny_flux()
    with torch.no_grad():
        swapped = torch.empty(layer.weight.shape[1], layer.weight.shape[0]).t()
        swapped.copy_(layer.weight * 1.5)
        assert not swapped.is_contiguous()
        layer.weight = torch.nn.Parameter(swapped)
        reference.transformer_blocks[0].ff.net[2].weight.mul_(1.5)
    inputs = flux_inputs(FluxShape(image_tokens=24))
    with torch.no_grad(), lc.request(num_inference_steps=8) as record:
        out = denoise(lc.module, inputs, 8)
    assert record.outcome == "ok" and lc.ready
    binding = lc.stats()["compiler"]["binding"]
    assert binding["copied_weights"] and binding["rebinds"] >= 1
    eager = flux_lifecycle(None, module=reference, policy=LifecyclePolicy(compile=False))
    eager.prepare(flux_run, shapes=FLUX_BUCKETS)
    with torch.no_grad(), eager.request(num_inference_steps=8):
        expected = denoise(eager.module, inputs, 8)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    lc.reset()


# ------------------------------------------------------------------------- the temporary store
@pytest.mark.slow
def test_a_private_package_directory_goes_with_reset_and_with_the_lifecycle() -> None:
    lc = stack_lifecycle(Stack(), None)
    lc.prepare(stack_run, shapes=STACK_BUCKETS)
    first = Path(lc.stats()["compiler"]["package_directory"])
    assert first.is_dir() and list(first.glob("*.pt2"))
    lc.reset()
    assert not first.exists()

    dropped = stack_lifecycle(Stack(), None)
    dropped.prepare(stack_run, shapes=STACK_BUCKETS)
    second = Path(dropped.stats()["compiler"]["package_directory"])
    assert second.is_dir() and second != first
    del dropped
    gc.collect()
    assert not second.exists()


# ---------------------------------------------------------------------- the internals' self-test
def test_the_self_test_covers_the_internals_ahead_of_time_blocks_touch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters.errors import TorchInternalsMoved

    internals.forget_check()
    internals.check_aot()  # this torch has them all
    loader = internals._loader_class()
    monkeypatch.delattr(loader, "load_constants")
    internals.forget_check()
    try:
        with pytest.raises(TorchInternalsMoved, match="load_constants"):
            internals.check_aot()
        with pytest.raises(BackendUnavailableError, match="load_constants"):
            stack_lifecycle(Stack(), tmp_path)  # refused at construction, typed
    finally:
        monkeypatch.undo()
        internals.forget_check()
    internals.check_aot()
