"""``python -m lifecycle build``: build a model's compile artifacts offline, into a store, for a
CI job that ships them (an image layer, a read-only volume, a bucket) to a fleet that only loads.

It runs the same lifecycle a replica runs (mount, compile, warm up at every declared bucket), with
the store as ``artifact_dir``: the packages' keys are the ones a replica with the same model,
buckets, compile plan, compile options and device computes, so the replica loads them
(``ahead_of_time: loaded``, no dynamo). The model is ``tiny-flux`` (the tests' tiny Flux) or
``pkg.module:factory``: a callable returning ``(module, run)`` or ``(module, run, kwargs)``, where
``run(module, shape)`` makes one warm-up call at a bucket and ``kwargs`` are more
``ModuleLifecycle`` arguments (e.g. ``cache_config``) that must match the fleet's.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What a build ended with: exit 0 for these (the store holds the artifacts), 1 otherwise.
GOOD = frozenset({"built", "loaded", "saved"})
PLANS = ("blocks", "aot", "reproducible", "model")


class BuildError(Exception):
    """A build that could not start or did not put artifacts into the store (exit 1)."""


@dataclass(frozen=True)
class BuildRequest:
    model: str
    shapes: list[dict[str, int]]
    compile_plan: tuple[str, ...]
    compile_options: dict[str, Any]
    artifact_dir: str
    storage_options: dict[str, Any] | None
    signing_key: bytes | None
    device: str
    build_wait_s: float


def parse_shapes(text: str) -> list[dict[str, int]]:
    """``[{"tokens": 64}, ...]`` (JSON) or ``tokens=64,tokens=16`` (buckets separated by commas,
    a bucket's dims by ``/``: ``height=512/width=512,height=1024/width=1024``)."""
    text = text.strip()
    if text.startswith("["):
        try:
            shapes = json.loads(text)
        except ValueError as exc:
            raise BuildError(f"--shapes is not JSON: {exc}") from None
    else:
        shapes = []
        for bucket in filter(None, (part.strip() for part in text.split(","))):
            shape: dict[str, Any] = {}
            for dim in bucket.split("/"):
                name, sep, value = dim.partition("=")
                if not sep or not name.strip() or not value.strip().isdigit():
                    raise BuildError(f"--shapes: {dim!r} is not name=integer (e.g. tokens=64)")
                shape[name.strip()] = int(value)
            shapes.append(shape)
    if not isinstance(shapes, list) or not shapes or not all(
        isinstance(s, dict) and s
        and all(isinstance(k, str) and type(v) is int and v > 0 for k, v in s.items())
        for s in shapes
    ):
        raise BuildError(
            "--shapes must name at least one bucket of positive integer dims, e.g. tokens=64,tokens=16"
        )
    return shapes


def parse_plan(text: str) -> tuple[str, ...]:
    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [part for part in parts if part not in PLANS]
    if unknown or not parts:
        raise BuildError(f"--compile-plan takes a comma list of {list(PLANS)}, got {text!r}")
    if "model" in parts and ("blocks" in parts or "aot" in parts):
        raise BuildError("--compile-plan: 'model' compiles the whole model; it excludes 'blocks' and 'aot'")
    return parts


def read_signing_key(env: str | None, file: str | None) -> bytes | None:
    """The key from an environment variable (its bytes) or a file (its bytes, a trailing newline
    removed): the same bytes the replicas pass as ``artifact_signing_key``."""
    if env and file:
        raise BuildError("give --signing-key-env or --signing-key-file, not both")
    if env:
        value = os.environb.get(env.encode())
        if not value:
            raise BuildError(f"--signing-key-env: the environment variable {env} is not set or empty")
        return value
    if file:
        try:
            return Path(file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise BuildError(f"--signing-key-file: cannot read {file} ({exc.strerror or exc})") from None
    return None


def read_json_file(path: str | None, what: str) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BuildError(f"{what}: cannot read a JSON object from {path} ({exc})") from None
    if not isinstance(value, dict):
        raise BuildError(f"{what}: {path} must hold a JSON object")
    return value


def tiny_flux_factory() -> tuple[Any, Callable[[Any, Mapping[str, int]], None], dict[str, Any]]:
    """The tests' tiny Flux (random weights, seeded), its warm-up call at ``{"tokens": n}`` and its
    cache config: what ``tests/aot_builds.py`` builds."""
    import torch

    from lifecycle.testing.tiny import FluxShape, demo_cache_config, denoise, flux_inputs, tiny_flux

    def run(module: Any, shape: Mapping[str, int]) -> None:
        with torch.no_grad():
            denoise(module, flux_inputs(FluxShape(image_tokens=shape["tokens"])), 2)

    return tiny_flux(), run, {"cache_config": demo_cache_config(8)}


def load_model(spec: str) -> tuple[Any, Callable[..., Any], dict[str, Any]]:
    if spec == "tiny-flux":
        return tiny_flux_factory()
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise BuildError(f"--model is 'tiny-flux' or 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise BuildError(f"--model {spec}: cannot import it ({type(exc).__name__}: {exc})") from None
    made = factory()
    if not isinstance(made, tuple) or len(made) not in (2, 3) or not callable(made[1]):
        raise BuildError(f"--model {spec}: the factory must return (module, run) or (module, run, kwargs)")
    kwargs = dict(made[2]) if len(made) == 3 else {}
    return made[0], made[1], kwargs


def run_build(request: BuildRequest) -> dict[str, Any]:
    """Prepare the model through a lifecycle whose ``artifact_dir`` is the store; what happened."""
    from lifecycle import CompilePlan, ModuleLifecycle
    from lifecycle.testing import capture_audit

    module, run, kwargs = load_model(request.model)
    device = request.device
    if device != "cpu":
        module = module.to(device)
    plan = CompilePlan(
        scope="model" if "model" in request.compile_plan else "blocks",
        ahead_of_time="aot" in request.compile_plan,
        reproducible="reproducible" in request.compile_plan,
    )
    started = time.perf_counter()
    with capture_audit() as events:
        lc = ModuleLifecycle(
            module, backend=device, compile_options=request.compile_options, compile_plan=plan,
            artifact_dir=request.artifact_dir, artifact_storage_options=request.storage_options,
            artifact_signing_key=request.signing_key, build_wait_s=request.build_wait_s, **kwargs,
        )
        lc.prepare(run, shapes=request.shapes)
    compile_event = next(
        (dict(e) for e in events.of("lifecycle.transition") if e.get("trigger") == "compile"), {}
    )
    artifacts = [dict(e) for e in events.of("lifecycle.artifacts")]
    if plan.ahead_of_time:
        status = str(compile_event.get("aot_store", compile_event.get("ahead_of_time", "failed")))
        if compile_event.get("ahead_of_time") == "fallback":
            status = "failed"
        elif status == "built" and any(
            v != "published" for v in compile_event.get("aot_published", {}).values()
        ):
            status = "not_published"
    else:
        saved = compile_event.get("artifacts_load")
        save = next((e["status"] for e in artifacts if e.get("action") == "save"), None)
        status = "loaded" if saved == "loaded" and save is None else str(save or saved or "failed")
    result = {
        "ok": status in GOOD,
        "status": status,
        "model": request.model,
        "store": request.artifact_dir,
        "shapes": request.shapes,
        "compile_plan": plan.as_dict(),
        "signed": request.signing_key is not None,
        "seconds": round(time.perf_counter() - started, 3),
        "compile": {k: v for k, v in compile_event.items()
                    if k.startswith(("aot", "ahead_of_time", "artifacts"))},
        "artifacts": [{k: e.get(k) for k in ("action", "status", "detail")} for e in artifacts],
    }
    lc.reset()
    return result


def format_result(result: Mapping[str, Any]) -> str:
    lines = [
        f"build {result['model']} into {result['store']}: {result['status']}"
        f" ({'ok' if result['ok'] else 'FAILED'}, {result['seconds']:.1f} s)",
    ]
    lines += [f"  {e['action']}: {e['status']}" + (f" ({e['detail']})" if e.get("detail") else "")
              for e in result["artifacts"]]
    return "\n".join(lines) + "\n"


__all__ = ["BuildError", "BuildRequest", "format_result", "parse_plan", "parse_shapes",
           "read_json_file", "read_signing_key", "run_build"]
