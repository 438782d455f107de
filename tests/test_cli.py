"""The CLI, run as users run it: ``python -m lifecycle ...`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
import torch

from lifecycle._cli import main
from states import LifecyclePolicy, State
from states.graph import dot, mermaid

ROOT = Path(__file__).resolve().parents[1]
# Small and fast: aot_eager, a short warm-up, few steps, two requests.
FAST_DEMO = [
    "--backend", "cpu", "--compile-backend", "aot_eager",
    "--steps", "4", "--warmup-steps", "1", "--requests", "2",
]


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "lifecycle", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )


def assert_one_line_error(run: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert run.returncode == code, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("dit-lifecycle: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------- graph
def test_graph_prints_the_generated_diagrams(capsys):
    run = cli("graph")
    assert run.returncode == 0 and run.stdout == mermaid(LifecyclePolicy())
    assert main(["graph", "--no-cache", "--format", "dot"]) == 0
    assert capsys.readouterr().out == dot(LifecyclePolicy(cache_dit=False))
    assert main(["graph", "--no-cache", "--no-compile"]) == 0
    assert "Loaded --> WarmedUp: warm_up" in capsys.readouterr().out


# ---------------------------------------------------------------------------- bad arguments
BAD_ARGUMENTS = [
    ((), ["required", "demo,build,graph,audit"]),
    (("frobnicate",), ["invalid choice: 'frobnicate'"]),
    (("graph", "--format", "svg"), ["invalid choice: 'svg'", "dit-lifecycle graph --help"]),
    (("demo", "--steps", "0"), ["--steps", "positive integer, got 0"]),
    (("demo", "--requests", "two"), ["--requests", "positive integer, got 'two'"]),
    (("demo", "--pipeline", "sdxl"), ["invalid choice: 'sdxl'"]),
    (("demo", "--bogus"), ["unrecognized arguments: --bogus"]),
    (("audit",), ["required", "verify,show"]),
    (("audit", "verify"), ["required: FILE"]),
    (("audit", "show", "/no/such/audit.jsonl"), ["no such audit file"]),
]


@pytest.mark.parametrize(("args", "needles"), [BAD_ARGUMENTS[0], BAD_ARGUMENTS[2], BAD_ARGUMENTS[3]],
                         ids=["no-command", "graph-format", "demo-steps"])
def test_bad_arguments_are_one_line_and_exit_2(args, needles):
    assert_one_line_error(cli(*args), 2, *needles)


@pytest.mark.parametrize(
    ("args", "needles"), BAD_ARGUMENTS, ids=[" ".join(a) or "none" for a, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_in_process(args, needles, capsys):
    # The same parser as the subprocess runs, without paying for a new interpreter each time.
    assert main(list(args)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dit-lifecycle: error: ") and captured.out == ""
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_help_exits_0(capsys):
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--no-compile" in out and "--audit FILE" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_backend_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    assert_one_line_error(cli("demo", "--backend", "cuda", "--quiet"), 1, "cuda")
    # main() quiets cache-dit through the environment; keep that inside this test.
    monkeypatch.setenv("CACHE_DIT_LOG_LEVEL", os.environ.get("CACHE_DIT_LOG_LEVEL", "info"))
    saved = structlog.get_config()
    try:
        assert main(["demo", "--backend", "tpu", "--quiet"]) == 1
        assert "unknown backend 'tpu'" in capsys.readouterr().err
        assert main(["demo", "--audit", str(tmp_path / "missing-dir" / "a.jsonl")]) == 1
        assert "cannot open audit file" in capsys.readouterr().err
    finally:
        structlog.configure(**saved)


# ---------------------------------------------------------------------------- demo
@pytest.mark.slow
def test_demo_json_with_audit_then_verify_and_show(tmp_path):
    audit = tmp_path / "demo.jsonl"
    run = cli("demo", *FAST_DEMO, "--json", "--audit", str(audit))
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)  # stdout is the JSON and nothing else
    assert result["ok"] is True
    assert result["state_path"] == ["Loaded", "CacheMounted", "Compiled", "WarmedUp"]
    assert [p["trigger"] for p in result["phases"]] == ["mount_cache", "compile", "warm_up"]
    assert result["warmup_graphs"] > 0 and result["warmup_covered_cached_branch"] is True
    assert [r["new_graphs"] for r in result["requests"]] == [0, 0]
    assert result["recompiles_since_warmup"] == 0 and result["identical_outputs"] is True
    assert [r["request_id"] for r in result["requests"]] == ["r1", "r2"]
    assert result["backend"] == "cpu" and result["compile_backend"] == "aot_eager"
    assert "[ok] transformer: warm_up (Compiled -> WarmedUp) ok" in run.stderr  # progress
    assert "Traceback" not in run.stderr

    verify = cli("audit", "verify", str(audit))
    assert verify.returncode == 0 and "OK (5 lifecycle events: 3 transitions, 2 requests" in verify.stdout
    show = cli("audit", "show", str(audit))
    assert show.returncode == 0
    assert "mount_cache" in show.stdout and "Loaded -> CacheMounted" in show.stdout
    assert "request r2" in show.stdout and "verify: " in show.stdout


@pytest.mark.slow
def test_demo_pipeline_delegates_and_audits(tmp_path):
    audit = tmp_path / "flux.jsonl"
    run = cli("demo", "--pipeline", "flux", "--backend", "cpu", "--steps", "4", "--requests", "2",
              "--json", "--quiet", "--audit", str(audit))
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["ok"] is True and result["identical_outputs"] is True
    assert result["compile_backend"] == "aot_eager"  # the CPU default, passed on by the CLI
    assert [r["new_graphs"] for r in result["requests"]] == [0, 0]
    verify = cli("audit", "verify", str(audit))
    assert verify.returncode == 0 and "2 requests" in verify.stdout, verify.stderr


@pytest.mark.slow
def test_demo_table_without_cache_or_compile():
    run = cli("demo", "--no-cache", "--no-compile", "--steps", "2", "--requests", "1", "--quiet")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # --quiet
    assert "state path: Loaded -> WarmedUp" in run.stdout
    assert "torch.compile off" in run.stdout
    assert "recompiles after warm-up: 0" in run.stdout and "->  OK" in run.stdout


# ---------------------------------------------------------------------------- audit verify
def test_verify_several_files_names_the_bad_one(tmp_path):
    event = {
        "event": "lifecycle.transition", "module": "dit", "module_id": "m1", "trigger": "mount_cache",
        "source": "Loaded", "dest": "CacheMounted", "outcome": "ok", "duration_ms": 1.0,
        "backend": "cpu", "policy": {"cache_dit": True, "compile": True}, "seq": 1,
    }
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(event) + "\n")
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps(event) + "\n" + json.dumps({**event, "seq": 2})[:30])
    run = cli("audit", "verify", str(good), str(torn))
    assert run.returncode == 1
    assert f"{good}: OK" in run.stdout
    assert run.stderr.strip() == f"{torn}:2: " + run.stderr.strip().split(":2: ", 1)[1]
    assert "torn last line" in run.stderr and "Traceback" not in run.stderr



def test_verify_json_in_process(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text("")
    assert main(["audit", "verify", "--json", str(good), str(tmp_path / "absent.jsonl")]) == 1
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["ok"] is True and first["events"] == 0
    assert (second["ok"], second["line"]) == (False, 0) and "cannot read" in second["reason"]
    assert main(["audit", "verify", str(good)]) == 0


# ---------------------------------------------------------------------------- in process
def test_main_returns_codes_in_process(capsys):
    assert main(["graph", "--format", "dot"]) == 0
    assert capsys.readouterr().out == dot(LifecyclePolicy())
    assert main(["graph", "--format", "png"]) == 2
    assert main(["--help"]) == 0


def test_pipeline_demo_missing_is_one_clear_line(monkeypatch, capsys):
    saved = structlog.get_config()
    monkeypatch.setitem(sys.modules, "lifecycle._cli.pipeline_demo", None)  # import now fails
    try:
        code = main(["demo", "--pipeline", "flux", "--quiet"])
    finally:
        structlog.configure(**saved)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "--pipeline needs lifecycle._cli.pipeline_demo.run_pipeline_demo" in err[0]


def test_show_reads_what_it_can_and_gives_the_verdict(tmp_path, capsys):
    event = {
        "event": "lifecycle.transition", "module": "dit", "module_id": "m1", "trigger": "mount_cache",
        "source": "Loaded", "dest": "CacheMounted", "outcome": "ok", "duration_ms": 1234.5,
        "backend": "cpu", "policy": {"cache_dit": True, "compile": True}, "seq": 1,
        "timestamp": "2026-01-02T03:04:05.678901Z",
    }
    path = tmp_path / "torn.jsonl"
    path.write_text(json.dumps(event) + "\n" + '{"event": "lifecycle.req')
    assert main(["audit", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "dit  (module_id m1, backend cpu, policy cache_dit=True, compile=True)" in out
    assert "03:04:05.678" in out and "mount_cache" in out and "1.23 s" in out
    assert "verify: " in out and ":2: torn last line" in out


def test_progress_ticks_on_a_terminal():
    import io
    import time

    from lifecycle._cli.progress import Progress

    stream = io.StringIO()
    progress = Progress(stream, tty=True)
    progress.start_next("dit", LifecyclePolicy(), State.COMPILED)
    time.sleep(0.35)
    progress.done("dit: warm_up finished")
    progress.close()
    text = stream.getvalue()
    assert "dit: warm_up (Compiled -> WarmedUp)" in text and " s" in text  # the ticking line
    assert text.endswith("\r\033[K[ok] dit: warm_up finished\n")
    plain = io.StringIO()
    quiet = Progress(plain, tty=False)
    quiet.start_next("dit", LifecyclePolicy(compile=False), State.LOADED)
    quiet.close()
    assert plain.getvalue() == "[..] dit: mount_cache (Loaded -> CacheMounted)\n"


# ---------------------------------------------------------------------------- start-up
HEAVY = ("torch", "diffusers", "cache_dit", "transitions", "numpy", "adapters")
_FRESH = """
import json, runpy, sys
out, args, heavy_roots = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
sys.argv = ["lifecycle", *args]
code = 0
try:
    runpy.run_module("lifecycle", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m.partition(".")[0] in heavy_roots)
