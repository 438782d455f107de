"""Edges found by probing the shipped parts with hostile but legal inputs: artifact files that
are links or hold absurd headers, an empty artifact path, ops-server arguments and clients that
misbehave, the metrics feed, a huge number in an audit, and another library's logger. Each test
uses the real part: real files, a real server and socket, real structlog, a real interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python argv...`` in a fresh interpreter, with the repository importable."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        check=False, env={**os.environ, "PYTHONPATH": path},
    )


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return run("-c", textwrap.dedent(code))


# ---------------------------------------------------------------------------- the machine's logging
def test_importing_the_machine_leaves_transitions_logger_alone_and_triggers_stay_quiet():
    # A library never reconfigures another library's logger; its own machines still write no
    # transitions INFO record per trigger under a host's INFO root logger.
    run = run_python(
        """
        import json, logging
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record.name)
        logging.basicConfig(level=logging.INFO, handlers=[Keep()])
        from lifecycle.machine import StateHolder, events_for, fire
        from states import LifecyclePolicy, Trigger

        class Attempt:
            def run(self): pass
            def committed(self): pass
            def aborted(self, error): raise error

        holder = StateHolder()
        fire(events_for(LifecyclePolicy()), holder, Trigger.MOUNT_CACHE, Attempt())
        print(json.dumps({
            "levels": [logging.getLogger(n).level for n in ("transitions", "transitions.core")],
            "state": holder.state,
            "records": records,
        }))
        """
    )
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.splitlines()[-1])
    assert found == {"levels": [0, 0], "state": "CacheMounted", "records": []}


# ---------------------------------------------------------------------------- audit show
def test_show_prints_a_huge_duration_bounded_where_verify_says_ok(tmp_path):
    event = {
        "event": "lifecycle.transition", "module": "dit", "module_id": "m1", "trigger": "mount_cache",
        "source": "Loaded", "dest": "CacheMounted", "outcome": "ok", "duration_ms": 10**399 + 7,
        "backend": "cpu", "policy": {"cache_dit": True, "compile": True}, "seq": 1,
        "timestamp": "2026-01-02T03:04:05.678901Z",
    }
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps(event) + "\n")
    verify = run("-m", "lifecycle", "audit", "verify", str(path))
    assert verify.returncode == 0 and ": OK (" in verify.stdout, verify.stderr
    show = run("-m", "lifecycle", "audit", "show", str(path))
    assert show.returncode == 0 and "Traceback" not in show.stderr, show.stderr[-2000:]
    (row,) = [line for line in show.stdout.splitlines() if "mount_cache" in line]
    assert row.endswith("1.00e+396 s") and len(row) < 120
    assert "verify: " in show.stdout and ": OK (" in show.stdout
