"""The per-transition cost of this tree against an earlier commit, measured alike.

    python bench/overhead_before_after.py [--before b3db096] [--repeats 3] [--quick]

The earlier commit is unpacked with ``git archive`` into a temporary directory and given *this*
tree's ``bench/bench_cpu.py`` (so both are measured by the same code); then ``bench_cpu.py
overhead`` runs in each tree in turn, before and after alternating, ``--repeats`` times. On a
shared 2-core VM the absolute numbers drift by tens of percent within minutes (the floors, a
bare transitions trigger and one structlog event, drift with them), so the comparison that
means something is the one made back to back, and each run is also given over its own floors.
Result: bench/results/cpu_overhead_before_after.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "bench" / "results" / "cpu_overhead_before_after.json"
BENCH_FILES = ("bench_cpu.py", "_machine.py")


def unpack(commit: str, into: Path) -> None:
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    for name in BENCH_FILES:
        shutil.copy2(ROOT / "bench" / name, into / "bench" / name)


def run_bench(tree: Path, quick: bool) -> dict[str, Any]:
    command = [sys.executable, "bench/bench_cpu.py", "overhead"] + (["--quick"] if quick else [])
    subprocess.run(command, cwd=tree, check=True, capture_output=True)
    result: dict[str, Any] = json.loads((tree / "bench" / "results" / "cpu_overhead.json").read_text())
    return result


def summary(run: dict[str, Any]) -> dict[str, Any]:
    results = run["results"]
    per_trigger = run["per_trigger_median_us"]
    lap = results["lifecycle_transition"]["median_us"]
    per_trigger_mean = statistics.mean(per_trigger.values())
    floors = results["transitions_Machine"]["median_us"] + results["structlog_json_event"]["median_us"]
    return {
        "lap_median_us": lap,
        "mean_of_per_trigger_medians_us": per_trigger_mean,
        # Over the floors timed in the same run (a bare transitions trigger + one structlog
        # event): the machine's speed of the moment divides out.
        "lap_over_floors": lap / floors,
        "per_trigger_over_floors": per_trigger_mean / floors,
        "per_trigger_median_us": per_trigger,
        "floor_transitions_us": results["transitions_Machine"]["median_us"],
        "floor_structlog_us": results["structlog_json_event"]["median_us"],
        "when": run["when"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--before", default="b3db096", help="the earlier commit (default: before the per-transition rewrite)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="bench_cpu.py --quick in each run")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    machine: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dit-before-") as tmp:
        before = Path(tmp)
        unpack(args.before, before)
        for repeat in range(args.repeats):
            for label, tree in (("before", before), ("after", ROOT)):
                run = run_bench(tree, args.quick)
                machine = run["machine"]
                runs[label].append(summary(run))
                lap = runs[label][-1]["lap_median_us"]
                print(f"{repeat + 1}/{args.repeats} {label}: lap median {lap:.1f} us")

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[label])

    keys = (
        "lap_median_us", "mean_of_per_trigger_medians_us", "lap_over_floors", "per_trigger_over_floors",
        "floor_transitions_us", "floor_structlog_us",
    )
    out = {
        "bench": "overhead_before_after",
        "machine": machine,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "before_commit": args.before,
        "after": "this tree",
        "repeats": args.repeats,
        "quick": args.quick,
        "runs": runs,
        "median_over_repeats": {label: {key: med(label, key) for key in keys} for label in runs},
    }
    RESULT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULT.relative_to(ROOT)}")
    for label, values in out["median_over_repeats"].items():
        print(label, {k: round(v, 2) for k, v in values.items()})


if __name__ == "__main__":
    main()
