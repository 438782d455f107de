"""One replica for tests/test_fleet.py: a real lifecycle (tiny Flux, ahead-of-time blocks, cache-dit)
whose ``artifact_dir`` is a shared store. It imports torch and builds its module, waits for the
start signal, prepares (loading the packages, or building them once under the lease, or waiting
for another replica's build), serves one request, and writes what happened as JSON: the compile
transition's fields, the ``lifecycle.artifacts`` events, dynamo's graph count and a digest of the
request's output bytes.

Its argument is a JSON object: ``url``, ``options`` (fsspec), ``signing_key`` (hex), ``cache_dir``,
``ready`` (a folder: one file per replica ready), ``go`` (start when this file exists), ``out``,
``lease_ttl_s`` (short leases, so a killed builder is taken over quickly) and ``waiting`` (a folder:
a file per replica appears there when its first ``waiting`` event is audited, as it happens).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def main() -> int:
    args = json.loads(sys.argv[1])
    import torch

    from adapters import dynamo_graph_count
    from adapters.aot import fleet
    from lifecycle import CompilePlan, ModuleLifecycle
    from lifecycle.audit import add_listener
    from lifecycle.testing import capture_audit
    from lifecycle.testing.tiny import FluxShape, demo_cache_config, denoise, flux_inputs, tiny_flux

    if args.get("lease_ttl_s"):
        fleet.LEASE_TTL_S, fleet.CLOCK_SKEW_S, fleet.POLL_S = float(args["lease_ttl_s"]), 0.5, 0.2

    def run(module: torch.nn.Module, shape: dict[str, int]) -> None:
        with torch.no_grad():
            denoise(module, flux_inputs(FluxShape(image_tokens=shape["tokens"])), 2)

    def on_audit(event: str, fields: Mapping[str, Any]) -> None:
        if args.get("waiting") and event == "lifecycle.artifacts" and fields.get("status") == "waiting":
            (Path(args["waiting"]) / str(os.getpid())).touch()

    add_listener(on_audit)
    module = tiny_flux()
    (Path(args["ready"]) / str(os.getpid())).touch()
    go = Path(args["go"])
    while not go.exists():
        time.sleep(0.01)
    started = time.monotonic()
    with capture_audit() as events:
        lc = ModuleLifecycle(
            module, backend="cpu", cache_config=demo_cache_config(8),
            compile_plan=CompilePlan(scope="blocks", ahead_of_time=True),
            artifact_dir=args["url"], artifact_storage_options=args.get("options"),
            artifact_signing_key=bytes.fromhex(args["signing_key"]) if args.get("signing_key") else None,
            cache_dir=args["cache_dir"], build_wait_s=float(args.get("build_wait_s", 600.0)),
        )
        lc.prepare(run, shapes=[{"tokens": 16}, {"tokens": 32}])
        ready_s = time.monotonic() - started
        with torch.no_grad(), lc.request(num_inference_steps=8):
            out = denoise(lc.module, flux_inputs(FluxShape(image_tokens=24)), 8)
    compile_event = next(dict(e) for e in events.of("lifecycle.transition") if e["trigger"] == "compile")
    report = {
        "pid": os.getpid(),
        "ready": lc.ready,
        "ready_s": round(ready_s, 3),
        "compile": {k: v for k, v in compile_event.items() if k.startswith(("aot", "ahead_of_time"))},
        "artifacts": [{k: e.get(k) for k in ("action", "status", "detail")}
                      for e in events.of("lifecycle.artifacts") if e.get("action") == "aot"],
        "graphs": dynamo_graph_count(),
        "out": hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest(),
    }
    Path(args["out"]).write_text(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
