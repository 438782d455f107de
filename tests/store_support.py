"""Helpers for the store tests: an S3-compatible server (moto's ThreadedMotoServer on 127.0.0.1,
a random port) and replicas started as separate processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("store_worker.py")
ACCESS = {"key": "testing-key", "secret": "testing-secret"}
BUCKET = "fleet-artifacts"


@dataclass
class S3Server:
    endpoint: str
    server: Any

    def options(self) -> dict[str, Any]:
        # A short connect timeout and one attempt: a stopped server is answered in about a second.
        # A long read timeout: on two loaded cores the in-process server can take seconds to answer.
        return {**ACCESS, "endpoint_url": self.endpoint,
                "config_kwargs": {"connect_timeout": 1, "read_timeout": 60,
                                  "retries": {"max_attempts": 1}}}

    def url(self) -> str:
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS["key"], aws_secret_access_key=ACCESS["secret"])


def start_s3() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(f"http://{host}:{port}", server)
    s3.client().create_bucket(Bucket=BUCKET)
    try:
        yield s3
    finally:
        server.stop()


@dataclass
class Replicas:
    """N replica processes started together (they wait for the ``go`` file)."""

    workdir: Path
    procs: list[subprocess.Popen[bytes]]
    outs: list[Path]
    go: Path
    markers: Path  # one file per build started: building-<pid>
    waiting: Path  # one file per replica that saw the lease held: <pid>

    def start(self, timeout: float = 60.0) -> None:
        """Start them together, once every one has imported and opened its store."""
        deadline = time.monotonic() + timeout
        while len(list((self.workdir / "ready").iterdir())) < len(self.procs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a replica did not get ready")
            time.sleep(0.02)
        self.go.touch()

    def results(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        reports = []
        for proc, out in zip(self.procs, self.outs, strict=True):
            try:
                proc.wait(timeout=timeout)
            finally:
                if proc.poll() is None:
                    proc.kill()
            if out.exists():
                reports.append(json.loads(out.read_text()))
            else:
                stderr = proc.stderr.read().decode() if proc.stderr else ""
                reports.append({"pid": proc.pid, "status": f"exit {proc.returncode}",
                                "stderr": stderr[-2000:]})
        return reports

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def spawn_replicas(workdir: Path, count: int, **args: Any) -> Replicas:
    workdir.mkdir(parents=True, exist_ok=True)
    go, markers, waiting = workdir / "go", workdir / "markers", workdir / "waiting"
    markers.mkdir(exist_ok=True)
    waiting.mkdir(exist_ok=True)
    (workdir / "ready").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs, outs = [], []
    for index in range(count):
        out = workdir / f"replica-{index}.json"
        spec = {"go": str(go), "markers": str(markers), "waiting": str(waiting),
                "ready": str(workdir / "ready"), "out": str(out),
                "cache_dir": str(workdir / f"cache-{index}"), **args}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        outs.append(out)
    return Replicas(workdir, procs, outs, go, markers, waiting)
