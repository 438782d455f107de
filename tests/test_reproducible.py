"""CompilePlan(reproducible=True) (adapters/reproducible.py): validation, what reaches
inductor (and what does not leak into the process), the audit, the artifact key, two processes
serving identical outputs, and stale or corrupt artifacts under the mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAST_COMPILE, SERVING_STEPS

from adapters.artifact_store import StoredArtifacts
from adapters.artifacts import MAGIC, ArtifactKey
from adapters.cpu import CpuAdapter
from adapters.errors import InvalidOptions
from adapters.reproducible import INDUCTOR_SETTINGS, supported, torch_compile_kwargs
from adapters.store import open_store
from lifecycle import CompilePlan, InvalidConfigError, ModuleLifecycle, State
from lifecycle.testing.tiny import denoise, denoiser, tiny_flux

ROOT = Path(__file__).resolve().parents[1]
REPRO = CompilePlan(reproducible=True)
PLAIN = CompilePlan()


def _lifecycle(module, cache_config, artifact_dir=None, plan=REPRO, options=FAST_COMPILE) -> ModuleLifecycle:
    return ModuleLifecycle(
        module, backend="cpu", cache_config=cache_config, compile_options=options,
        compile_plan=plan, artifact_dir=artifact_dir,
    )


# ---------------------------------------------------------------------------- validation
def test_this_torch_has_inductors_deterministic_mode():
    # The option rests on it (torch >= 2.8); the GPU machine's 2.11 has it too (bench results).
    assert supported()


@pytest.mark.parametrize("value", ["yes", 1, None, 0.0])
def test_wrong_types_are_refused_at_construction(value):
    with pytest.raises(InvalidConfigError, match=r"CompilePlan\(reproducible=...\) must be True or False"):
        CompilePlan(reproducible=value)


def test_the_lifecycle_refuses_the_old_compile_option_before_any_work(flux, cache_config):
    with pytest.raises(InvalidConfigError, match=r"CompilePlan\(reproducible=True\)"):
        _lifecycle(flux, cache_config, plan=PLAIN, options={"reproducible": True})
    assert flux._compiled_call_impl is None


def test_a_contradicting_inductor_option_is_refused():
    options = CpuAdapter().validate_options({"options": {"deterministic": False}})
    with pytest.raises(InvalidOptions, match="contradict"):
        CpuAdapter().validate_plan(REPRO, options)
    # Saying the same thing twice is fine.
    CpuAdapter().validate_plan(REPRO, CpuAdapter().validate_options({"options": {"deterministic": True}}))


# ---------------------------------------------------------------------------- what torch gets
def test_torch_compile_kwargs_merge_the_settings_and_expand_a_mode():
    plain = torch_compile_kwargs({"backend": "inductor"}, reproducible=True)
    assert plain == {"backend": "inductor", "options": INDUCTOR_SETTINGS}
    # torch.compile takes mode or options, not both: the mode becomes the options it stands for.
    tuned = torch_compile_kwargs({"backend": "inductor", "mode": "max-autotune"}, reproducible=True)
    assert "mode" not in tuned
    assert tuned["options"]["max_autotune"] is True and tuned["options"]["deterministic"] is True
    options = {"backend": "inductor", "options": {"epilogue_fusion": False}}
    mine = torch_compile_kwargs(options, reproducible=True)
    assert options == {"backend": "inductor", "options": {"epilogue_fusion": False}}  # never rewritten
    assert mine["options"] == {"epilogue_fusion": False, "deterministic": True}
    # Off, or another backend: torch gets exactly what it got before the option existed.
    assert torch_compile_kwargs({"backend": "inductor"}, reproducible=False) == {"backend": "inductor"}
    assert torch_compile_kwargs({"backend": "aot_eager"}, reproducible=True) == {"backend": "aot_eager"}


class _Block(torch.nn.Module):  # defined here, not in torch: dynamo traces user code only
    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm = torch.nn.Linear(8, 16), torch.nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.up(x)).sum(-1)


class _Seen(Exception):
    """Raised by the probe pass to stop inductor before its (slow, on a CPU) C++ build."""


def test_inductor_compiles_under_deterministic_mode_and_the_process_does_not(monkeypatch):
    # Real inductor: a post-grad pass reads inductor's config while inductor compiles this module.
    import torch._inductor.config as inductor_config

    monkeypatch.delenv("TORCHINDUCTOR_DETERMINISTIC", raising=False)
    seen: list[bool] = []

    def probe(graph: object) -> None:
        seen.append(bool(inductor_config.deterministic))
        raise _Seen

    adapter = CpuAdapter()
    for reproducible in (True, False):
        torch._dynamo.reset()
        block = _Block()
        adapter.compile(block, adapter.validate_options({}), CompilePlan(reproducible=reproducible))
        with inductor_config.patch(post_grad_custom_post_pass=probe, fx_graph_cache=False):
            with pytest.raises(Exception, match="_Seen"):
                block(torch.randn(4, 8))
        assert inductor_config.deterministic is False  # scoped to that compile, never process-wide
    assert seen == [True, False]


@pytest.mark.slow
def test_the_compile_transition_audits_the_option(flux, cache_config, inputs, audit_events):
    lc = _lifecycle(flux, cache_config)
    lc.prepare(denoiser(inputs, 2))
    compile_event = next(e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "compile")
    audited = compile_event["reproducible"]
    assert audited["scope"].startswith("this module's compile")
    assert audited["inductor"] is None  # aot_eager runs eager kernels: nothing for inductor to set
    assert audited["process"]["threads"] == torch.get_num_threads()
    assert audited["process"]["cudnn_benchmark"] is False
    assert any("thread count" in note for note in audited["notes"])
    # Off: the adapter has nothing to record, so the compile transition carries no such field.
    assert lc.backend.reproducibility(PLAIN, FAST_COMPILE) is None


def test_cudnn_benchmark_is_reported_not_changed(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    audited = CpuAdapter().reproducibility(REPRO, {"backend": "inductor"})
    assert audited is not None and audited["process"]["cudnn_benchmark"] is True
    assert any("cudnn.benchmark" in note for note in audited["notes"])
    assert torch.backends.cudnn.benchmark is True
    assert CpuAdapter().reproducibility(PLAIN, {"backend": "inductor"}) is None


# ---------------------------------------------------------------------------- artifacts
def test_the_option_is_part_of_the_artifact_key(cache_config):
    on = _lifecycle(tiny_flux(), cache_config, "unused")._artifact_key()
    off = _lifecycle(tiny_flux(), cache_config, "unused", CompilePlan(reproducible=False))
    unset = _lifecycle(tiny_flux(), cache_config, "unused", PLAIN)
    assert on.digest != off._artifact_key().digest
    assert off._artifact_key().digest == unset._artifact_key().digest
    assert on.fields["policy"]["compile_plan"]["reproducible"] is True


def _jit_store(artifact_dir: Path) -> StoredArtifacts:
    """The compile artifacts of a lifecycle with this ``artifact_dir``."""
    return StoredArtifacts(open_store(artifact_dir).child("jit"))


@pytest.mark.slow
def test_an_artifact_of_a_non_reproducible_compile_is_stale_and_ignored(
    tmp_path, cache_config, inputs, audit_events
):
    plain_key = _lifecycle(tiny_flux(), cache_config, tmp_path, PLAIN)._artifact_key()
    _jit_store(tmp_path).write(plain_key, b"graphs compiled without the option")
    lc = _lifecycle(tiny_flux(), cache_config, tmp_path)
    lc.prepare(denoiser(inputs, 2))
    assert lc.state is State.WARMED_UP
    load = next(e for e in audit_events.of("lifecycle.artifacts") if e["action"] == "load")
    assert load["status"] == "stale"
    assert "policy.compile_plan" in load["differing_fields"]


def test_a_corrupt_artifact_under_the_mode_is_reported_and_ignored(
    tmp_path, cache_config, inputs, audit_events
):
    key: ArtifactKey = _lifecycle(tiny_flux(), cache_config, tmp_path)._artifact_key()
    store = _jit_store(tmp_path)
    assert store.write(key, b"x" * 64).status == "saved"
    fetched = store.packages.fetch(key.filename.removesuffix(".dlart")).package
    assert fetched is not None
    path = fetched.files["payload"]  # the stored bytes, in place in a local store
    path.write_bytes(path.read_bytes()[:-7] + b"damaged")  # checksum no longer matches
    lc = _lifecycle(tiny_flux(), cache_config, tmp_path)
    lc.prepare(denoiser(inputs, 2))
    load = next(e for e in audit_events.of("lifecycle.artifacts") if e["action"] == "load")
    assert load["status"] == "corrupt" and load["log_level"] == "warning"
    assert lc.state is State.WARMED_UP  # compiled cold, as if there were no file
    with lc.request(num_inference_steps=SERVING_STEPS) as req:
        denoise(lc.module, inputs, SERVING_STEPS)
    assert req.new_graphs == 0
    assert path.read_bytes().startswith(MAGIC)  # reported and left alone, never trusted


# ---------------------------------------------------------------------------- two processes
_CHILD = textwrap.dedent(
    """
    import hashlib, json, logging, sys
    import structlog, torch
    torch.set_num_threads(1)  # replicas run with the same thread count (the audit says so)
    logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)
    from lifecycle import CompilePlan, ModuleLifecycle
    from lifecycle.testing.tiny import demo_cache_config, denoise, denoiser, flux_inputs, tiny_flux

    steps = int(sys.argv[1])
    lc = ModuleLifecycle(tiny_flux(), backend="cpu", cache_config=demo_cache_config(steps),
                         compile_options={"backend": "aot_eager"},
                         compile_plan=CompilePlan(reproducible=True))
    inputs = flux_inputs()
    with structlog.testing.capture_logs() as logs:
        lc.prepare(denoiser(inputs, 2), num_inference_steps=steps)
        with lc.request(num_inference_steps=steps) as req:
            out = denoise(lc.module, inputs, steps)
    audit = next(e for e in logs if e.get("trigger") == "compile")["reproducible"]
    print(json.dumps({"sha": hashlib.sha256(out.numpy().tobytes()).hexdigest(),
                      "cached_steps": req.cached_steps, "threads": audit["process"]["threads"]}))
    """
)


@pytest.mark.slow
def test_two_processes_serve_bit_identical_outputs():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(SERVING_STEPS)], cwd=ROOT, text=True,
            env={**os.environ, "PYTHONPATH": path, "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for seed in ("1", "4")  # different string hashing too, as in two real processes
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["threads"] == results[1]["threads"] == 1
    assert results[0]["cached_steps"] == results[1]["cached_steps"] > 0
    assert results[0]["sha"] == results[1]["sha"]
