"""Build once per fleet, with real processes on a real shared folder and a real S3-compatible
server (moto's ThreadedMotoServer on 127.0.0.1): replicas started together on one key build
exactly once and all run on byte-identical packages; a builder killed mid-build (SIGKILL) is
taken over by a waiting replica once its lease ends."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from store_support import S3Server, spawn_replicas, start_s3

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    yield from start_s3()


@pytest.fixture(params=["shared-folder", "s3"])
def store_args(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "shared-folder":
        return {"url": str(tmp_path / "shared-volume")}
    server: S3Server = request.getfixturevalue("s3")
    return {"url": server.url(), "options": server.options()}


def test_four_replicas_build_once_and_load_identical_packages(
    store_args: dict[str, Any], tmp_path: Path
) -> None:
    replicas = spawn_replicas(tmp_path / "run", 4, key="flux.blocks-1a2b", first_build_s=1.0,
                              signing_key=(b"fleet-signing-key" * 2).hex(), **store_args)
    try:
        replicas.start()
        reports = replicas.results()
    finally:
        replicas.kill_all()
    statuses = Counter(report["status"] for report in reports)
    assert statuses == {"built": 1, "loaded": 3}, reports
    builder = next(r for r in reports if r["status"] == "built")
    assert builder["published"] is True
    assert len(list(replicas.markers.iterdir())) == 1  # one build in the whole fleet
    loaders = [r for r in reports if r["status"] == "loaded"]
    # They started together: each saw the lease held and waited, none built.
    assert all(any(e["status"] == "waiting" for e in r["events"]) for r in loaders), loaders
    assert len({r["output"] for r in reports}) == 1 and builder["output"] is not None
    assert not any(r["torch_imported"] for r in reports)


def test_builder_killed_mid_build_is_taken_over(store_args: dict[str, Any], tmp_path: Path) -> None:
    replicas = spawn_replicas(tmp_path / "run", 3, key="flux.blocks-dead", first_build_s=60.0,
                              ttl_s=1.0, **store_args)
    try:
        replicas.start()
        deadline = time.monotonic() + 30
        # Kill the builder once the two others are waiting on its lease.
        while not any(replicas.markers.iterdir()) or len(list(replicas.waiting.iterdir())) < 2:
            assert time.monotonic() < deadline, "no replica built while two waited"
            time.sleep(0.02)
        first = next(replicas.markers.iterdir())
        victim = int(first.name.rpartition("-")[2])
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        survivors = [p for p in replicas.procs if p.pid != victim]
        for proc in survivors:
            proc.wait(timeout=60)
        took = time.monotonic() - killed_at
        reports = [r for r in replicas.results() if r["pid"] != victim]
    finally:
        replicas.kill_all()
    statuses = Counter(report["status"] for report in reports)
    assert statuses == {"built": 1, "loaded": 1}, reports
    builder = next(r for r in reports if r["status"] == "built")
    assert any(e["status"] == "took_over" for e in builder["events"]), builder
    assert len(list(replicas.markers.iterdir())) == 2  # the killed build and the one that took over
    assert len({r["output"] for r in reports}) == 1
    assert took < 20  # the lease ended (file lock: at once; lease object: its 1 s expiry)
