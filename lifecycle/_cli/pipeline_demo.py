"""The demo behind ``python -m lifecycle demo --pipeline flux|wan22``: a tiny real diffusers
pipeline (random weights, built in code) managed by ``PipelineLifecycle.from_diffusers``,
prepared with one short pipeline call, then serving identical requests through
``plc.request``. Returns a JSON-serialisable dict; ``format_pipeline_demo`` renders it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lifecycle._cli.format import ms, table
from lifecycle._errors import InvalidConfigError
from lifecycle._pipeline import PipelineLifecycle
from states import LifecyclePolicy

PIPELINE_KINDS = ("flux", "wan22")
# The warm-up call is deliberately shorter than a request: the lifecycle steers cache-dit so
# that even this reaches the cached-step branch, and requests compile nothing.
WARMUP_STEPS = 2

# DBCache settings under which each tiny pipeline caches some of an 8-step request
# (measured on the CPU: Flux 2 of 8 steps; Wan 2.2 1 of the high-noise transformer's 3 and
# 3 of transformer_2's 5, cond and uncond alike).
_CACHE_SETTINGS = {
    "flux": {"residual_diff_threshold": 0.4, "max_warmup_steps": 4},
    "wan22": {"residual_diff_threshold": 0.3, "max_warmup_steps": 2},
}


def pipeline_cache_config(kind: str, num_inference_steps: int | None = None) -> Any:
    """The demo's ``cache_dit.DBCacheConfig`` for ``kind`` (F1B0)."""
    from adapters import CacheDitAdapter

    _check_kind(kind)
    return CacheDitAdapter().make_config(
        Fn_compute_blocks=1,
        Bn_compute_blocks=0,
        num_inference_steps=num_inference_steps,
        **_CACHE_SETTINGS[kind],
    )


def build_pipeline(kind: str, device: str = "cpu") -> tuple[Any, Callable[..., dict[str, Any]]]:
    """The tiny pipeline of ``kind`` on ``device`` and ``call(steps=...)`` giving one call's kwargs."""
    from lifecycle.testing import tiny_pipelines as tp

    _check_kind(kind)
    if kind == "flux":
        pipe = tp.tiny_flux_pipeline()

        def call(steps: int, **kwargs: Any) -> dict[str, Any]:
            return tp.flux_call(steps=steps, device=device, **kwargs)
    else:
        pipe = tp.tiny_wan22_pipeline()

        def call(steps: int, **kwargs: Any) -> dict[str, Any]:
            return tp.wan_call(steps=steps, device=device, **kwargs)

    return pipe.to(device), call


def run_pipeline_demo(
    kind: str,
    *,
    backend: str = "auto",
    steps: int = 8,
    requests: int = 3,
    compile_backend: str = "aot_eager",
    policy: LifecyclePolicy | None = None,
) -> dict[str, Any]:
    """Build, prepare (one ``WARMUP_STEPS``-step pipeline call) and serve ``requests`` identical
    requests of ``steps`` steps; return the per-request table and whether outputs matched."""
    import torch

    from lifecycle.testing.tiny_pipelines import pipeline_output

    _check_kind(kind)
    for label, value in (("steps", steps), ("requests", requests)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidConfigError(f"{label} must be a positive int, got {value!r}")
    policy = LifecyclePolicy() if policy is None else policy
    device = _device_of(backend)
    pipe, call = build_pipeline(kind, device)
    plc = PipelineLifecycle.from_diffusers(
        pipe,
        policy=policy,
        backend=backend,
        cache_config=pipeline_cache_config(kind, steps) if policy.cache_dit else None,
        compile_options={"backend": compile_backend} if policy.compile else None,
    )
    graphs_before = _graph_count(plc)
    started = time.perf_counter()
    plc.prepare(lambda p: p(**call(WARMUP_STEPS)), num_inference_steps=steps)
    prepare_s = time.perf_counter() - started
    graphs_in_warmup = _graph_count(plc) - graphs_before

    rows: list[dict[str, Any]] = []
    first: torch.Tensor | None = None
    for index in range(requests):
        request_id = f"{kind}-{index + 1}"
        started = time.perf_counter()
        with plc.request(num_inference_steps=steps, request_id=request_id) as records:
            output = pipeline_output(pipe(**call(steps))).detach().float().cpu()
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        first = output if first is None else first
        rows.append(
            {
                "request_id": request_id,
                "steps": steps,
                "cached_steps": {name: r.cached_steps for name, r in records.items()},
                "cfg_cached_steps": {name: r.cfg_cached_steps for name, r in records.items()},
                # Dynamo's graph count is process-wide: every member sees the same new graphs.
                "new_graphs": max(r.new_graphs for r in records.values()),
                "time_ms": round(elapsed_ms, 2),
                "max_abs_diff_to_first": float((output - first).abs().max()),
            }
        )
    stats = plc.stats()
    return {
        "pipeline": type(pipe).__name__,
        "kind": kind,
        "members": list(plc.members),
        "backend": next(iter(plc.members.values())).backend.name,
        "device": device,
        "policy": policy.as_dict(),
        "compile_backend": compile_backend if policy.compile else None,
        "warmup_steps": WARMUP_STEPS,
        "prepare_s": round(prepare_s, 3),
        "graphs_compiled_in_warmup": graphs_in_warmup,
        "requests": rows,
        "recompiles_since_warmup": {n: s["recompiles_since_warmup"] for n, s in stats.items()},
        "identical_outputs": all(row["max_abs_diff_to_first"] == 0.0 for row in rows),
    }


def format_pipeline_demo(result: dict[str, Any]) -> str:
    """The demo's result as a plain-text table."""
    members = result["members"]
    header = ["request", "steps", *(f"cached[{m}]" for m in members), "new graphs", "time", "max |diff|"]
    rows = [
        [
            row["request_id"],
            row["steps"],
            *(row["cached_steps"][m] for m in members),
            row["new_graphs"],
            ms(row["time_ms"]),
            f"{row['max_abs_diff_to_first']:.3g}",
        ]
        for row in result["requests"]
    ]
    verdict = "identical" if result["identical_outputs"] else "DIFFERENT"
    return "\n".join([
        f"{result['pipeline']} ({', '.join(members)}) on {result['device']}: prepared in "
        f"{result['prepare_s']:.2f} s with a {result['warmup_steps']}-step call "
        f"({result['graphs_compiled_in_warmup']} graphs compiled)",
        table(header, rows),
        f"identical requests gave {verdict} outputs",
    ])


def _check_kind(kind: str) -> None:
    if kind not in PIPELINE_KINDS:
        raise InvalidConfigError(f"pipeline must be one of {', '.join(PIPELINE_KINDS)}, got {kind!r}")


def _device_of(backend: str) -> str:
    from lifecycle._cli.demo import resolve_backend

    return str(resolve_backend(backend).device_type)


def _graph_count(plc: PipelineLifecycle) -> int:
    return int(next(iter(plc.members.values())).backend.graph_count())