core = sorted(m for m in sys.modules if m in ("lifecycle._module", "lifecycle._pipeline"))
open(out, "w").write(json.dumps({"code": code, "heavy": heavy, "core": core}))
"""


@pytest.mark.parametrize("args", [("graph",), ("graph", "--no-cache", "--format", "dot"),
                                  ("audit", "verify", "{empty}"), ("audit", "show", "{audit}")],
                         ids=["graph", "graph-dot", "verify", "show"])
def test_graph_and_audit_never_import_torch(tmp_path, args):
    """In a fresh interpreter, as ``python -m lifecycle`` runs them: torch and the core stay out."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    audit = tmp_path / "audit.jsonl"
    audit.write_text(json.dumps({
        "event": "lifecycle.transition", "module": "dit", "module_id": "m1", "trigger": "mount_cache",
        "source": "Loaded", "dest": "CacheMounted", "outcome": "ok", "duration_ms": 1.0,
        "backend": "cpu", "policy": {"cache_dit": True, "compile": True}, "seq": 1,
    }) + "\n")
    argv = [a.format(empty=empty, audit=audit) for a in args]
    out = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", _FRESH, str(out), json.dumps(argv), json.dumps(HEAVY)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    found = json.loads(out.read_text())
    assert found == {"code": 0, "heavy": [], "core": []}, found
    assert run.stdout  # the command really ran and printed


