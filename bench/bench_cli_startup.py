"""Start-up cost of the CLI commands that must not import torch.

Runs each command as users run it (``python -m lifecycle ...``, a fresh interpreter each time)
and reports the median wall time and the peak resident memory of the child (``ru_maxrss`` from
``os.wait4``), next to a bare ``python -c pass``. Also checks, with ``-X importtime``, that no
``torch`` module was imported. Targets: ``audit verify`` on an empty file under 0.5 s and 60 MB.
Results go to bench/results/cli_startup.json, with the machine named.

    python bench/bench_cli_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_machine.py


TARGET_S = 0.5
TARGET_MIB = 60.0


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


GNU_TIME = "/usr/bin/time"


def _once(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit status) of one child.

    The peak comes from GNU time (``%M``) when it is installed: a child forked from this Python
    process would report this process's own peak (Linux keeps the high-water mark across exec).
    Without it, ``os.wait4`` and a parent kept small (torch is imported only after measuring).
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        wrapped = [GNU_TIME, "-f", "%M", "-o", report.name, *argv] if os.path.exists(GNU_TIME) else argv
        started = time.perf_counter()
        child = subprocess.Popen(wrapped, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        _pid, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        child.returncode = code
        text = report.read().strip().splitlines()
        peak_kib = int(text[-1]) if wrapped is not argv and text else usage.ru_maxrss
    return wall, peak_kib / 1024.0, code  # KiB on Linux


def _imports_torch(argv: list[str]) -> bool:
    run = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, check=False)
    names = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()
             if line.startswith("import time:")}
    return any(name == "torch" or name.startswith("torch.") for name in names)


def measure(label: str, argv: list[str], runs: int) -> dict[str, Any]:
    _once(argv)  # warm the OS page cache and the .pyc files
    walls, peaks, codes = [], [], set()
    for _ in range(runs):
        wall, peak, code = _once(argv)
        walls.append(wall)
        peaks.append(peak)
        codes.add(code)
    return {
        "command": " ".join(["python", *argv[1:]]),
        "label": label,
        "runs": runs,
        "exit_codes": sorted(codes),
        "wall_s_median": round(statistics.median(walls), 4),
        "wall_s_min": round(min(walls), 4),
        "wall_s_max": round(max(walls), 4),
        "peak_rss_mib_median": round(statistics.median(peaks), 1),
        "peak_rss_mib_max": round(max(peaks), 1),
        "imports_torch": _imports_torch(argv),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cli_startup.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.jsonl"
        empty.write_text("")
        python = sys.executable
        commands = {
            "python -c pass (floor)": [python, "-c", "pass"],
            "audit verify (empty file)": [python, "-m", "lifecycle", "audit", "verify", str(empty)],
            "audit show (empty file)": [python, "-m", "lifecycle", "audit", "show", str(empty)],
            "graph": [python, "-m", "lifecycle", "graph"],
            "--help": [python, "-m", "lifecycle", "--help"],
        }
        results = [measure(label, command, args.runs) for label, command in commands.items()]
    from _machine import machine_info  # imports torch: only now, after measuring

    verify = results[1]
    report = {
        "benchmark": "cli_startup",
        "targets": {"wall_s": TARGET_S, "peak_rss_mib": TARGET_MIB},
        "machine": machine_info(load_avg_1m_before=load_before),
        "peak_rss_from": "GNU time %M" if os.path.exists(GNU_TIME) else "os.wait4 ru_maxrss",
        "results": results,
        "met": {
            "audit_verify_wall": verify["wall_s_median"] < TARGET_S,
            "audit_verify_memory": verify["peak_rss_mib_max"] < TARGET_MIB,
            "no_torch": not any(r["imports_torch"] for r in results),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(f"{r['label']:<28} {r['wall_s_median'] * 1000:7.1f} ms median  "
              f"{r['peak_rss_mib_max']:6.1f} MiB peak  torch imported: {r['imports_torch']}")
    print(f"targets met: {report['met']}  -> {args.out}")
    return 0 if all(report["met"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
