"""Edges found by probing the shipped parts with hostile but legal inputs: artifact files that
are links or hold absurd headers, an empty artifact path, ops-server arguments and clients that
misbehave, the metrics feed, a huge number in an audit, and another library's logger. Each test
uses the real part: real files, a real server and socket, real structlog, a real interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import FAST_COMPILE

from adapters.artifact_session import ArtifactSession
from adapters.artifacts import MAGIC, ArtifactKey, ArtifactStore
from adapters.errors import InvalidOptions
from lifecycle import InvalidConfigError, ModuleLifecycle, State
from lifecycle.testing.tiny import denoiser, tiny_flux

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python argv...`` in a fresh interpreter, with the repository importable."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        check=False, env={**os.environ, "PYTHONPATH": path},
    )


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return run("-c", textwrap.dedent(code))


# ---------------------------------------------------------------------------- the machine's logging
def test_importing_the_machine_leaves_transitions_logger_alone_and_triggers_stay_quiet():
    # A library never reconfigures another library's logger; its own machines still write no
    # transitions INFO record per trigger under a host's INFO root logger.
    run = run_python(
        """
        import json, logging
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record.name)
        logging.basicConfig(level=logging.INFO, handlers=[Keep()])
        from lifecycle.machine import StateHolder, events_for, fire
        from states import LifecyclePolicy, Trigger

        class Attempt:
            def run(self): pass
            def committed(self): pass
            def aborted(self, error): raise error

        holder = StateHolder()
        fire(events_for(LifecyclePolicy()), holder, Trigger.MOUNT_CACHE, Attempt())
        print(json.dumps({
            "levels": [logging.getLogger(n).level for n in ("transitions", "transitions.core")],
            "state": holder.state,
            "records": records,
        }))
        """
    )
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.splitlines()[-1])
    assert found == {"levels": [0, 0], "state": "CacheMounted", "records": []}


# ---------------------------------------------------------------------------- audit show
def test_show_prints_a_huge_duration_bounded_where_verify_says_ok(tmp_path):
    event = {
        "event": "lifecycle.transition", "module": "dit", "module_id": "m1", "trigger": "mount_cache",
        "source": "Loaded", "dest": "CacheMounted", "outcome": "ok", "duration_ms": 10**399 + 7,
        "backend": "cpu", "policy": {"cache_dit": True, "compile": True}, "seq": 1,
        "timestamp": "2026-01-02T03:04:05.678901Z",
    }
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps(event) + "\n")
    verify = run("-m", "lifecycle", "audit", "verify", str(path))
    assert verify.returncode == 0 and ": OK (" in verify.stdout, verify.stderr
    show = run("-m", "lifecycle", "audit", "show", str(path))
    assert show.returncode == 0 and "Traceback" not in show.stderr, show.stderr[-2000:]
    (row,) = [line for line in show.stdout.splitlines() if "mount_cache" in line]
    assert row.endswith("1.00e+396 s") and len(row) < 120
    assert "verify: " in show.stdout and ": OK (" in show.stdout


# ---------------------------------------------------------------------------- compile artifacts
def _key(cache_config) -> ArtifactKey:
    # The key the lifecycle builds (same validation, same fields).
    lc = ModuleLifecycle(tiny_flux(), backend="cpu", cache_config=cache_config,
                         compile_options=FAST_COMPILE, artifact_dir="unused")
    return lc._artifact_key()


def _header_file(path: Path, **header: object) -> None:
    """An artifact file with this header (raw JSON text for values JSON cannot carry)."""
    text = "{" + ", ".join(f'"{name}": {value}' for name, value in header.items()) + "}"
    path.write_bytes(MAGIC + text.encode() + b"\n" + b"payload")


def _damage(kind: str, path: Path) -> None:
    ok = {"format": "1", "key": "{}", "payload_sha256": '"00"', "payload_bytes": "7"}
    if kind == "dangling link":
        path.symlink_to(path.parent / "removed-by-a-cleanup.dlart")
    elif kind == "link loop":
        path.symlink_to(path)
    elif kind == "infinite size":
        _header_file(path, **{**ok, "payload_bytes": "Infinity"})
    elif kind == "huge size":
        _header_file(path, **{**ok, "payload_bytes": "1e999"})
    elif kind == "huge integer size":
        _header_file(path, **{**ok, "payload_bytes": "9" * 400})
    elif kind == "deep header":
        _header_file(path, **{**ok, "key": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"})
    else:
        raise AssertionError(kind)


DAMAGE = ["dangling link", "link loop", "infinite size", "huge size", "huge integer size", "deep header"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_file_that_cannot_be_an_artifact_is_corrupt_never_an_error(tmp_path, cache_config, kind):
    store = ArtifactStore(tmp_path)
    key = _key(cache_config)
    _damage(kind, store.path_for(key))
    report = store.load(key)
    assert report.status == "corrupt" and report.problem, report
    assert report.path == str(store.path_for(key)) and 0 < len(report.detail) < 200


@pytest.mark.parametrize("kind", [kind for kind in DAMAGE if kind != "huge integer size"])
def test_a_damaged_file_of_another_configuration_is_passed_over(tmp_path, cache_config, kind):
    # Looking for a stale file of the same module class must not trip over a damaged one.
    store = ArtifactStore(tmp_path)
    key = _key(cache_config)
    _damage(kind, tmp_path / f"{key.label}-{'0' * 24}.dlart")
    assert store.load(key).status == "missing"
    store.write(ArtifactKey(key.label, {**key.fields, "torch": "2.0.0"}), b"old graphs")
    report = store.load(key)
    assert report.status == "stale" and report.differing_fields == ("torch",)


@pytest.mark.parametrize("kind", ["dangling link", "infinite size", "deep header"])
def test_the_compile_runs_cold_past_a_damaged_file(tmp_path, cache_config, inputs, audit_events, kind):
    key = _key(cache_config)
    _damage(kind, ArtifactStore(tmp_path).path_for(key))
    lc = ModuleLifecycle(tiny_flux(), backend="cpu", cache_config=cache_config,
                         compile_options=FAST_COMPILE, artifact_dir=tmp_path)
    lc.prepare(denoiser(inputs, 2))
    assert lc.state is State.WARMED_UP
    (load,) = [e for e in audit_events.of("lifecycle.artifacts") if e["action"] == "load"]
    assert load["status"] == "corrupt" and load["log_level"] == "warning"
    assert lc.stats()["artifacts"]["load"] == "corrupt"


def test_an_empty_artifact_directory_is_refused(tmp_path, monkeypatch):
    # An unset environment variable ("$ARTIFACTS") must not turn into "the working directory".
    monkeypatch.chdir(tmp_path)
    for make in (ArtifactStore, ArtifactSession):
        with pytest.raises(InvalidOptions, match=r"empty path.*pass a directory path.*or None"):
            make("")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.xfail(
    strict=True, raises=InvalidOptions,
    reason="ModuleLifecycle builds its ArtifactSession outside the block that turns adapter errors "
    "into lifecycle errors (lifecycle/module.py)",
)
def test_an_empty_artifact_dir_is_a_config_error_of_the_lifecycle(flux, cache_config):
    with pytest.raises(InvalidConfigError, match=r"transformer: .*artifact_dir=.*or None"):
        ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE,
                        artifact_dir="")
