"""Compile artifacts: saved at WarmedUp, loaded before the next start's compile; stale and corrupt
files are reported in the audit and ignored (never a crash, never a wrong result)."""

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

from adapters.artifacts import MAGIC, ArtifactKey, ArtifactStore
from lifecycle import InvalidConfigError, LifecyclePolicy, ModuleLifecycle, State
from lifecycle.testing.tiny import denoise, denoiser, tiny_flux

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT_EVENT = "lifecycle.artifacts"


def _events(audit_events, action: str) -> list[dict]:
    return [e for e in audit_events.of(ARTIFACT_EVENT) if e["action"] == action]


def _lifecycle(module, cache_config, artifact_dir, options=FAST_COMPILE) -> ModuleLifecycle:
    return ModuleLifecycle(
        module, backend="cpu", cache_config=cache_config, compile_options=options,
        artifact_dir=artifact_dir,
    )


def _key(module, cache_config, options=FAST_COMPILE) -> ArtifactKey:
    # The key the lifecycle would build (same validation, same fields).
    return _lifecycle(module, cache_config, "unused", options)._artifact_key()


# ---------------------------------------------------------------------------- keys
def test_key_is_stable_and_tracks_what_makes_graphs_valid(cache_config):
    base = _key(tiny_flux(), cache_config)
    assert base == _key(tiny_flux(seed=5), cache_config)  # other weights: same graphs
    variants = {
        "dtype": _key(tiny_flux(dtype=torch.bfloat16), cache_config),
        "compile_options": _key(tiny_flux(), cache_config, {**FAST_COMPILE, "fullgraph": False}),
        "cache_config": _key(tiny_flux(), type(cache_config)(Fn_compute_blocks=2)),
    }
    for field_name, key in variants.items():
        assert key.digest != base.digest, field_name
        assert key.fields[field_name] != base.fields[field_name]
    assert base.fields["torch"] == torch.__version__
    assert base.fields["cache_dit"] and base.fields["device"] == "cpu"
    assert base.fields["module_config"]["num_layers"] == 2


def test_the_key_survives_calls_through_cache_dit(cache_config, inputs):
    # cache-dit re-registers the block lists on every call, reordering named_parameters(): the
    # key a warmed-up module saves under must be the one a fresh start looks up.
    lc = _lifecycle(tiny_flux(), cache_config, "unused")
    lc.mount_cache()
    fresh = lc._artifact_key()
    lc.compile()
    lc.warm_up(denoiser(inputs, 2))
    assert lc._artifacts is not None
    assert lc._artifact_key() == fresh == lc._artifacts.key


@pytest.mark.slow
def test_the_key_is_the_same_in_every_process(cache_config):
    # diffusers' config carries a list whose order follows string hashing (different per
    # process): measured on an H100, it made every restart's key differ until it was left out.
    script = (
        "from adapters.artifacts import build_key; from lifecycle.testing.tiny import tiny_flux; "
        "print(build_key(tiny_flux(), compile_options={'backend': 'inductor'}).digest)"
    )
    digests = set()
    for seed in ("1", "4"):  # these two order that list differently
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": path}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        digests.add(done.stdout.split()[-1])
    assert len(digests) == 1


# ---------------------------------------------------------------------------- the store
def test_store_round_trip_and_damage_is_detected(tmp_path, cache_config):
    store = ArtifactStore(tmp_path)
    key = _key(tiny_flux(), cache_config)
    assert store.read(key)[0].status == "missing"
    assert store.write(key, b"payload-bytes").status == "saved"
    report, payload = store.read(key)
    assert (report.status, payload) == ("loaded", b"payload-bytes")

    path = store.path_for(key)
    good = path.read_bytes()
    damaged = {
        "flipped byte": good[:-3] + bytes([good[-3] ^ 0xFF]) + good[-2:],
        "truncated": good[:-5],
        "garbage": b"\x00\x01not an artifact",
        "bad header": MAGIC + b"{not json\n" + b"x",
        "empty": b"",
    }
    for name, blob in damaged.items():
        path.write_bytes(blob)
        report, payload = store.read(key)
        assert (report.status, payload) == ("corrupt", None), name
        assert report.problem


def test_an_unwritable_directory_is_reported_not_raised(tmp_path, cache_config):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the directory should be")
    store = ArtifactStore(blocker)
    key = _key(tiny_flux(), cache_config)
    assert store.load(key).status == "missing"
    report = store.write(key, b"graphs")
    assert report.status == "failed" and report.problem and "cannot write" in report.detail


def test_artifact_dir_must_be_a_path(flux):
    with pytest.raises(InvalidConfigError, match="artifact_dir"):
        ModuleLifecycle(flux, backend="cpu", compile_options=FAST_COMPILE, artifact_dir=42)


def test_a_file_for_another_configuration_is_stale(tmp_path, cache_config):
    store = ArtifactStore(tmp_path)
    key = _key(tiny_flux(), cache_config)
    old = ArtifactKey(key.label, {**key.fields, "torch": "2.0.0"})
    store.write(old, b"old graphs")
    report = store.load(key)
    assert report.status == "stale" and report.differing_fields == ("torch",)
    # A file at this key's name whose header says otherwise (hash collision, hand edit): stale.
    store.path_for(key).write_bytes(store.path_for(old).read_bytes())
    assert store.load(key).status == "stale"


