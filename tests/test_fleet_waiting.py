"""A replica whose packages another replica is building: what it audits while it waits, and
``ServingPolicy(while_building="serve_jit")``: ready on just-in-time blocks, then switched to the
packages at a request boundary once they are published.

Real parts: a real shared folder (the other replica's build lease is a real OS file lock, taken
here), the tiny Flux with real cache-dit, real AOTInductor packages (the shared build of
tests/aot_builds.py, published into the store while the replica waits: no new build here) and
real torch.compile for the just-in-time blocks.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from aot_builds import FLUX_BUCKETS, SERVING_STEPS, copy_of, flux_lifecycle, flux_packages, flux_run

from adapters import dynamo_graph_count
from adapters.aot import fleet
from adapters.aot.runtime import aot_blocks
from adapters.store import Manifest, NewPackage, Obtained, obtain, open_store
from adapters.store.lease import Lease
from lifecycle import CompilePlan, InvalidConfigError, LifecyclePolicy, ModuleLifecycle, ServingPolicy
from lifecycle.testing.tiny import FluxShape, denoise, flux_inputs, tiny_flux

SERVE_JIT = ServingPolicy(while_building="serve_jit")


def _lease_of(source: Path, store_dir: Path) -> Lease:
    """The build lease a replica of the shared build's module takes, on ``store_dir``."""
    names = sorted(path.stem for path in (source / "aot" / "manifests").glob("*.json"))
    assert len(names) == 2
    key = fleet.lease_key({name: ("", name) for name in names})
    return open_store(store_dir).child("aot").lease(key)


def _building_elsewhere(tmp_path: Path) -> tuple[Path, Path, Lease]:
    """The shared build's packages (not yet published), an empty store, and its build lease held
    as another replica holds it while it builds."""
    source, _ = flux_packages()
    store_dir = tmp_path / "store"
    lease = _lease_of(source, store_dir)
    assert lease.try_acquire()
    return source, store_dir, lease


def _publish(source: Path, store_dir: Path) -> None:
    """What the other replica's build publishes: the blobs first, the manifests last."""
    target = store_dir / "aot"
    shutil.copytree(source / "aot" / "blobs", target / "blobs", dirs_exist_ok=True)
    shutil.copytree(source / "aot" / "manifests", target / "manifests", dirs_exist_ok=True)


def _tamper(store_dir: Path) -> None:
    """One published package's bytes: a byte flipped in its blob (its manifest unchanged)."""
    manifest = Manifest.from_bytes(sorted((store_dir / "aot" / "manifests").glob("*.json"))[0].read_bytes())
    blob = store_dir / "aot" / "blobs" / manifest.files["package"].sha256
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))


def _artifacts(events: Any) -> list[dict[str, Any]]:
    return [dict(e) for e in events.of("lifecycle.artifacts") if e.get("action") == "aot"]


def _serve(lc: ModuleLifecycle, tokens: int = 24) -> tuple[Any, torch.Tensor]:
    with torch.no_grad(), lc.request(num_inference_steps=SERVING_STEPS) as record:
        out = denoise(lc.module, flux_inputs(FluxShape(image_tokens=tokens)), SERVING_STEPS)
    return record, out


