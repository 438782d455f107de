"""Edges found by probing the shipped parts with hostile but legal inputs: artifact files that
are links or hold absurd headers, an empty artifact path, ops-server arguments and clients that
misbehave, the metrics feed, a huge number in an audit, and another library's logger. Each test
uses the real part: real files, a real server and socket, real structlog, a real interpreter."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from conftest import FAST_COMPILE

from adapters.artifact_session import ArtifactSession
from adapters.artifact_store import StoredArtifacts
from adapters.artifacts import MAGIC, ArtifactKey, ArtifactStore
from adapters.errors import InvalidOptions
from adapters.store import open_store
from lifecycle import InvalidConfigError, LifecyclePolicy, ModuleLifecycle, State
from lifecycle.ops import make_wsgi_app, serve
from lifecycle.testing import NoopBackend
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
        from lifecycle._machine import StateHolder, events_for
        from states import LifecyclePolicy, Trigger

        class Attempt:
            def run(self): pass
            def committed(self): pass
            def aborted(self, error): raise error

        holder = StateHolder()
        events_for(LifecyclePolicy())[Trigger.MOUNT_CACHE].trigger(holder, attempt=Attempt())
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
@pytest.mark.slow
def test_the_compile_runs_cold_past_a_damaged_file(tmp_path, cache_config, inputs, audit_events, kind):
    # The lifecycle keeps its artifacts in the store's jit/ folder: damage the stored file there.
    key = _key(cache_config)
    stored = StoredArtifacts(open_store(tmp_path).child("jit"))
    assert stored.write(key, b"graphs").status == "saved"
    fetched = stored.packages.fetch(key.filename.removesuffix(".dlart")).package
    assert fetched is not None
    path = fetched.files["payload"]
    path.unlink()
    _damage(kind, path)
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


def test_an_empty_artifact_dir_is_a_config_error_of_the_lifecycle(flux, cache_config):
    with pytest.raises(InvalidConfigError, match=r"^transformer: .*empty.*pass a directory path.*or None"):
        ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE,
                        artifact_dir="")


# ---------------------------------------------------------------------------- the ops server
def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _eager(name: str) -> ModuleLifecycle:
    return ModuleLifecycle(tiny_flux(), name=name, policy=LifecyclePolicy(cache_dit=False, compile=False),
                           backend=NoopBackend())


@pytest.mark.parametrize("host", ["127.0.0.1\x00", "\ud800", "local\udcffhost"],
                         ids=["nul", "lone-surrogate", "escaped-byte"])
def test_a_host_no_socket_can_take_is_a_typed_refusal(host):
    with pytest.raises(InvalidConfigError, match=r"^host must be an address or host name") as info:
        serve(port=0, host=host)
    assert repr(host) in str(info.value)


@pytest.mark.parametrize("idle_timeout", [0, -1.0, math.inf, math.nan, True, "5"])
def test_a_bad_idle_timeout_is_refused(idle_timeout):
    with pytest.raises(InvalidConfigError, match="idle_timeout must be a positive number"):
        serve(port=0, idle_timeout=idle_timeout)


def test_model_names_are_percent_decoded_like_the_wsgi_app_does():
    lifecycles = {name: _eager(name) for name in ("flux dev", "what?", "café")}
    wsgi = make_wsgi_app(lifecycles)

    def wsgi_status(path: str) -> int:
        environ: dict[str, Any] = {"PATH_INFO": path}
        setup_testing_defaults(environ)
        started: list[str] = []
        b"".join(wsgi(environ, lambda status, headers: started.append(status)))
        return int(started[0].split()[0])

    lifecycles["flux dev"].prepare(lambda module: None)
    with serve(lifecycles, port=0) as server:
        for name, quoted, status in [("flux dev", "flux%20dev", 200), ("what?", "what%3F", 503),
                                     ("café", "caf%C3%A9", 503)]:
            for path in (f"/v2/models/{quoted}/ready", f"/v2/models/{quoted}/versions/1/ready?x=1"):
                assert get(server.url + path) == (status, {"name": name, "ready": status == 200,
                                                           "state": lifecycles[name].state.value})
            assert wsgi_status(f"/v2/models/{name}/ready") == status
        assert get(server.url + "/v2/models/flux%2520dev/ready")[0] == 404  # decoded once, not twice


def _new_threads(before: set[threading.Thread], timeout: float = 5.0) -> list[threading.Thread]:
    """Threads started since ``before`` (waiting a little for the first one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The server's own handler threads only: another test's thread may start or linger meanwhile.
        found = [
            t for t in threading.enumerate()
            if t not in before and t.name.endswith(":connection") and t.is_alive()
        ]
        if found:
            return found
        time.sleep(0.01)
    return []


def test_stop_cuts_a_connection_that_never_sends_and_ends_its_thread():
    server = serve(port=0)
    before = set(threading.enumerate())
    client = socket.create_connection((server.host, server.port), timeout=10)
    try:
        handlers = _new_threads(before)
        assert handlers and all(t.is_alive() for t in handlers)
        started = time.monotonic()
        server.stop(timeout=3.0)
        assert time.monotonic() - started < 3.5
        for thread in handlers:
            thread.join(1.0)
            assert not thread.is_alive(), thread
        assert client.recv(1) == b""  # the server closed its end
        assert not server.running
    finally:
        client.close()


def test_a_silent_connection_is_dropped_after_the_idle_timeout():
    with serve(port=0, idle_timeout=0.3) as server:
        client = socket.create_connection((server.host, server.port), timeout=10)
        try:
            started = time.monotonic()
            assert client.recv(1) == b""  # closed by the server, without stop()
            assert 0.2 < time.monotonic() - started < 5
        finally:
            client.close()
        assert get(server.url + "/health/live") == (200, {"live": True})  # still serving


# ---------------------------------------------------------------------------- what ships
def test_the_families_fixture_lives_beside_the_tests_not_in_the_package():
    import importlib.util

    import lifecycle.testing

    shipped = Path(lifecycle.testing.__file__).parent
    assert not (shipped / "families.py").exists()
    assert importlib.util.find_spec("lifecycle.testing.families") is None
    assert (ROOT / "tests" / "families.py").is_file()
    # The script that renders the docs' table still finds it (its import runs before --help).
    script = run(str(ROOT / "scripts" / "families_table.py"), "--help")
    assert script.returncode == 0 and "--from-json" in script.stdout, script.stderr[-2000:]
