"""The package check, parent side: load and run packages in a short-lived child process
(``adapters/aot/_child.py``) and read back what it said, so a crash is a result."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils import _pytree as pytree

from adapters.aot.bounds import CallSpec
from adapters.aot.capture import BlockCall, _eager
from adapters.aot.kinds import _check_device, _constants, _device_of, block_kinds
from adapters.aot.store import LocalFiles, PackageFiles, PackageInfo, host_fingerprint, write_manifest

Outcome = Literal["passed", "mismatch", "error", "crashed", "timeout", "not_run"]
CHECK_SCRIPT = Path(__file__).with_name("_child.py")


@dataclass(frozen=True)
class CheckResult:
    """One package's check in a child process. ``crashed`` carries the signal's name in ``detail``."""

    kind: str
    outcome: Outcome
    max_error: float | None = None
    tolerance: float = 0.0
    seconds: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "passed"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "outcome": self.outcome, "max_error": self.max_error,
                "tolerance": self.tolerance, "seconds": round(self.seconds, 3), "detail": self.detail}


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative to the output's largest magnitude: fused kernels round differently from eager."""
    return 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3


def _random_call(spec: CallSpec, device: torch.device, seed: int = 0) -> BlockCall:
    """Inputs at the export's example sizes, for a check where no call was captured (a restart)."""
    generator = torch.Generator().manual_seed(seed)
    treespec = pytree.treespec_loads(spec.treespec)
    constants = dict(spec.constants)
    tensors = iter(spec.tensors)
    leaves: list[Any] = []
    for index in range(treespec.num_leaves):
        if index in constants:
            leaves.append(constants[index])
            continue
        tensor_spec = next(tensors)
        dtype = getattr(torch, tensor_spec.dtype.removeprefix("torch."))
        if dtype.is_floating_point:
            value = torch.randn(tensor_spec.example, generator=generator).to(dtype)
        else:
            value = torch.zeros(tensor_spec.example, dtype=dtype)
        leaves.append(value.to(device))
    _, kwargs = pytree.tree_unflatten(leaves, treespec)
    return BlockCall(dict(kwargs))


# What a package that kills its loader most often is: seen on a machine whose ``CXX`` was a g++
# that links libstdc++ into the library statically, which then clashes with libtorch's. Inductor
# builds with ``$CXX`` (else ``g++``).
CRASH_HINT = (
    "a package that crashes its loader was most often linked with a static libstdc++ (its library "
    "has no NEEDED libstdc++.so); inductor builds with $CXX, else g++: build with a compiler that "
    "links it shared (e.g. CXX=/usr/bin/g++), then prepare again"
)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _run_check_process(
    command: Sequence[str], kinds: Sequence[str], tolerances: Sequence[float], timeout_s: float,
    cwd: str | None = None,
) -> list[CheckResult]:
    """Run a check process and turn what it printed (one JSON line per step) and how it ended into
    one result per kind: the kind it was loading or running when it died gets ``crashed`` (or
    ``timeout``), those after it ``not_run``."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout_s, cwd=cwd, check=False
        )
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
        ended: Outcome | None = None
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        code, ended = -1, "timeout"
    elapsed = time.perf_counter() - started
    done: dict[int, dict[str, Any]] = {}
    current: int | None = None
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or "index" not in record:
            continue
        current = int(record["index"])
        if record.get("stage") == "done":
            done[current] = record
    if ended is None and code < 0:
        ended = "crashed"
    if ended is not None and current is None:
        current = 0  # it died or hung before its first word: starting up, or loading the first
    tail = stderr.strip()[-1500:]
    results = []
    for index, kind in enumerate(kinds):
        record = done.get(index)
        if record is not None:
            said = record.get("outcome")
            outcome: Outcome = "passed" if said == "passed" else "mismatch" if said == "mismatch" else "error"
            results.append(CheckResult(
                kind, outcome,
                record.get("max_error"), tolerances[index], float(record.get("seconds", 0.0)),
                str(record.get("detail", "")),
            ))
        elif ended is not None and index == current:
            if ended == "crashed":
                detail = f"{_signal_name(code)}; {CRASH_HINT}"
            else:
                detail = f"no answer in {timeout_s:.0f} s"
            results.append(CheckResult(kind, ended, None, tolerances[index], elapsed,
                                       f"{detail}; stderr: {tail}" if tail else detail))
        elif ended is not None or code != 0:
            why = f"the check process ended with {_signal_name(code) if code < 0 else f'exit {code}'}"
            if ended == "timeout":
                why = f"the check process gave no answer in {timeout_s:.0f} s"
            results.append(CheckResult(kind, "not_run", None, tolerances[index], 0.0,
                                       f"{why} before this package; stderr: {tail}"))
        else:
            results.append(CheckResult(kind, "error", None, tolerances[index], 0.0,
                                       f"no result from the check process; stderr: {tail}"))
    return results


@dataclass(frozen=True)
class CheckJob:
    """One package to check: its file, the block whose weights it binds, a call, and the tolerance.
    ``expected`` (flat outputs) defaults to the block's eager output on ``call``."""

    kind: str
    package: Path
    block: nn.Module
    call: BlockCall
    tolerance: float | None = None
    expected: list[Any] | None = None


