"""Ahead-of-time compiled blocks (adapters/aot/) on the CPU: a tiny real Flux, real torch.export
and AOTInductor with the system compiler. One build per module (two block kinds, ~30-60 s on two
cores); every other test binds those packages to a fresh transformer with the same weights."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from adapters import CacheDitAdapter, aot
from adapters import _torch_internals as internals
from lifecycle.testing.tiny import FluxShape, demo_cache_config, denoise, flux_inputs, tiny_flux

SIZES = (64, 128)  # the "declared buckets": image tokens of the two captured runs
BETWEEN, OUTSIDE = 96, 160
# Each bound test model's binding (the caller owns a binding: there is no registry).
BINDINGS: weakref.WeakKeyDictionary[torch.nn.Module, aot.AotBinding] = weakref.WeakKeyDictionary()


@dataclass
class Built:
    directory: Path
    calls: dict[str, list[aot.BlockCall]]
    result: aot.AotBuild


def _inputs(tokens: int) -> object:
    return flux_inputs(FluxShape(image_tokens=tokens))


@pytest.fixture(scope="module")
def captured() -> dict[str, list[aot.BlockCall]]:
    """Each block kind's first call in one eager run per declared size."""
    model = tiny_flux()
    runs = [lambda tokens=tokens: denoise(model, _inputs(tokens), 1) for tokens in SIZES]
    with torch.no_grad():
        return aot.capture_calls(model, runs)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, captured: dict[str, list[aot.BlockCall]]) -> Built:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    directory = tmp_path_factory.mktemp("aot-packages")
    return Built(directory, captured, aot.build(tiny_flux(), captured, directory, verify=True))


@pytest.fixture
def bound(built: Built) -> Iterator[torch.nn.Module]:
    model = tiny_flux()
    found = aot.open_packages(model, built.directory)
    BINDINGS[model] = aot.bind(model, {kind: status.info for kind, status in found.items() if status.info})
    yield model
    binding = BINDINGS.pop(model, None)
    if binding is not None:
        aot.unbind(binding)


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


# ------------------------------------------------------------------------------- bounds, build
def test_bounds_are_dynamic_only_where_the_declared_sizes_differ(
    captured: dict[str, list[aot.BlockCall]],
) -> None:
    classes = sorted(kind.split("-")[0] for kind in captured)
    assert classes == ["FluxSingleTransformerBlock", "FluxTransformerBlock"]
    for kind, calls in captured.items():
        assert len(calls) == len(SIZES), kind
        spec = aot.plan_bounds(calls)
        sizes = {t.path: t.sizes for t in spec.tensors}
        text = 8
        assert sizes["hidden_states"] == (1, SIZES, 32)
        assert sizes["encoder_hidden_states"] == (1, text, 32)  # same in every run: static
        assert sizes["image_rotary_emb[0]"] == ((SIZES[0] + text, SIZES[1] + text), 16)
        # One run: everything static at the warm-up size.
        assert not aot.plan_bounds(calls[:1]).dynamic


@pytest.mark.slow
def test_build_saves_small_checked_packages_with_the_inferred_relation(built: Built) -> None:
    result = built.result
    assert result.complete and set(result.packages) == set(built.calls)
    for kind, info in result.packages.items():
        assert result.checks[kind].outcome == "passed"
        assert info.path.stat().st_size < 5_000_000  # no weights inside
        guard = info.manifest["guard"]
        # Export inferred that the rotary length is image tokens + text tokens.
        symbol = guard["symbols"][0][2]
        assert [[name, low, high] for name, low, high in guard["ranges"]] == [[symbol, *SIZES]]
        assert {(t, const) for t, _, const, _ in guard["linear"]} == {(3, 8), (4, 8)}
    found = aot.open_packages(tiny_flux(), built.directory)
    assert {status.status for status in found.values()} == {"ok"}
    assert all(status.verified_here for status in found.values())


