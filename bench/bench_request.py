"""The cost of ``ModuleLifecycle.request()`` itself, on the CPU.

A real tiny ``FluxTransformer2DModel`` with cache-dit mounted, compiled (aot_eager) and warmed
up by ``prepare``; then, in one run and interleaved round by round so machine noise hits all
alike, the median of many:

  - ``request``: ``with lc.request(num_inference_steps=8): pass`` (enter + exit, no-op body),
    its audit event going to a JSONL file as a host would configure it;
  - ``refresh_context``: ``cache_dit.refresh_context(transformer, cache_config=<copy>)`` alone,
    the call every request needs anyway;
  - ``adapter_refresh``: our ``CacheDitAdapter.refresh`` (config copy + refresh_context).

Target: request <= 0.5 ms. Results go to bench/results/bench_request-<host>.json.

    python bench/bench_request.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402
import torch  # noqa: E402
from _machine import machine_info  # noqa: E402

from lifecycle import ModuleLifecycle  # noqa: E402
from lifecycle.audit import JsonlSink  # noqa: E402
from lifecycle.testing.tiny import demo_cache_config, denoiser, flux_inputs, tiny_flux  # noqa: E402

TARGET_MS = 0.5
STEPS = 8


def machine() -> dict[str, Any]:
    return machine_info()


def configure_host_logging(path: Path) -> JsonlSink:
    """What a host would do: INFO and above, contextvars merged, one JSON line per event."""
    sink = JsonlSink(path, drop=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            sink,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )
    return sink


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/, host named)")
    args = parser.parse_args()

    import cache_dit

    logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    tmp = Path(tempfile.mkdtemp())
    sink = configure_host_logging(tmp / "audit.jsonl")

    module = tiny_flux()
    inputs = flux_inputs()
    config = demo_cache_config(STEPS)
    lc = ModuleLifecycle(module, backend="cpu", cache_config=config, compile_options={"backend": "aot_eager"})
    lc.prepare(denoiser(inputs, 2))

    def request() -> None:
        with lc.request(num_inference_steps=STEPS):
            pass

    def refresh_context() -> None:
        cache_dit.refresh_context(module, cache_config=copy.deepcopy(lc.cache_config))

    def adapter_refresh() -> None:
        lc.cache.refresh(module, lc.cache_config, STEPS)

    cases: dict[str, Callable[[], None]] = {
        "request": request,
        "refresh_context": refresh_context,
        "adapter_refresh": adapter_refresh,
    }
    for fn in cases.values():  # warm every path
        for _ in range(50):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            started = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - started) * 1000.0)
    sink.close()

    def stats(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "median_ms": round(statistics.median(ordered), 4),
            "p10_ms": round(ordered[len(ordered) // 10], 4),
            "p90_ms": round(ordered[len(ordered) * 9 // 10], 4),
            "mean_ms": round(statistics.fmean(ordered), 4),
        }

    summary = {name: stats(values) for name, values in samples.items()}
    request_ms = summary["request"]["median_ms"]
    result = {
        "bench": "request() enter+exit with a no-op body, beside cache-dit's refresh_context alone",
        "machine": machine(),
        "model": "tiny FluxTransformer2DModel (2+2 blocks, head dim 16), cache-dit DBCache F1B0, aot_eager",
        "rounds": args.rounds,
        "audit": "one lifecycle.request event per request to a JSONL file (structlog, INFO filter)",
        "results": summary,
        "request_minus_refresh_context_ms": round(request_ms - summary["refresh_context"]["median_ms"], 4),
        "target_ms": TARGET_MS,
        "meets_target": request_ms <= TARGET_MS,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"bench_request-{platform.node()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, values in summary.items():
        print(
            f"{name:16s} median {values['median_ms']:.4f} ms  "
            f"p10 {values['p10_ms']:.4f}  p90 {values['p90_ms']:.4f}"
        )
    print(f"target request <= {TARGET_MS} ms: {'met' if result['meets_target'] else 'MISSED'}; wrote {out}")


if __name__ == "__main__":
    main()
