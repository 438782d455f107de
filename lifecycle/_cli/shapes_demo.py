"""``demo --shapes``: declared serving buckets on a tiny real Flux transformer, a request at an
undeclared shape under each ``on_unwarmed`` policy, then the missed shape warmed, and the
per-bucket table (``lc.coverage()``).

Shapes are the host's own call arguments, here ``{"height": H, "width": W}`` in pixels; the
tiny model makes one image token per 8x8 pixels (64x64 -> 64 tokens).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from lifecycle._cli.format import ms, table
from lifecycle._errors import UnwarmedShapeError

BUCKETS = ({"height": 64, "width": 64}, {"height": 32, "width": 32})
UNDECLARED = {"height": 48, "width": 48}


def _key(shape: dict[str, int]) -> str:
    return f"{shape['height']}x{shape['width']}"


def run_shapes_demo(
    *, backend: str = "cpu", compile_backend: str | None = None, steps: int = 8, warmup_steps: int = 2
) -> dict[str, Any]:
    """Prepare the buckets, serve each, then the undeclared shape under eager, fail and compile;
    warm what was missed and serve it again. Returns the result the CLI prints."""
    import torch

    from lifecycle import ModuleLifecycle
    from lifecycle._cli.demo import default_compile_backend, resolve_backend
    from lifecycle.testing.tiny import FluxShape, demo_cache_config, denoise, flux_inputs, tiny_flux

    adapter = resolve_backend(backend)
    device = "cuda" if adapter.device_type == "cuda" else "cpu"
    base = FluxShape()
    module = tiny_flux(base).to(device)
    inputs: dict[str, Any] = {}

    def at(shape: dict[str, int]) -> Any:
        key = _key(shape)
        if key not in inputs:
            tokens = (shape["height"] // 8) * (shape["width"] // 8)
            inputs[key] = flux_inputs(replace(base, image_tokens=tokens), device=device)
        return inputs[key]

    def run(target: torch.nn.Module, shape: dict[str, int]) -> None:
        denoise(target, at(shape), warmup_steps)

    lc = ModuleLifecycle(
        module,
        backend=adapter,
        cache_config=demo_cache_config(steps),
        compile_options={"backend": compile_backend or default_compile_backend(adapter.device_type),
                         "dynamic": False},
    )
    started = time.perf_counter()
    lc.prepare(run, shapes=list(BUCKETS))
    prepare_ms = (time.perf_counter() - started) * 1000.0
    served: list[dict[str, Any]] = []

    def serve(shape: dict[str, int], policy: str | None, label: str) -> None:
        row: dict[str, Any] = {
            "label": label, "shape": _key(shape), "policy": policy or lc.serving.on_unwarmed,
        }
        try:
            with lc.request(num_inference_steps=steps, shape=shape, on_unwarmed=policy) as req:
                denoise(lc.module, at(shape), steps)
            row.update(outcome=req.outcome, new_graphs=req.new_graphs, duration_ms=req.duration_ms)
        except UnwarmedShapeError as exc:
            row.update(outcome="refused", new_graphs=0, duration_ms=0.0, error=type(exc).__name__)
        row["state"] = lc.state.value
        served.append(row)

    for shape in BUCKETS:
        serve(shape, None, "declared bucket")
    for policy in ("eager", "fail", "compile"):
        serve(UNDECLARED, policy, "undeclared")
    missed = lc.missed_shapes()
    lc.warm_up(run, shapes=missed)
    serve(UNDECLARED, "fail", "after warm_up(run, shapes=lc.missed_shapes())")
    stats = lc.stats()
    return {
        "prepare_ms": prepare_ms,
        "buckets": [_key(s) for s in BUCKETS],
        "undeclared": _key(UNDECLARED),
        "requests": served,
        "missed_shapes": missed,
        "coverage": lc.coverage(),
        "shape_misses": stats["shapes"]["shape_misses"],
        "ready": lc.ready,
        "ok": served[-1]["new_graphs"] == 0 and served[-1]["outcome"] == "ok"
        and all(r["new_graphs"] == 0 for r in served[:2]),
    }


def format_shapes_demo(result: dict[str, Any]) -> str:
    lines = [
        f"declared buckets: {', '.join(result['buckets'])}; prepared in {ms(result['prepare_ms'])}",
        "",
        table(
            ("request", "shape", "on_unwarmed", "outcome", "new graphs", "time"),
            [(r["label"], r["shape"], r["policy"], r["outcome"], r["new_graphs"], ms(r["duration_ms"]))
             for r in result["requests"]],
            right=(4, 5),
        ),
        "",
        f"missed shapes: {result['missed_shapes']}  (shape misses audited: {result['shape_misses']})",
        "",
        table(
            ("bucket", "warmed", "graphs", "warm-up", "covered", "path", "requests", "first/steady"),
            [(c["key"], c["warmed"], c["graphs"], ms(c["seconds"] * 1000.0), c["covered"], c["path"],
              c["requests"], f"{c['first_request_ratio']:.2f}x" if c["first_request_ratio"] else "-")
             for c in result["coverage"]],
            right=(2, 3, 6, 7),
        ),
        "",
        f"ready: {result['ready']}  ->  {'OK' if result['ok'] else 'NOT OK'}",
        "",
    ]
    return "\n".join(lines)