def check_packages(jobs: Sequence[CheckJob], *, timeout_s: float = 600.0) -> dict[str, CheckResult]:
    """Load and run each package in one short-lived child process and compare with eager.

    A crash, a hang or an exception in the child is a result (``crashed``/``timeout``/``error``),
    never a failure of this process. The weights and inputs travel through a private temporary file.
    """
    if not jobs:
        return {}
    records: list[dict[str, Any]] = []
    tolerances: list[float] = []
    for job in jobs:
        device = _device_of(job.block)
        _check_device(device)
        expected = job.expected
        if expected is None:
            with torch.no_grad():
                output = _eager(job.block, (), job.call.kwargs)
            expected = list(pytree.tree_leaves(output))
        dtype = next((t.dtype for t in job.block.parameters()), torch.float32)
        tolerance = job.tolerance if job.tolerance is not None else default_tolerance(dtype)
        tolerances.append(tolerance)
        records.append({
            "package": str(Path(job.package).resolve()),
            "device_index": -1 if device.type == "cpu" else (device.index or 0),
            "weights": {name: t.detach() for name, t in _constants(job.block).items()},
            "kwargs": job.call.kwargs,
            "expected": [t.detach() if isinstance(t, torch.Tensor) else t for t in expected],
            "tolerance": tolerance,
        })
    with tempfile.TemporaryDirectory(prefix="aot-check-") as scratch:
        jobs_path = Path(scratch) / "jobs.pt"
        torch.save(records, jobs_path)
        del records
        # By path, from a scratch directory: neither this package nor the caller's cwd is importable
        # there, so no module of ours shadows one that torch imports.
        launcher = (
            "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
        )
        command = [sys.executable, "-c", launcher, str(CHECK_SCRIPT), str(jobs_path)]
        results = _run_check_process(command, [job.kind for job in jobs], tolerances, timeout_s, cwd=scratch)
    return {result.kind: result for result in results}



def verify_packages(
    module: nn.Module,
    packages: Mapping[str, PackageInfo],
    *,
    calls: Mapping[str, BlockCall] | None = None,
    timeout_s: float = 600.0,
    record: bool = True,
) -> dict[str, CheckResult]:
    """Check packages found by ``open_packages`` in a child process, with the first block of each
    kind's weights and a captured call (or random inputs at the export's example sizes). With
    ``record``, a pass is written into the manifest (this host), so the next restart here skips it."""
    kinds = block_kinds(module)
    jobs = []
    for kind, info in packages.items():
        block = kinds[kind][0]
        call = (calls or {}).get(kind) or _random_call(info.spec, _device_of(block))
        jobs.append(CheckJob(kind, info.path, block, call))
    results = check_packages(jobs, timeout_s=timeout_s)
    if record:
        for kind, check in results.items():
            if check.ok:
                record_check(LocalFiles(packages[kind].path.parent), packages[kind], kinds[kind][0], check)
    return results


def record_check(files: PackageFiles, info: PackageInfo, block: nn.Module, check: CheckResult) -> None:
    """Write a passed check into the package's manifest (this host), so a restart here skips it.
    Raises ``OSError`` when the store cannot be written (a read-only volume)."""
    manifest = dict(info.manifest)
    manifest["verified_on"] = host_fingerprint(_device_of(block))
    manifest["check"] = check.to_json()
    write_manifest(files, info.manifest_name, manifest)

