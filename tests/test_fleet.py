"""One build per fleet, through the lifecycle: real replicas (separate processes, each importing
torch, a tiny Flux with ahead-of-time blocks and cache-dit) on a real shared folder and a real
S3-compatible server (moto's ThreadedMotoServer on 127.0.0.1).

- 4 replicas started together on one key build exactly once; the other three wait, then load;
  every output is bit-identical and the loading replicas trace no dynamo graph;
- a builder killed mid-build (SIGKILL) is taken over once its lease ends (short leases here);
- a tampered package (a byte flipped, a manifest re-signed with another key) is never loaded;
- ``python -m lifecycle build`` into a folder, then a replica loading it from an immutable
  (read-only) copy: nothing written, 0 dynamo graphs, ``loaded``;
- a store that does not answer during a start: a local build, audited ``unreachable``;
- bad store arguments refused at construction; JIT compile artifacts in the same stores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from store_support import ROOT, S3Server, start_s3

from lifecycle import InvalidConfigError, ModuleLifecycle

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
WORKER = Path(__file__).with_name("fleet_worker.py")
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    yield from start_s3()



def _spawn(workdir: Path, index: int, go: Path, **args: Any) -> tuple[subprocess.Popen[bytes], Path]:
    (workdir / "ready").mkdir(parents=True, exist_ok=True)
    out = workdir / f"replica-{index}.json"
    spec = {"go": str(go), "ready": str(workdir / "ready"), "out": str(out),
            "cache_dir": str(workdir / f"cache-{index}"), **args}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CACHE_DIT_LOG_LEVEL": "error"}
    proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, out


def _wait_ready(
    workdir: Path, count: int, procs: list[subprocess.Popen[bytes]], timeout: float = 180
) -> None:
    deadline = time.monotonic() + timeout
    while len(list((workdir / "ready").iterdir())) < count:
        dead = [p for p in procs if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, _stderr(dead[0]) if dead else "not ready"
        time.sleep(0.05)


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    return (proc.stderr.read().decode() if proc.stderr else "")[-3000:]


def _result(proc: subprocess.Popen[bytes], out: Path, timeout: float = 480) -> dict[str, Any]:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.exists(), _stderr(proc)
    return dict(json.loads(out.read_text()))


def _store_args(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "shared-folder":
        return {"url": str(tmp_path / "shared-volume")}
    server: S3Server = request.getfixturevalue("s3")
    return {"url": server.url(), "options": server.options()}


# --------------------------------------------------------------------------- build once
# The S3 case runs in the README's test command (the fleet's promise, end to end with the tiny
# model); the shared folder's, with the slow cases.
@pytest.mark.parametrize("kind", [pytest.param("shared-folder", marks=pytest.mark.slow), "s3"])
def test_four_replicas_started_together_build_once_and_agree_bit_for_bit(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    args = {**_store_args(kind, tmp_path, request), "signing_key": KEY.hex()}
    go = tmp_path / "go"
    spawned = [_spawn(tmp_path, index, go, **args) for index in range(4)]
    procs = [proc for proc, _ in spawned]
    try:
        _wait_ready(tmp_path, 4, procs)
        go.touch()
        results = [_result(proc, out) for proc, out in spawned]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    builders = [r for r in results if r["compile"]["aot_store"] == "built"]
    loaders = [r for r in results if r["compile"]["ahead_of_time"] == "loaded"]
    assert len(builders) == 1 and len(loaders) == 3, [r["compile"] for r in results]
    assert builders[0]["compile"]["ahead_of_time"] == "compiled"
    assert set(builders[0]["compile"]["aot_published"].values()) == {"published"}
    assert [e["status"] for e in builders[0]["artifacts"]] == ["compiled"]
    for loader in loaders:
        assert loader["compile"]["aot_store"] == "loaded"
        assert "waiting" in loader["compile"]["aot_store_events"]
        assert loader["compile"]["aot_waited_s"] > 0
        # It waited (once per lease it saw the builder hold: a renewal under load can be seen as
        # another), then loaded; nothing else happened in between.
        statuses = [e["status"] for e in loader["artifacts"]]
        assert statuses[-1] == "loaded" and statuses[:-1] and set(statuses[:-1]) == {"waiting"}, statuses
        assert loader["graphs"] == 0  # no dynamo: the packages run
    assert len({r["out"] for r in results}) == 1  # bit-identical outputs
    assert all(r["ready"] for r in results)


@pytest.mark.slow
def test_a_builder_killed_mid_build_is_taken_over_after_its_lease_ends(
    tmp_path: Path, s3: S3Server
) -> None:
    url = s3.url()
    waiting = tmp_path / "waiting"
    waiting.mkdir()
    args = {"url": url, "options": s3.options(), "lease_ttl_s": 3, "waiting": str(waiting)}
    first_go, second_go = tmp_path / "go-1", tmp_path / "go-2"
    builder, _ = _spawn(tmp_path, 0, first_go, **args)
    waiter, waiter_out = _spawn(tmp_path, 1, second_go, **args)
    try:
        _wait_ready(tmp_path, 2, [builder, waiter])
        first_go.touch()
        client, (bucket, _, prefix) = s3.client(), url.removeprefix("s3://").partition("/")
        deadline = time.monotonic() + 240
        while not client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/aot/leases/").get("KeyCount"):
            assert time.monotonic() < deadline and builder.poll() is None, _stderr(builder)
            time.sleep(0.1)
        second_go.touch()  # the waiter finds the lease held (it audits `waiting` as it happens)...
        while not any(waiting.iterdir()):
            assert time.monotonic() < deadline and waiter.poll() is None, _stderr(waiter)
            time.sleep(0.05)
        assert builder.poll() is None, _stderr(builder)
        builder.send_signal(signal.SIGKILL)  # ...and its holder dies mid-build
        builder.wait()
        result = _result(waiter, waiter_out)
    finally:
        for proc in (builder, waiter):
            if proc.poll() is None:
                proc.kill()
    compile_event = result["compile"]
    assert compile_event["aot_store"] == "built", compile_event
    assert compile_event["aot_store_events"][:1] == ["waiting"]
    assert "took_over" in compile_event["aot_store_events"]
    assert result["ready"]


# ---------------------------------------------------------------------- offline build, read-only
@pytest.fixture(scope="module")
def cli_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """``python -m lifecycle build`` of the tiny Flux's packages into a folder, signed."""
    work = tmp_path_factory.mktemp("cli-build")
    key_file = work / "key"
    key_file.write_bytes(KEY.hex().encode() + b"\n")
    store = work / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CACHE_DIT_LOG_LEVEL": "error"}
    done = subprocess.run(
        [sys.executable, "-m", "lifecycle", "build", "--model", "tiny-flux",
         "--shapes", "tokens=16,tokens=32",
         "--compile-plan", "blocks,aot", "--artifact-dir", str(store), "--signing-key-file", str(key_file),
         "--json"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return store, json.loads(done.stdout.strip().splitlines()[-1])


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_the_offline_build_then_a_replica_loads_it_from_a_read_only_volume(
    cli_store: tuple[Path, dict[str, Any]], tmp_path: Path, immutable: Any
) -> None:
    store, built = cli_store
    assert built["ok"] and built["status"] == "built" and built["signed"]
    assert [e["status"] for e in built["artifacts"] if e["action"] == "aot"] == ["compiled"]
    volume = shutil.copytree(store, tmp_path / "volume")
    before = _snapshot(volume)
    immutable(volume)
    go = tmp_path / "go"
    go.touch()
    # The key as the operator's file holds it: the CLI removed the trailing newline, so do we.
    proc, out = _spawn(tmp_path, 0, go, url=str(volume), signing_key=KEY.hex().encode().hex())
    result = _result(proc, out)
    assert result["compile"]["ahead_of_time"] == "loaded", result["compile"]
    assert result["graphs"] == 0 and result["ready"]
    assert [e["status"] for e in result["artifacts"]] == ["loaded"]
    assert _snapshot(volume) == before  # nothing written into the store


@pytest.mark.slow
def test_a_tampered_or_resigned_package_is_never_loaded(
    cli_store: tuple[Path, dict[str, Any]], tmp_path: Path, audit_events: Any
) -> None:
    from adapters.store import Manifest, open_store
    from adapters.store.signing import sign

    key = KEY.hex().encode()  # the CLI's key file, as bytes
    copy = shutil.copytree(cli_store[0], tmp_path / "store")
    manifests = sorted((copy / "aot" / "manifests").glob("*.json"))
    assert len(manifests) == 2
    # One package's bytes: a byte flipped in its blob.
    flipped = Manifest.from_bytes(manifests[0].read_bytes())
    blob = copy / "aot" / "blobs" / flipped.files["package"].sha256
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    # The other package's manifest: signed again, with another key.
    resigned = Manifest.from_bytes(manifests[1].read_bytes())
    forged = Manifest(resigned.key, resigned.files, resigned.meta, resigned.published_by,
                      sign(OTHER_KEY, resigned.document()))
    manifests[1].write_bytes(forged.to_bytes())
    checked = open_store(copy, signing_key=key, cache_dir=tmp_path / "cache").child("aot")
    assert {checked.fetch(m.stem).status for m in manifests} == {"untrusted"}

    from aot_builds import FLUX_BUCKETS, flux_lifecycle, flux_run

    lc = flux_lifecycle(copy, artifact_signing_key=key, cache_dir=tmp_path / "cache")
    lc.prepare(flux_run, shapes=FLUX_BUCKETS)
    compile_event = next(e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "compile")
    assert compile_event["ahead_of_time"] == "compiled" and compile_event["aot_store"] == "built"
    assert compile_event["aot_store_events"].count("untrusted") == 2
    untrusted = [e for e in audit_events.of("lifecycle.artifacts") if e.get("status") == "untrusted"]
    assert len(untrusted) == 2 and all(e["problem"] for e in untrusted)
    # Rebuilt over them: the store now serves verified packages again.
    assert {checked.fetch(m.stem).status for m in manifests} == {"found"}
    lc.reset()


@pytest.mark.slow
def test_a_store_that_does_not_answer_falls_back_to_a_local_build_audited(
    tmp_path: Path, audit_events: Any
) -> None:
    from aot_builds import FLUX_BUCKETS, flux_lifecycle, flux_run

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = {"key": "k", "secret": "s", "endpoint_url": f"http://127.0.0.1:{port}",
               "config_kwargs": {"connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 1}}}
    lc = flux_lifecycle("s3://fleet-artifacts/gone", artifact_storage_options=options,
                        cache_dir=tmp_path / "cache")
    lc.prepare(flux_run, shapes=FLUX_BUCKETS)
    assert lc.ready
    compile_event = next(e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "compile")
    assert compile_event["ahead_of_time"] == "compiled" and compile_event["aot_store"] == "unreachable"
    (event,) = [e for e in audit_events.of("lifecycle.artifacts") if e.get("action") == "aot"]
    assert event["status"] == "unreachable" and event["problem"]
    assert "built on this replica" in event["detail"]
    lc.reset()


# ------------------------------------------------------------------------ construction refusals
@pytest.mark.parametrize("kwargs, match", [
    ({"artifact_dir": "foo://bucket/x"}, "not an fsspec protocol"),
    ({"artifact_dir": "s3://Bad_Bucket/x", "artifact_storage_options": {"key": "a", "secret": "b"}},
     "no bucket name"),
    ({"artifact_dir": "s3://bucket/x?region=eu"}, "artifact_storage_options"),
    ({"artifact_dir": "/tmp/x", "artifact_signing_key": b"short"}, "artifact_signing_key"),
    ({"artifact_dir": "/tmp/x", "artifact_signing_key": "a str key of enough length"}, "must be bytes"),
    ({"artifact_dir": "/tmp/x", "artifact_storage_options": {"key": "a"}}, "fsspec URLs only"),
    ({"cache_dir": "/tmp/c"}, "without artifact_dir"),
    ({"artifact_signing_key": KEY}, "without artifact_dir"),
    ({"artifact_dir": "/tmp/x", "build_wait_s": -1}, "build_wait_s"),
    ({"artifact_dir": "/tmp/x", "build_wait_s": float("nan")}, "build_wait_s"),
])
def test_bad_store_arguments_are_refused_at_construction(kwargs: dict[str, Any], match: str) -> None:
    from lifecycle.testing.tiny import tiny_flux

    with pytest.raises(InvalidConfigError, match=match):
        ModuleLifecycle(tiny_flux(), backend="cpu", **kwargs)


def test_s3_without_credentials_or_its_package_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from lifecycle.testing.tiny import tiny_flux

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(InvalidConfigError, match="no credentials"):
        ModuleLifecycle(tiny_flux(), backend="cpu", artifact_dir="s3://bucket/prefix")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(InvalidConfigError, match="gcsfs"):
            ModuleLifecycle(tiny_flux(), backend="cpu", artifact_dir="gs://bucket/prefix")


def test_the_callers_storage_options_are_never_changed(s3: S3Server) -> None:
    from lifecycle.testing.tiny import demo_cache_config, tiny_flux

    options = s3.options()
    before = json.dumps(options, sort_keys=True)
    lc = ModuleLifecycle(tiny_flux(), backend="cpu", cache_config=demo_cache_config(8),
                         artifact_dir=s3.url(), artifact_storage_options=options)
    assert json.dumps(options, sort_keys=True) == before
    assert lc._config.store is not None and lc._config.store.location.storage_options is not options


# ------------------------------------------------------------------------ JIT compile artifacts
@pytest.mark.parametrize("kind", ["shared-folder", "s3"])
def test_jit_compile_artifacts_round_trip_through_the_store_signed(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from adapters.artifact_session import ArtifactSession
    from adapters.artifact_store import StoredArtifacts
    from adapters.artifacts import ArtifactKey
    from adapters.store import open_store

    args = _store_args(kind, tmp_path, request)
    store = open_store(args["url"], storage_options=args.get("options"), signing_key=KEY,
                       cache_dir=tmp_path / "cache")
    session = ArtifactSession(store)
    assert isinstance(session.store, StoredArtifacts)
    key = ArtifactKey("Stack", {"torch": "x", "layout": "abc"})
    assert session.store.read(key)[0].status == "missing"
    saved = session.store.write(key, b"graphs" * 100)
    assert saved.status == "saved" and saved.size_bytes == 600
    report, payload = session.store.read(key)
    assert (report.status, payload) == ("loaded", b"graphs" * 100)
    other = ArtifactKey("Stack", {"torch": "y", "layout": "abc"})
    stale = session.store.read(other)[0]
    assert stale.status == "stale" and stale.differing_fields == ("torch",)
    # Another key's store refuses the signed manifest: corrupt, never loaded.
    forged = ArtifactSession(open_store(args["url"], storage_options=args.get("options"),
                                        signing_key=OTHER_KEY, cache_dir=tmp_path / "cache-2"))
    refused, nothing = forged.store.read(key)
    assert refused.status == "corrupt" and "untrusted" in refused.detail and nothing is None


def test_jit_artifacts_report_an_unreachable_store(tmp_path: Path) -> None:
    from adapters.artifact_session import ArtifactSession
    from adapters.artifacts import ArtifactKey
    from adapters.store import open_store

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = {"key": "k", "secret": "s", "endpoint_url": f"http://127.0.0.1:{port}",
               "config_kwargs": {"connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 1}}}
    session = ArtifactSession(open_store("s3://fleet-artifacts/x", storage_options=options,
                                         cache_dir=tmp_path / "cache"))
    key = ArtifactKey("Stack", {"torch": "x"})
    report, payload = session.store.read(key)
    assert report.status == "unreachable" and report.problem and payload is None
    assert session.store.write(key, b"x").status == "unreachable"


# ------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("argv, message", [
    (["--shapes", "tokens=x"], "name=integer"),
    (["--shapes", "[]"], "at least one bucket"),
    (["--compile-plan", "model,aot"], "excludes"),
    (["--compile-options", "[1]"], "--compile-options"),
    (["--signing-key-env", "DIT_FLEET_TEST_UNSET_KEY"], "not set"),
])
def test_build_refuses_bad_arguments_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from lifecycle._cli.commands import run

    base = {"--model": "tiny-flux", "--shapes": "tokens=16", "--artifact-dir": str(tmp_path)}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    code = run(["build", *[part for pair in base.items() for part in pair]])
    assert code == 2 and message in capsys.readouterr().err


def test_build_with_a_bad_store_exits_1_with_a_typed_message(capsys: pytest.CaptureFixture[str]) -> None:
    from lifecycle._cli.commands import run

    code = run(["build", "--model", "tiny-flux", "--shapes", "tokens=16", "--artifact-dir", "foo://bucket/x"])
    assert code == 1
    assert "not an fsspec protocol" in capsys.readouterr().err


def test_shapes_parse_as_json_or_short_form() -> None:
    from lifecycle._cli.build import parse_shapes

    assert parse_shapes("tokens=64,tokens=16") == [{"tokens": 64}, {"tokens": 16}]
    assert parse_shapes("height=512/width=512") == [{"height": 512, "width": 512}]
    assert parse_shapes('[{"tokens": 8}]') == [{"tokens": 8}]