def _until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# --------------------------------------------------------------------------- the store, alone
def test_a_caller_that_will_not_wait_hears_waiting_and_gets_busy(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store", cache_dir=tmp_path / "cache")
    other = store.lease("lease-a")
    assert other.try_acquire()
    heard: list[str] = []
    built: list[int] = []

    def build() -> list[NewPackage]:
        built.append(1)
        return []

    try:
        done: Obtained = obtain(store, ["pkg"], build, lease_key="lease-a", wait=False,
                                on_event=lambda event: heard.append(event.status))
    finally:
        other.release()
    assert done.status == "busy" and not done.problem
    assert heard == ["waiting"] and [e.status for e in done.events] == ["waiting"]
    assert not built  # never built while another replica holds the lease


def test_waiting_is_heard_while_obtain_still_waits(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store", cache_dir=tmp_path / "cache")
    other = store.lease("lease-b")
    assert other.try_acquire()
    heard: list[tuple[str, bool]] = []
    result: list[Obtained] = []
    waiter = threading.Thread(target=lambda: result.append(obtain(
        store, ["pkg"], list, lease_key="lease-b", wait_s=3.0, poll_s=0.05,
        on_event=lambda event: heard.append((event.status, bool(result))),
    )))
    try:
        waiter.start()
        _until(lambda: heard, 10, "no waiting event")
        assert heard[0] == ("waiting", False) and waiter.is_alive()
        waiter.join(10)
    finally:
        other.release()
    assert result and result[0].status == "timeout"


# ------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize("kwargs, match", [
    ({}, "artifact_dir"),
    ({"artifact_dir": "STORE", "compile_plan": CompilePlan(scope="blocks")}, "ahead_of_time=True"),
    ({"artifact_dir": "STORE", "compile_plan": CompilePlan(scope="blocks", ahead_of_time=True),
      "policy": LifecyclePolicy(compile=False)}, "compile on"),
])
def test_serve_jit_without_an_ahead_of_time_store_is_refused(
    kwargs: dict[str, Any], match: str, tmp_path: Path
) -> None:
    if kwargs.get("artifact_dir") == "STORE":
        kwargs = {**kwargs, "artifact_dir": str(tmp_path / "store")}
    with pytest.raises(InvalidConfigError, match=match) as refused:
        ModuleLifecycle(tiny_flux(), backend="cpu", serving=SERVE_JIT, **kwargs)
    assert "while_building" in str(refused.value)


def test_while_building_is_checked_and_recorded() -> None:
    with pytest.raises(InvalidConfigError, match="while_building"):
        ServingPolicy(while_building="later")  # type: ignore[arg-type]
    assert ServingPolicy().while_building == "wait"
    assert SERVE_JIT.as_dict()["while_building"] == "serve_jit"


# --------------------------------------------------------------------------- through the lifecycle
@pytest.mark.slow
def test_waiting_reaches_the_audit_while_the_replica_still_waits(tmp_path: Path, audit_events: Any) -> None:
    source, store_dir, lease = _building_elsewhere(tmp_path)
    lc = flux_lifecycle(store_dir, cache_dir=tmp_path / "cache", build_wait_s=300)
    failures: list[BaseException] = []

    def prepare() -> None:
        try:
            lc.prepare(flux_run, shapes=FLUX_BUCKETS)
        except BaseException as error:  # reported by the test below
            failures.append(error)

    replica = threading.Thread(target=prepare)
    try:
        replica.start()
        _until(lambda: not replica.is_alive() or any(
            e["status"] == "waiting" for e in _artifacts(audit_events)), 240, "no waiting event")
        # Audited while the compile still waits: not ready, the compile not yet recorded.
        assert replica.is_alive() and not failures and not lc.ready
        assert not [e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "compile"]
        (waiting,) = _artifacts(audit_events)
        assert waiting["status"] == "waiting" and not waiting["problem"] and waiting["module"] == lc.name
        _publish(source, store_dir)  # the other replica's build is done
        replica.join(300)
    finally:
        lease.release()
    assert not replica.is_alive() and not failures and lc.ready
    compile_event = next(e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "compile")
    assert compile_event["ahead_of_time"] == "loaded" and compile_event["aot_store"] == "loaded"
    assert [e["status"] for e in _artifacts(audit_events)] == ["waiting", "loaded"]  # each once
    lc.reset()