# -------------------------------------------------------------------------------------- binding
@pytest.mark.slow
def test_bound_blocks_equal_eager_at_two_sizes_and_compile_nothing(bound: torch.nn.Module) -> None:
    reference = tiny_flux()
    binding = BINDINGS.get(bound)
    assert binding is not None and binding.blocks == 4 and len(aot.aot_blocks(bound)) == 4
    before = _graphs()
    for tokens in (SIZES[0], BETWEEN):
        inputs = _inputs(tokens)
        torch.testing.assert_close(denoise(bound, inputs, 3), denoise(reference, inputs, 3),
                                   rtol=1e-5, atol=1e-5)
    assert _graphs() == before  # no dynamo graph: the packages ran
    assert binding.stats.calls == 2 * 3 * 4 and not binding.stats.misses


@pytest.mark.slow
def test_outside_the_bounds_runs_eager_and_reports_the_miss(bound: torch.nn.Module) -> None:
    inputs = _inputs(OUTSIDE)
    torch.testing.assert_close(denoise(bound, inputs, 1), denoise(tiny_flux(), inputs, 1), rtol=0, atol=0)
    binding = BINDINGS[bound]
    assert binding.stats.misses["shape"] == 4 and binding.stats.calls == 0

    aot.unbind(binding)
    seen: list[str] = []

    def refuse(block: torch.nn.Module, reason: str) -> None:
        seen.append(reason)
        raise RuntimeError(f"not warmed: {reason}")

    found = aot.open_packages(bound, Path(binding.packages[next(iter(binding.packages))].path).parent)
    BINDINGS[bound] = aot.bind(
        bound, {kind: status.info for kind, status in found.items() if status.info}, on_miss=refuse
    )
    with pytest.raises(RuntimeError, match="not warmed: shape"):
        denoise(bound, inputs, 1)
    assert seen == ["shape"]