# ---------------------------------------------------------------------------- the lifecycle
def test_lifecycle_reports_missing_then_saves_nothing_for_aot_eager(
    tmp_path, cache_config, inputs, audit_events
):
    lc = _lifecycle(tiny_flux(), cache_config, tmp_path)
    lc.prepare(denoiser(inputs, 2))
    assert [e["status"] for e in _events(audit_events, "load")] == ["missing"]
    # aot_eager generates no code, so there is nothing to save, and no file is written.
    assert [e["status"] for e in _events(audit_events, "save")] == ["empty"]
    assert list(tmp_path.iterdir()) == []
    assert lc.stats()["artifacts"] == {"load": "missing", "save": "empty"}
    compile_event = audit_events.of("lifecycle.transition")[1]
    assert compile_event["trigger"] == "compile" and compile_event["artifacts_load"] == "missing"


@pytest.mark.parametrize("damage", ["corrupt-file", "torch-refuses", "stale"])
def test_damaged_artifacts_are_reported_and_ignored(
    tmp_path, cache_config, inputs, audit_events, damage
):
    from adapters.artifact_store import StoredArtifacts
    from adapters.store import open_store

    module = tiny_flux()
    key = _key(module, cache_config)
    store = StoredArtifacts(open_store(tmp_path).child("jit"))  # where the lifecycle looks
    if damage == "corrupt-file":
        torn = tmp_path / "torn"
        torn.write_bytes(b"\x89 torn write")
        name = key.filename.removesuffix(".dlart")
        published = store.packages.publish(name, {"payload": torn}, {"key": dict(key.fields)})
        assert published.status == "published"
    elif damage == "torch-refuses":
        store.write(key, os.urandom(256))  # a well-formed file whose payload torch cannot read
    else:
        store.write(ArtifactKey(key.label, {**key.fields, "cache_dit": "0.0.1"}), b"old")

    lc = _lifecycle(module, cache_config, tmp_path)
    lc.prepare(denoiser(inputs, 2))
    assert lc.state is State.WARMED_UP
    (load,) = _events(audit_events, "load")
    assert load["status"] == ("stale" if damage == "stale" else "corrupt")
    assert load["log_level"] == "warning" and load["detail"]
    with lc.request(num_inference_steps=SERVING_STEPS) as req:
        out = denoise(lc.module, inputs, SERVING_STEPS)
    assert req.new_graphs == 0

    clean = ModuleLifecycle(  # eager reference: what an undamaged start computes
        tiny_flux(), backend="cpu", cache_config=cache_config, policy=LifecyclePolicy(compile=False)
    )
    clean.prepare(denoiser(inputs, 2))
    with clean.request(num_inference_steps=SERVING_STEPS):
        expected = denoise(clean.module, inputs, SERVING_STEPS)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_artifacts_are_ignored_without_compile(tmp_path, cache_config, inputs, audit_events):
    lc = ModuleLifecycle(
        tiny_flux(), backend="cpu", cache_config=cache_config,
        policy=LifecyclePolicy(compile=False), artifact_dir=tmp_path,
    )
    lc.prepare(denoiser(inputs, 2))
    assert audit_events.of(ARTIFACT_EVENT) == [] and lc.stats()["artifacts"] is None


# ---------------------------------------------------------------------------- a real restart
# A process that prepares a small block-stacked module with inductor (regional) through the
# lifecycle and prints what it loaded/saved, inductor's cache hits and misses, and its output.
_CHILD = textwrap.dedent(
    """
    import json, sys
    import structlog, torch
    from torch._dynamo.utils import counters
    from lifecycle import CompilePlan, LifecyclePolicy, ModuleLifecycle

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        def forward(self, x):
            return x + self.b(torch.nn.functional.gelu(self.a(x)))

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(3))
        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model, x = Stack(), torch.randn(4, 8)
    lc = ModuleLifecycle(model, backend="cpu", policy=LifecyclePolicy(cache_dit=False),
                         compile_options={"backend": "inductor"}, compile_plan=CompilePlan(scope="blocks"),
                         artifact_dir=sys.argv[1])
    with structlog.testing.capture_logs() as logs:
        with torch.no_grad():
            lc.prepare(lambda m: m(x))
            with lc.request() as req:
                out = lc.module(x)
    print(json.dumps({
        "events": [{k: e[k] for k in ("action", "status")} for e in logs
                   if e["event"] == "lifecycle.artifacts"],
        "hits": counters["inductor"]["fxgraph_cache_hit"],
        "misses": counters["inductor"]["fxgraph_cache_miss"],
        "new_graphs": req.new_graphs,
        "out": out.tolist(),
    }))
    """
)


def _child(artifact_dir: Path, inductor_cache: Path) -> dict:
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache),  # each start begins with an empty cache
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(artifact_dir)], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_restart_loads_artifacts_and_inductor_compiles_nothing(tmp_path):
    artifacts = tmp_path / "artifacts"
    cold = _child(artifacts, tmp_path / "inductor-1")
    assert cold["events"] == [
        {"action": "load", "status": "missing"}, {"action": "save", "status": "saved"},
    ]
    assert cold["misses"] >= 1 and cold["new_graphs"] == 0
    assert len(list((artifacts / "jit" / "manifests").glob("Stack-*.json"))) == 1

    warm = _child(artifacts, tmp_path / "inductor-2")  # a fresh machine: only our file carries over
    assert warm["events"] == [{"action": "load", "status": "loaded"}]  # nothing new to save
    assert warm["misses"] == 0 and warm["hits"] == cold["misses"]
    assert warm["new_graphs"] == 0
    assert warm["out"] == cold["out"]