@pytest.mark.slow
def test_serve_jit_is_ready_at_once_and_switches_to_the_packages_between_requests(
    tmp_path: Path, audit_events: Any
) -> None:
    source, store_dir, lease = _building_elsewhere(tmp_path)
    try:
        lc = flux_lifecycle(store_dir, cache_dir=tmp_path / "cache", build_wait_s=300, serving=SERVE_JIT)
        lc.prepare(flux_run, shapes=FLUX_BUCKETS)
        assert lc.ready  # without waiting for the other replica's build
        compile_event = next(e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "compile")
        assert compile_event["ahead_of_time"] == "jit_while_building" and compile_event["aot_store"] == "busy"
        assert [e["status"] for e in _artifacts(audit_events)] == ["waiting", "serving_jit"]
        compiler = lc.stats()["compiler"]
        assert compiler["serving"] == "jit_blocks" and compiler["while_building"]["status"] == "watching"
        assert aot_blocks(lc.module) == []
        assert {row["ahead_of_time"] for row in lc.coverage()} == {"jit_while_building"}

        # The packages arrive while a request runs: it finishes on the just-in-time blocks.
        with torch.no_grad(), lc.request(num_inference_steps=SERVING_STEPS) as during:
            _publish(source, store_dir)
            _until(lambda: lc.stats()["compiler"].get("while_building", {}).get("status") == "ready",
                   240, "the watch never found the packages")
            jit_out = denoise(lc.module, flux_inputs(FluxShape(image_tokens=24)), SERVING_STEPS)
            assert aot_blocks(lc.module) == []
        assert during.outcome == "ok"
        assert "switched" not in [e["status"] for e in _artifacts(audit_events)]

        # The next request starts on the packages.
        graphs = dynamo_graph_count()
        record, out = _serve(lc)
    finally:
        lease.release()
    assert record.outcome == "ok" and record.new_graphs == 0 and dynamo_graph_count() == graphs
    assert len(aot_blocks(lc.module)) == 4
    switched = [e for e in _artifacts(audit_events) if e["status"] == "switched"]
    assert len(switched) == 1 and not switched[0]["problem"]
    compiler = lc.stats()["compiler"]
    assert compiler["serving"] == "aot_blocks" and compiler["ahead_of_time"] == "loaded"
    assert compiler["aot_switch"] == "ready" and compiler["binding"]["blocks"] == 4
    # Coverage and misses speak of the packages now: every declared bucket inside their bounds.
    assert {row["ahead_of_time"] for row in lc.coverage()} == {"loaded"}
    assert lc._compiler.misses(lc.module) == 0
    assert torch.allclose(out, jit_out, rtol=1e-3, atol=1e-3)

    # Bit for bit what a replica that loads the same packages serves.
    loaded = flux_lifecycle(copy_of(source, tmp_path / "loaded"), cache_dir=tmp_path / "cache-2")
    loaded.prepare(flux_run, shapes=FLUX_BUCKETS)
    assert loaded.stats()["compiler"]["ahead_of_time"] == "loaded"
    assert torch.equal(out, _serve(loaded)[1])
    loaded.reset()
    lc.reset()
    assert aot_blocks(lc.module) == []


@pytest.mark.slow
def test_serve_jit_stops_watching_on_reset_and_stays_jit_after_a_timeout(
    tmp_path: Path, audit_events: Any
) -> None:
    source, store_dir, lease = _building_elsewhere(tmp_path)
    try:
        first = flux_lifecycle(store_dir, cache_dir=tmp_path / "cache", build_wait_s=300, serving=SERVE_JIT)
        first.prepare(flux_run, shapes=FLUX_BUCKETS)
        watch = first._compiler.package_watch
        assert first.ready and watch is not None and not watch.done
        first.reset()  # stops the watch: it ends without a word
        assert watch.wait(10) and watch.outcome == "stopped"
        assert first.stats()["compiler"].get("while_building") is None

        # A replica whose wait ends before the build does, and meanwhile finds a tampered package
        # published: refused (never bound), audited, and just in time it stays.
        _publish(source, store_dir)
        _tamper(store_dir)
        lc = flux_lifecycle(store_dir, cache_dir=tmp_path / "cache", build_wait_s=1, serving=SERVE_JIT)
        lc.prepare(flux_run, shapes=FLUX_BUCKETS)
        _until(lambda: any(e["status"] == "timeout" for e in _artifacts(audit_events)), 60,
               "no timeout event")
        record, _ = _serve(lc)
    finally:
        lease.release()

    def statuses(owner: ModuleLifecycle) -> list[str]:
        return [e["status"] for e in _artifacts(audit_events) if e["module_id"] == owner.module_id]

    assert statuses(first) == ["waiting", "serving_jit"]
    seen = statuses(lc)
    assert seen[:2] == ["untrusted", "waiting"] and seen[-1] == "timeout", seen
    assert sorted(seen[2:-1]) == ["serving_jit", "untrusted"], seen  # the watch refused it too
    timeout = next(e for e in _artifacts(audit_events) if e["status"] == "timeout")
    assert timeout["problem"] and "serving just in time" in timeout["detail"]
    assert record.outcome == "ok" and aot_blocks(lc.module) == []
    compiler = lc.stats()["compiler"]
    assert compiler["serving"] == "jit_blocks" and compiler["aot_switch"] == "timeout"
    assert {row["ahead_of_time"] for row in lc.coverage()} == {"fallback"}
    lc.reset()
