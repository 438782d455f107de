"""What the GPU benchmarks' parent and child processes share: the common arguments, one scenario
run as a child process with empty compiler caches (its last JSON line is its result), a bucket's
first and steady request times, outputs compared with a reference, and the report written under
the machine's GPU name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def bench_parser(doc: str | None, *, blocks: tuple[int, int], repeats: int, timeout: float,
                 repeats_help: str | None = None) -> argparse.ArgumentParser:
    """A parser with the model, request and child-process arguments every GPU benchmark takes."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--blocks", type=int, nargs=2, default=list(blocks))
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--timeout", type=float, default=timeout)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--artifacts")
    return parser


def dispatch(parser: argparse.ArgumentParser, child: Callable[[argparse.Namespace], dict[str, Any]],
             parent: Callable[[argparse.Namespace], Any]) -> None:
    """A child prints its result as one JSON line; the parent runs the children and reports."""
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
    else:
        parent(args)


def model_arguments(args: argparse.Namespace) -> list[str]:
    """The common arguments again, for a child's command line."""
    return ["--device", args.device, "--blocks", *map(str, args.blocks), "--steps", str(args.steps),
            "--warmup-steps", str(args.warmup_steps), "--threshold", str(args.threshold),
            *(["--tiny"] if args.tiny else [])]


def empty_compiler_caches(name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose inductor and triton caches are new, empty folders."""
    caches = tempfile.mkdtemp(prefix=f"inductor-{name}-")
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": caches, "TRITON_CACHE_DIR": caches + "/triton",
            **(extra or {})}


def finished(done: subprocess.CompletedProcess[str], seconds: float, **labels: Any) -> dict[str, Any]:
    """A child's result (its last JSON line) with its labels, exit status and wall time."""
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    entry: dict[str, Any] = json.loads(lines[-1]) if done.returncode == 0 and lines else {}
    entry.update({**labels, "returncode": done.returncode, "process_s": round(seconds, 2)})
    if done.returncode != 0:
        entry["stderr"] = done.stderr[-3000:]
    return entry


def run_child(command: Sequence[str], env: dict[str, str], timeout: float, **labels: Any) -> dict[str, Any]:
    """Run one scenario's child process to the end."""
    started = time.perf_counter()
    done = subprocess.run(list(command), capture_output=True, text=True, env=env, timeout=timeout)
    return finished(done, time.perf_counter() - started, **labels)


def first_and_steady(tokens: int, times: Sequence[float]) -> dict[str, Any]:
    """A bucket's first request, and the median of the later ones when there are any."""
    served: dict[str, Any] = {"tokens": tokens, "first_s": round(times[0], 4)}
    if len(times) > 1:
        steady = statistics.median(times[1:])
        served.update(steady_s=round(steady, 4), first_over_steady=round(times[0] / steady, 3))
    return served


def bit_identical(reference: Path, others: Iterable[Path]) -> dict[str, bool]:
    """Per saved output file: every tensor equal to the reference's."""
    import torch

    expected = torch.load(reference)
    return {path.stem: all(torch.equal(value, expected[key]) for key, value in torch.load(path).items())
            for path in others}


def write_report(report: dict[str, Any], out: Path, name: str, suffix: str = "") -> Path:
    """``out/<name>-<gpu><suffix>.json``."""
    gpu = (report["machine"].get("gpu") or "cpu").replace(" ", "-")
    path = out / f"{name}-{gpu}{suffix}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print("wrote", path)
    return path