def _interrupt_during(needle: str, *args: str) -> tuple[int, list[str]]:
    """Run the CLI with ``-X importtime``, send SIGINT as soon as ``needle`` is imported, and
    return the exit status and the stderr lines that are not import timings."""
    import signal

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # A child inherits an ignored SIGINT (a test runner's worker may ignore it), and Python then
    # installs no KeyboardInterrupt handler: start it with the default disposition, as a shell would.
    child = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "lifecycle", *args], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert child.stderr is not None
    sent = False
    for line in child.stderr:
        if line.startswith("import time:") and line.rsplit("|", 1)[-1].strip().partition(".")[0] == needle:
            child.send_signal(signal.SIGINT)
            sent = True
            break
    rest = child.stderr.read()
    code = child.wait(timeout=120)
    assert sent, f"{needle} was never imported"
    return code, [line for line in rest.splitlines() if not line.startswith("import time:")]


@pytest.mark.parametrize("needle", ["argparse", "structlog", "torch"])
def test_ctrl_c_during_start_up_is_one_line_and_130(needle):
    code, lines = _interrupt_during(needle, "demo", "--backend", "cpu", "--quiet")
    assert (code, lines) == (130, ["dit-lifecycle: interrupted"])


def test_ctrl_c_in_a_command_is_one_line_and_130(monkeypatch, capsys):
    from lifecycle._cli import commands

    def interrupted(_args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "_cmd_graph", interrupted)
    assert main(["graph"]) == 130
    assert capsys.readouterr().err == "dit-lifecycle: interrupted\n"


# ---------------------------------------------------------------------------- defect 9, from the CLI
def test_deeply_nested_audit_is_one_line_in_verify_and_show(tmp_path, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    run = cli("audit", "verify", str(deep))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [f"{deep}:1: not valid JSON (nested deeper than the JSON "
                                               "reader can follow; an audit event is flat): "
                                               + repr("[" * 60 + "...")]
    assert main(["audit", "show", str(deep)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith(f"verify: {deep}:1: not valid JSON (nested deeper")


# ---------------------------------------------------------------------------- formatting
def test_one_duration_format_and_one_table():
    from lifecycle._cli.format import ms, table

    assert [ms(v) for v in (0.04, 999.94, 1000, 1234.5, None, True, "3")] == [
        "0.0 ms", "999.9 ms", "1.00 s", "1.23 s", "?", "?", "?"]
    assert table(["a", "num"], [["xyz", 1], ["b", 22]], right=(1,)).splitlines() == [
        "a    num", "---  ---", "xyz    1", "b     22"]


def test_show_marks_a_request_the_table_forbids(tmp_path, capsys):
    base = {"module": "dit", "module_id": "m1", "outcome": "ok", "duration_ms": 2.0, "backend": "cpu",
            "policy": {"cache_dit": True, "compile": True}}
    mount = {**base, "event": "lifecycle.transition", "trigger": "mount_cache", "source": "Loaded",
             "dest": "CacheMounted", "seq": 1}
    request = {**base, "event": "lifecycle.request", "request_id": "early", "num_inference_steps": 4,
               "cached_steps": 0, "new_graphs": 0}
    path = tmp_path / "early.jsonl"
    path.write_text(json.dumps(mount) + "\n" + json.dumps(request) + "\n")
    assert main(["audit", "show", str(path)]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if "request early" in line]
    assert "ILLEGAL: no request from CacheMounted in the table" in row
    assert ":2: request 'early'" in out and "ran (ok) in CacheMounted" in out  # the verdict agrees
