"""One replica for tests/test_store_fleet.py: waits for the start signal, then obtains a package
from the store (building it under the lease when it is not there) and writes what happened as JSON.

The "build" is a real computation written as a package file (a SHA-256 chain over the key); the
replica's "output" is computed from the package it ends up with, so byte-identical outputs mean
every replica ran on the same package.

It loads ``adapters.store`` without ``adapters/__init__`` (which imports torch): the store needs
no torch, and four replicas importing torch on a shared two-core machine would take most of the
test's time. The replica checks that torch stayed out.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_package = types.ModuleType("adapters")
_package.__path__ = [str(ROOT / "adapters")]
sys.modules.setdefault("adapters", _package)

from adapters.store import NewPackage, StoreEvent, obtain, open_store  # noqa: E402


def compute(key: str, rounds: int = 20000) -> bytes:
    """The package's content: deterministic, and work enough to be a build."""
    digest, out = key.encode(), []
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
        out.append(digest)
    return b"".join(out)


def main() -> int:
    args = json.loads(sys.argv[1])
    store = open_store(
        args["url"], storage_options=args.get("options"), cache_dir=args["cache_dir"],
        signing_key=bytes.fromhex(args["signing_key"]) if args.get("signing_key") else None,
    )
    store.objects.exists("warm-up")  # the client is set up before the start signal, not after
    (Path(args["ready"]) / str(os.getpid())).touch()
    go = Path(args["go"])
    while not go.exists():
        time.sleep(0.005)
    markers, waiting = Path(args["markers"]), Path(args["waiting"])
    key = args["key"]

    def build() -> list[NewPackage]:
        first = not any(markers.iterdir())
        (markers / f"building-{os.getpid()}").touch()
        if first:
            time.sleep(args.get("first_build_s", 0.0))  # long enough to be killed mid-build
        workdir = Path(tempfile.mkdtemp(prefix="replica-"))
        package = workdir / "package.bin"
        package.write_bytes(compute(key))
        return [NewPackage(key, {"package": package}, {"built_by": os.getpid()})]

    events: list[dict[str, object]] = []

    def on_event(event: StoreEvent) -> None:
        events.append(event.as_dict())
        if event.status == "waiting":
            (waiting / str(os.getpid())).touch()

    result = obtain(
        store, [key], build, lease_key=key, wait_s=args.get("wait_s", 60.0), poll_s=0.1,
        lease_ttl_s=args.get("ttl_s", 30.0), clock_skew_s=0.0, on_event=on_event,
    )
    output = None
    if key in result.packages:
        data = result.packages[key].files["package"].read_bytes()
        output = hashlib.sha256(data + b"|replica output").hexdigest()
    report = {
        "pid": os.getpid(), "status": result.status, "detail": result.detail, "events": events,
        "output": output, "torch_imported": "torch" in sys.modules,
        "published": result.published,
    }
    Path(args["out"]).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