@pytest.mark.slow
def test_cache_dit_caches_steps_through_its_wrappers_calling_aot_blocks(built: Built) -> None:
    adapter = CacheDitAdapter()
    cache_config = demo_cache_config(8, threshold=0.8)  # caches steps 4-7 of 8 at these sizes
    inputs = _inputs(BETWEEN)
    results = {}
    for name in ("eager", "aot"):
        model = tiny_flux()
        adapter.mount(model, cache_config)  # cache-dit first, as the lifecycle's table demands
        if name == "aot":
            found = aot.open_packages(model, built.directory)
            binding = aot.bind(model, {kind: status.info for kind, status in found.items() if status.info})
        outputs = []
        for _ in range(2):  # two requests, each a refreshed context
            adapter.refresh(model, cache_config, num_inference_steps=8)
            outputs.append(denoise(model, inputs, 8))
        results[name] = (outputs, adapter.summary(model).cached_steps)
    (eager_out, eager_cached), (aot_out, aot_cached) = results["eager"], results["aot"]
    assert aot_cached == eager_cached == 4  # the cached branch ran, around AOT blocks
    torch.testing.assert_close(aot_out[0], eager_out[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(aot_out[0], aot_out[1])  # refreshed requests identical
    # cache-dit's wrappers call blocks positionally: every call still ran the packages.
    assert binding.stats.calls > 0 and not binding.stats.misses


@pytest.mark.slow
def test_unbind_restores_eager_exactly(bound: torch.nn.Module) -> None:
    inputs = _inputs(SIZES[0])
    denoise(bound, inputs, 1)
    binding = BINDINGS[bound]
    assert aot.unbind(binding) and not aot.unbind(binding)
    assert not aot.aot_blocks(bound)
    assert all(block._compiled_call_impl is None for block in aot.repeated_blocks(bound))
    assert torch.equal(denoise(bound, inputs, 2), denoise(tiny_flux(), inputs, 2))


@pytest.mark.slow
def test_bound_blocks_follow_changed_weights(bound: torch.nn.Module) -> None:
    reference = tiny_flux()
    inputs = _inputs(SIZES[0])
    binding = BINDINGS[bound]
    with torch.no_grad():
        # In place: the packages read the block's own tensors, nothing to re-bind.
        for model in (bound, reference):
            model.transformer_blocks[0].ff.net[2].weight.mul_(1.5)
    torch.testing.assert_close(denoise(bound, inputs, 1), denoise(reference, inputs, 1), rtol=1e-5, atol=1e-5)
    assert aot.rebind(binding) == 0 and binding.stats.rebinds == 0

    with torch.no_grad():
        # New tensors, as a LoRA fuse assigns them: re-bound by ``rebind``...
        for model in (bound, reference):
            single = model.single_transformer_blocks[1]
            single.proj_out.weight = torch.nn.Parameter(single.proj_out.weight * 0.5)
    assert aot.rebind(binding) == 1 and aot.rebind(binding) == 0
    torch.testing.assert_close(denoise(bound, inputs, 1), denoise(reference, inputs, 1), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        # ...or, when nobody called it, at the block's next call (a moved ``.data`` here).
        for model in (bound, reference):
            double = model.transformer_blocks[1]
            double.attn.to_q.weight.data = double.attn.to_q.weight.data * 2.0
    torch.testing.assert_close(denoise(bound, inputs, 1), denoise(reference, inputs, 1), rtol=1e-5, atol=1e-5)
    assert binding.stats.rebinds == 2 and not binding.stats.misses

    with torch.no_grad():
        bound.transformer_blocks[0].ff.net[2].bias = torch.nn.Parameter(torch.zeros(33))
    with pytest.raises(aot.AotPackageError, match="stale"):
        aot.rebind(binding)


_RESTART = """
import json, sys, torch
from torch._dynamo.utils import counters
from adapters import aot
from lifecycle.testing.tiny import FluxShape, denoise, flux_inputs, tiny_flux
torch.set_num_threads(int(sys.argv[4]))  # the parent's: kernels may split work by thread count
model = tiny_flux()
found = aot.open_packages(model, sys.argv[1])
binding = aot.bind(model, {kind: status.info for kind, status in found.items()})
out = denoise(model, flux_inputs(FluxShape(image_tokens=int(sys.argv[2]))), 2)
torch.save(out, sys.argv[3])
print(json.dumps({"statuses": sorted(s.status for s in found.values()),
                  "verified_here": all(s.verified_here for s in found.values()),
                  "graphs": counters["stats"]["unique_graphs"], "misses": dict(binding.stats.misses),
                  "calls": binding.stats.calls}))
"""


@pytest.mark.slow
def test_a_fresh_process_loads_the_packages_and_matches_bit_for_bit(
    bound: torch.nn.Module, built: Built, tmp_path: Path
) -> None:
    # A restart: nothing compiled, nothing traced, no check (it passed on this host at build).
    import subprocess

    saved = tmp_path / "out.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _RESTART, str(built.directory), str(BETWEEN), str(saved),
         str(torch.get_num_threads())],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"statuses": ["ok", "ok"], "verified_here": True, "graphs": 0, "misses": {}, "calls": 8}
    assert torch.equal(torch.load(saved), denoise(bound, _inputs(BETWEEN), 2))


# ------------------------------------------------------------------------- damaged or foreign
def _copy(built: Built, target: Path) -> dict[str, aot.PackageStatus]:
    shutil.copytree(built.directory, target)
    return aot.open_packages(tiny_flux(), target)


@pytest.mark.slow
def test_corrupt_or_stale_packages_are_reported_and_never_loaded(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = _copy(built, tmp_path / "pk")
    double, single = sorted(found, reverse=True)  # FluxTransformerBlock-..., FluxSingle...
    package = found[double].info.path  # type: ignore[union-attr]
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0xFF
    package.write_bytes(bytes(data))
    manifest = found[single].info.manifest_path  # type: ignore[union-attr]
    manifest.write_text(manifest.read_text()[:40])

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a damaged package was loaded")

    monkeypatch.setattr(internals, "load_aoti_package", no_load)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", no_load)
    model = tiny_flux()
    statuses = aot.open_packages(model, tmp_path / "pk")
    assert statuses[double].status == "corrupt" and "SHA-256" in statuses[double].reason
    assert statuses[single].status == "corrupt"
    with pytest.raises(aot.AotPackageError, match="corrupt"):
        aot.bind(model, {double: found[double].info, single: built.result.packages[single]})  # type: ignore[dict-item]
    assert not aot.aot_blocks(model)

    # Another plan (other declared bounds) or other inductor options: another key.
    other = aot.open_packages(model, built.directory, plan_token="buckets=512,1024")
    assert {s.status for s in other.values()} == {"stale"}
    assert {s.status for s in aot.open_packages(model, tmp_path / "empty").values()} == {"missing"}
    # Bounds other than those built for, when the caller passes its own.
    narrow = {kind: aot.plan_bounds(calls[:1]) for kind, calls in built.calls.items()}
    assert {s.status for s in aot.open_packages(model, built.directory, specs=narrow).values()} == {"stale"}


# ---------------------------------------------------------------------------- the child check
@pytest.mark.slow
def test_child_check_reports_mismatch_and_garbage_without_crashing(built: Built, tmp_path: Path) -> None:
    model = tiny_flux()
    kinds = aot.block_kinds(model)
    kind = next(k for k in kinds if k.startswith("FluxTransformerBlock"))
    block, call = kinds[kind][0], built.calls[kind][0]
    with torch.no_grad():
        expected = [t + 1.0 for t in torch.utils._pytree.tree_leaves(block(**call.kwargs))]
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a package" * 100)
    results = aot.check_packages([
        aot.CheckJob("wrong-output", built.result.packages[kind].path, block, call, expected=expected),
        aot.CheckJob("garbage", garbage, block, call),
    ], timeout_s=300)
    assert results["wrong-output"].outcome == "mismatch"
    assert results["wrong-output"].max_error is not None and results["wrong-output"].max_error > 0.01
    assert results["garbage"].outcome in ("error", "crashed") and not results["garbage"].ok


def test_a_crashing_or_hanging_check_is_a_result() -> None:
    crash = [sys.executable, "-c",
             "import json, os, signal; print(json.dumps({'index': 0, 'stage': 'loading'}), flush=True); "
             "os.kill(os.getpid(), signal.SIGSEGV)"]
    first, second = aot._run_check_process(crash, ["a", "b"], [1e-3, 1e-3], timeout_s=60)
    assert first.outcome == "crashed" and first.detail.startswith(signal.Signals.SIGSEGV.name)
    assert "CXX=/usr/bin/g++" in first.detail  # what to do next
    assert second.outcome == "not_run"
    (hung,) = aot._run_check_process([sys.executable, "-c", "import time; time.sleep(30)"], ["a"], [1e-3],
                                     timeout_s=1)
    assert hung.outcome == "timeout" and not hung.ok


# ------------------------------------------------------------------------------------- refusals
def test_unsupported_devices_and_options_are_refused() -> None:
    class Npu:
        type = "npu"

    with pytest.raises(aot.AotUnsupported, match="cpu, cuda"):
        aot._check_device(Npu())  # type: ignore[arg-type]
    with pytest.raises(aot.AotUnsupported, match="meta"):
        aot.package_key(tiny_flux().to("meta").transformer_blocks[0])
    configs = aot.inductor_configs({"mode": "max-autotune", "fullgraph": True})
    assert configs["max_autotune"] and "triton.cudagraphs" not in configs
    assert configs["aot_inductor.package_constants_in_so"] is False
    if sys.platform.startswith("linux"):  # link the process's shared libstdc++, never a second copy
        assert configs["aot_inductor.custom_op_libs"] == ["stdc++"]
        mine = aot.inductor_configs({"options": {"aot_inductor.custom_op_libs": ["mylib", "stdc++"]}})
        assert mine["aot_inductor.custom_op_libs"] == ["mylib", "stdc++"]
    with pytest.raises(aot.InvalidOptions):
        aot.inductor_configs({"backend": "aot_eager"})
    with pytest.raises(aot.InvalidOptions):
        aot.inductor_configs({"options": {"aot_inductor.package_constants_in_so": True}})


def test_calls_are_normalised_so_positional_and_keyword_calls_are_one_structure() -> None:
    block = tiny_flux().transformer_blocks[0]
    h, e, t = torch.zeros(1, 4, 32), torch.zeros(1, 2, 32), torch.zeros(1, 32)
    positional = aot.normalize_call(block, (h, e), {"temb": t})
    keyword = aot.normalize_call(block, (), {"temb": t, "encoder_hidden_states": e, "hidden_states": h})
    assert list(positional) == list(keyword) == [
        "hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs"
    ]
    assert json.dumps(list(positional)) == json.dumps(list(keyword))
