"""The demo behind ``python -m lifecycle demo``: a tiny real ``FluxTransformer2DModel`` (random
weights, built in code) walked to WarmedUp by ``ModuleLifecycle.prepare``, then a few
identical requests through ``lc.request``, summarised as a table or a dict for ``--json``.

The demo does not configure logging; the CLI (a script) does, and its progress display
follows the audit events this run emits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lifecycle._cli.format import ms, table
from lifecycle._cli.progress import Progress
from lifecycle._config import CompilePlan
from lifecycle._errors import BackendUnavailableError, InvalidConfigError
from lifecycle._module import ModuleLifecycle
from states import LifecyclePolicy, State

# On the CPU the demo compiles with aot_eager: inductor generates and builds C++ kernels, which
# takes minutes on a small shared machine, and dynamo captures the same graphs under both. On a
# GPU (or with --compile-backend inductor) it uses inductor, torch.compile's default.
CPU_COMPILE_BACKEND = "aot_eager"
DEVICE_COMPILE_BACKEND = "inductor"


@dataclass(frozen=True)
class DemoOptions:
    backend: str = "auto"
    policy: LifecyclePolicy = field(default_factory=LifecyclePolicy)
    compile_backend: str | None = None  # None: per device, see above
    steps: int = 8
    warmup_steps: int = 2
    requests: int = 3
    regional: bool = False  # compile the repeated blocks one by one (adapters/regional.py)
    aot: bool = False  # compile the repeated blocks ahead of time (adapters/aot/)
    artifact_dir: str | None = None  # load compile artifacts before compile, save at WarmedUp


def default_compile_backend(device_type: str) -> str:
    return CPU_COMPILE_BACKEND if device_type == "cpu" else DEVICE_COMPILE_BACKEND


def resolve_backend(name: str) -> Any:
    from adapters import BackendUnavailable, InvalidOptions, get_backend

    try:
        return get_backend(name)
    except BackendUnavailable as exc:
        raise BackendUnavailableError(f"backend {name!r}: {exc}") from exc
    except InvalidOptions as exc:
        raise InvalidConfigError(str(exc)) from exc


def run_demo(
    options: DemoOptions,
    progress: Progress | None = None,
    on_lifecycle: Callable[[ModuleLifecycle], None] | None = None,
) -> dict[str, Any]:
    """Run the whole lifecycle once and return what the summary shows (JSON-serialisable).
    ``on_lifecycle(lc)`` is called once the lifecycle is built, before ``prepare`` (the
    ``--metrics-port`` endpoint starts answering for it there)."""
    import torch

    from lifecycle.testing.tiny import FluxShape, demo_cache_config, denoise, denoiser, flux_inputs, tiny_flux

    started = time.perf_counter()
    adapter = resolve_backend(options.backend)
    device = adapter.device_type
    # Ahead of time compiles with AOTInductor: inductor whatever the device.
    compile_backend = options.compile_backend or (
        DEVICE_COMPILE_BACKEND if options.aot else default_compile_backend(device)
    )
    shape = FluxShape()
    module = tiny_flux(shape).to(device)
    inputs = flux_inputs(shape, device=device)
    policy = options.policy
    lc = ModuleLifecycle(
        module,
        name="transformer",
        policy=policy,
        backend=adapter,
        cache_config=demo_cache_config(options.steps) if policy.cache_dit else None,
        compile_options={"backend": compile_backend} if policy.compile else None,
        compile_plan=CompilePlan(
            scope="blocks" if options.regional or options.aot else "model", ahead_of_time=options.aot
        ),
        artifact_dir=options.artifact_dir,
    )
    build_s = time.perf_counter() - started
    if on_lifecycle is not None:
        on_lifecycle(lc)

    graphs_before = lc.backend.graph_count()
    if progress is not None:
        progress.start_next(lc.name, policy, lc.state)
    lc.prepare(denoiser(inputs, options.warmup_steps), num_inference_steps=options.steps)
    warmup_graphs = lc.backend.graph_count() - graphs_before

    requests: list[dict[str, Any]] = []
    first: torch.Tensor | None = None
    for index in range(options.requests):
        request_id = f"r{index + 1}"
        if progress is not None:
            progress.start(f"{lc.name}: request {request_id} ({options.steps} steps)")
        with lc.request(num_inference_steps=options.steps, request_id=request_id) as req:
            out = denoise(lc.module, inputs, options.steps)
        first = out if first is None else first
        requests.append(
            {
                "request_id": req.request_id,
                "num_inference_steps": req.num_inference_steps,
                "cached_steps": req.cached_steps,
                "new_graphs": req.new_graphs,
                "duration_ms": round(req.duration_ms, 3),
                "max_abs_diff_to_first": float((out - first).abs().max().item()),
            }
        )

    stats = lc.stats()
    identical = all(r["max_abs_diff_to_first"] == 0.0 for r in requests)
    recompiles = int(stats["recompiles_since_warmup"])
    return {
        "model": type(module).__name__,
        "model_shape": {
            "double_blocks": shape.num_layers,
            "single_blocks": shape.num_single_layers,
            "hidden": shape.num_attention_heads * shape.attention_head_dim,
            "image_tokens": shape.image_tokens,
            "text_tokens": shape.text_tokens,
        },
        "parameters": sum(p.numel() for p in module.parameters()),
        "backend": lc.backend.name,
        "device": device,
        "compile_backend": compile_backend if policy.compile else None,
        "policy": policy.as_dict(),
        "steps": options.steps,
        "warmup_steps": options.warmup_steps,
        "state_path": [State.LOADED.value, *(r.dest.value for r in lc.history if r.outcome == "ok")],
        "phases": [
            {
                "trigger": r.trigger.value,
                "source": r.source.value,
                "dest": r.dest.value,
                "outcome": r.outcome,
                "duration_ms": round(r.duration_ms, 3),
            }
            for r in lc.history
        ],
        "build_s": round(build_s, 3),
        "warmup_graphs": warmup_graphs,
        "warmup_covered_cached_branch": stats["warmup_covered_cached_branch"],
        "requests": requests,
        "recompiles_since_warmup": recompiles,
        "regional": options.regional,
        "artifacts": stats.get("artifacts"),
        "ahead_of_time": _aot_summary(stats.get("compiler"), lc),
        "identical_outputs": identical,
        "wall_s": round(time.perf_counter() - started, 3),
        "ok": recompiles == 0 and identical and lc.state is State.WARMED_UP,
    }


# ---------------------------------------------------------------------------- text summary
def format_summary(result: dict[str, Any]) -> str:
    """The human-readable summary of ``run_demo``'s result."""
    policy = LifecyclePolicy.from_dict(result["policy"])
    compile_text = result["compile_backend"] or "off"
    shape = result["model_shape"]
    lines = [
        f"dit-lifecycle demo: {result['model']} (random weights, {shape['double_blocks']}+"
        f"{shape['single_blocks']} blocks, hidden {shape['hidden']}, {result['parameters']:,} parameters)",
        f"backend {result['backend']} ({result['device']}), torch.compile {compile_text}, policy {policy}, "
        f"{result['warmup_steps']}-step warm-up, {result['steps']}-step requests",
        "",
        "state path: " + " -> ".join(result["state_path"]),
        "",
        table(
            ["phase", "transition", "outcome", "time"],
            [
                [p["trigger"], f"{p['source']} -> {p['dest']}", p["outcome"], ms(p["duration_ms"])]
                for p in result["phases"]
            ],
        ),
        f"graphs compiled during warm-up: {result['warmup_graphs']}"
        + (
            f" (cached-step branch covered: {'yes' if result['warmup_covered_cached_branch'] else 'no'})"
            if policy.cache_dit and policy.compile
            else ""
        ),
        "",
        table(
            ["request", "steps", "cached steps", "new graphs", "time", "max |diff| to r1"],
            [
                [
                    r["request_id"],
                    r["num_inference_steps"],
                    r["cached_steps"],
                    r["new_graphs"],
                    ms(r["duration_ms"]),
                    f"{r['max_abs_diff_to_first']:.3g}",
                ]
                for r in result["requests"]
            ],
        ),
        "",
        *_aot_lines(result.get("ahead_of_time")),
        f"recompiles after warm-up: {result['recompiles_since_warmup']} (must be 0)",
        f"identical outputs for identical requests: {'yes' if result['identical_outputs'] else 'NO'}",
        f"demo wall time: {result['wall_s']:.2f} s  ->  {'OK' if result['ok'] else 'FAILED'}",
    ]
    return "\n".join(lines) + "\n"


def _aot_lines(aot: dict[str, Any] | None) -> list[str]:
    if not aot:
        return []
    problem = f"; {aot['problem']}" if aot.get("problem") else ""
    return [
        f"ahead of time: {aot['outcome']} ({aot['packages']} packages, {aot['seconds']:.2f} s in the "
        f"compile transition, {aot['blocks']} blocks bound){problem}"
    ]


def _aot_summary(stats: dict[str, Any] | None, lc: ModuleLifecycle) -> dict[str, Any] | None:
    """The ahead-of-time line of the summary: cold build, restart from packages, or fallback."""
    if not stats or "ahead_of_time" not in stats:
        return None
    return {
        "outcome": stats["ahead_of_time"],
        "packages": len(stats["aot_packages"]),
        "seconds": stats["aot_seconds"],
        "blocks": stats["aot_blocks"],
        "problem": stats.get("aot_problem"),
        "bounds": stats["aot_bounds"],
    }


__all__ = ["DemoOptions", "default_compile_backend", "format_summary", "resolve_backend", "run_demo"]
