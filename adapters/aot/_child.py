"""The child side of the package check: load AOT-compiled block packages, run them, compare.

Loading an AOTInductor package means ``dlopen`` of native code built elsewhere: a broken build, a
driver mismatch or a damaged file can kill the process that loads it (a segmentation fault is not
an exception). So a package is first loaded here, in a short-lived process of its own, on saved
example inputs and the block's own weights, and its outputs are compared with the eager outputs
the parent computed. The parent reads one JSON line per step from stdout, so when this process
dies it still knows which package was being loaded or run.

This file imports only the standard library and torch, and the parent runs it by path (not as
``adapters.aot._child``): the package's ``__init__`` and cache-dit stay out of the child. It loads
``adapters/_torch_internals.py`` by path too (that file imports only torch), so the child loads
and binds packages through the same calls as the serving process.

    python adapters/_child.py JOBS.pt      # JOBS.pt: a list of job dicts, see ``_run_job``
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


def _say(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def relative_error(actual: Any, expected: Any) -> float:
    """max |actual - expected| over max |expected|, in float64; inf where the two cannot be compared
    (shape or dtype differ, or NaN/inf where the expected value has none)."""
    import torch

    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return 0.0 if actual == expected else math.inf
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return math.inf
    if actual.numel() == 0:
        return 0.0
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    b = expected.detach().to(device="cpu", dtype=torch.float64)
    finite = torch.isfinite(b)
    if not bool(torch.equal(torch.isfinite(a), finite)):
        return math.inf
    if not bool(finite.any()):
        return 0.0
    scale = max(float(b[finite].abs().max()), 1e-12)
    return float((a[finite] - b[finite]).abs().max()) / scale


def _internals() -> Any:
    """``adapters/_torch_internals.py``, loaded by path."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "_torch_internals.py"
    spec = importlib.util.spec_from_file_location("_dit_lifecycle_torch_internals", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_job(index: int, job: dict[str, Any], internals: Any) -> dict[str, Any]:
    import torch
    from torch.utils import _pytree as pytree

    started = time.perf_counter()
    _say({"index": index, "stage": "loading"})
    loader = internals.load_aoti_package(job["package"], int(job["device_index"]))
    runner = internals.aoti_runner(loader)
    # Only what the package reads: inductor may fold a weight into another (a bias into a fused
    # kernel), and the loader refuses a constant it does not know.
    wanted = set(loader.get_constant_fqns())
    weights = {name: tensor for name, tensor in job["weights"].items() if name in wanted}
    internals.load_constants(loader, weights, user_managed=False)
    load_s = time.perf_counter() - started
    _say({"index": index, "stage": "running"})
    with torch.no_grad():
        output = runner(**job["kwargs"])
        if job["device_index"] >= 0 and torch.cuda.is_available():
            torch.cuda.synchronize()
    actual = pytree.tree_leaves(output)
    expected = job["expected"]
    if len(actual) != len(expected):
        error = math.inf
    else:
        error = max((relative_error(a, b) for a, b in zip(actual, expected, strict=True)), default=0.0)
    tolerance = float(job["tolerance"])
    return {
        "index": index,
        "stage": "done",
        "outcome": "passed" if error <= tolerance else "mismatch",
        "max_error": error if math.isfinite(error) else None,
        "load_s": round(load_s, 4),
        "seconds": round(time.perf_counter() - started, 4),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: _child.py JOBS.pt\n")
        return 2
    import torch

    jobs = torch.load(argv[0], weights_only=True)
    internals = _internals()
    for index, job in enumerate(jobs):
        try:
            _say(_run_job(index, job, internals))
        except Exception as error:  # a Python-level failure is a result, not the end of the check
            _say({"index": index, "stage": "done", "outcome": "error",
                  "detail": f"{type(error).__name__}: {error}"[:2000]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
