"""The audit goes through the host's logging: structlog when the host configured structlog,
otherwise the standard ``logging`` logger ``dit_lifecycle``, decided per event.

The host set-ups run in subprocesses (structlog's configuration is process-wide, and a test
process that ever used ``capture_logs`` stays configured): a real tiny Flux is prepared and
served there, and what reached stdout, the host's handlers and structlog's JSON lines is parsed
back here.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import structlog

from lifecycle import IllegalTransitionError, LifecyclePolicy, ModuleLifecycle
from lifecycle.audit import LOGGER_NAME, TRANSITION_KEYS
from lifecycle.audit.route import AuditLogger, render

ROOT = Path(__file__).resolve().parent.parent

# A host script: a README-style lifecycle of the tiny Flux; ``records`` collects what the host's
# handler received from the library's logger (level, message, event, fields).
PRELUDE = """
import json, logging, sys
import structlog

class Collect(logging.Handler):
    def __init__(self, level):
        super().__init__(level)
        self.records = []

    def emit(self, record):
        if record.name == "dit_lifecycle":
            self.records.append({"level": record.levelname, "message": record.getMessage(),
                                 "event": record.event, "fields": record.fields})

def lifecycle():
    from lifecycle import ModuleLifecycle
    from lifecycle.testing.tiny import demo_cache_config, flux_inputs, tiny_flux
    return ModuleLifecycle(tiny_flux(), name="transformer", backend="cpu",
                           cache_config=demo_cache_config(8), compile_options={"backend": "aot_eager"})

def refused(lc):
    from lifecycle import IllegalTransitionError
    try:
        lc.compile()
    except IllegalTransitionError:
        return True
    return False

def serve(lc, request_id):
    from lifecycle.testing.tiny import denoise, flux_inputs
    with lc.request(num_inference_steps=8, request_id=request_id):
        denoise(lc.module, flux_inputs(), steps=8)
"""

# Only ``logging.basicConfig(level=WARNING)``: prepare, a refused call, a request; then the host
# lowers its level to INFO at run time and serves one more request with a bound contextvar.
LOGGING_ONLY = """
logging.basicConfig(level=logging.WARNING)
handler = Collect(logging.WARNING)
logging.getLogger().addHandler(handler)
from lifecycle.testing.tiny import denoiser, flux_inputs
lc = lifecycle()
lc.prepare(denoiser(flux_inputs(), 2))
was_refused = refused(lc)
serve(lc, "r-1")
warning_phase = list(handler.records)
logging.getLogger().setLevel(logging.INFO)
handler.setLevel(logging.INFO)
with structlog.contextvars.bound_contextvars(rank=3):
    serve(lc, "r-2")
json.dump({"refused": was_refused, "ready": lc.ready, "warning_phase": warning_phase,
           "info_phase": handler.records[len(warning_phase):],
           "structlog_configured": structlog.is_configured()}, open(sys.argv[1], "w"))
"""

# The host configures structlog (JSON to stdout) after a first event: that event goes to
# ``logging``, every later one through structlog's processors only.
STRUCTLOG_LATER = """
logging.basicConfig(level=logging.INFO)
handler = Collect(logging.INFO)
logging.getLogger().addHandler(handler)
lc = lifecycle()
before = refused(lc)
structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
                    logger_factory=structlog.PrintLoggerFactory(sys.stdout))
from lifecycle.testing.tiny import denoiser, flux_inputs
lc.prepare(denoiser(flux_inputs(), 2))
after = refused(lc)
json.dump({"refused": [before, after], "records": handler.records}, open(sys.argv[1], "w"))
"""


def _host(script: str, tmp_path: Path) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    out = tmp_path / "result.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        # cache-dit prints its own INFO lines to stdout through a handler of its own; that is
        # cache-dit's logging, not ours, and quieted here with cache-dit's own setting.
        "CACHE_DIT_LOG_LEVEL": "error",
    }
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PRELUDE) + textwrap.dedent(script), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text()), run


def test_logging_only_host_gets_events_through_its_handlers_and_levels(tmp_path: Path) -> None:
    result, run = _host(LOGGING_ONLY, tmp_path)
    assert result["refused"] and result["ready"] and not result["structlog_configured"]
    # Nothing printed by the library on its own: stdout is empty.
    assert run.stdout == ""
    # The WARNING-level handler received the refused call only (prepare's three transitions and
    # the request are info events, below the host's level).
    (warning,) = result["warning_phase"]
    assert warning["level"] == "WARNING" and warning["event"] == "lifecycle.transition"
    fields = warning["fields"]
    assert set(TRANSITION_KEYS) <= set(fields)
    assert (fields["trigger"], fields["source"], fields["outcome"]) == ("compile", "WarmedUp", "refused")
    assert fields["module"] == "transformer" and fields["seq"] == 4 and "error" in fields
    assert warning["message"].startswith("lifecycle.transition module=transformer ")
    assert "trigger=compile" in warning["message"] and "outcome=refused" in warning["message"]
    # ... and printed it the host's way (basicConfig's format, on stderr).
    assert "WARNING:dit_lifecycle:lifecycle.transition module=transformer" in run.stderr
    # At INFO the request event arrives, with the contextvars the host bound.
    events = {record["event"]: record for record in result["info_phase"]}
    request = events["lifecycle.request"]
    assert request["level"] == "INFO"
    assert request["fields"]["request_id"] == "r-2" and request["fields"]["rank"] == 3
    assert request["fields"]["outcome"] == "ok" and request["fields"]["new_graphs"] == 0
    assert "request_id=r-2" in request["message"]
    assert all(record["level"] in ("INFO", "WARNING") for record in result["info_phase"])


def test_structlog_host_gets_events_through_its_processors_from_the_next_event_on(tmp_path: Path) -> None:
    result, run = _host(STRUCTLOG_LATER, tmp_path)
    assert result["refused"] == [True, True]
    # Before structlog was configured: the refused call reached the logging handler.
    (first,) = result["records"]
    assert first["level"] == "WARNING" and first["fields"]["source"] == "Loaded"
    # After: every event is a JSON line of the host's structlog chain on stdout, none a record.
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    transitions = [e for e in lines if e["event"] == "lifecycle.transition"]
    assert [(e["trigger"], e["outcome"], e["level"]) for e in transitions] == [
        ("mount_cache", "ok", "info"),
        ("compile", "ok", "info"),
        ("warm_up", "ok", "info"),
        ("compile", "refused", "warning"),
    ]
    assert [e["seq"] for e in transitions] == [2, 3, 4, 5]
    assert all(set(TRANSITION_KEYS) <= set(e) for e in transitions)


def test_capture_logs_sees_events() -> None:
    """``structlog.testing.capture_logs`` counts as configured structlog: it sees the events."""
    from torch import nn

    lc = ModuleLifecycle(nn.Linear(2, 2), name="plain", backend="cpu",
                         policy=LifecyclePolicy(cache_dit=False, compile=False))
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(IllegalTransitionError):
            lc.compile()
    (event,) = [e for e in logs if e["event"] == "lifecycle.transition"]
    assert (event["trigger"], event["outcome"], event["log_level"]) == ("compile", "refused", "warning")


def test_render_is_the_event_then_readable_pairs() -> None:
    text = render("lifecycle.transition", {
        "module": "transformer", "seq": 3, "duration_ms": 1.5, "error": "it's 100% broken",
        "policy": {"cache_dit": True}, "empty": "", "none": None,
    })
    assert text == (
        "lifecycle.transition module=transformer seq=3 duration_ms=1.5 error=\"it's 100% broken\" "
        "policy={'cache_dit': True} empty='' none=None"
    )


def test_logging_path_record_carries_fields_and_survives_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without structlog configured a record's message is rendered once, never %-formatted
    again (an error text with ``%`` in it stays intact), and its fields are a dict."""
    received: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            received.append(record)

    log = AuditLogger("dit_lifecycle_test_route")
    std = logging.getLogger("dit_lifecycle_test_route")
    handler = Keep(logging.DEBUG)
    std.addHandler(handler)
    std.setLevel(logging.INFO)
    std.propagate = False
    monkeypatch.setattr(structlog, "is_configured", lambda: False)  # read at the first event
    try:
        log.debug("lifecycle.cache_refresh", module="m")  # below the logger's level: no record
        assert not log.is_enabled_for(logging.DEBUG)
        log.error("lifecycle.request", module="m", error="50% done")
    finally:
        std.removeHandler(handler)
    (record,) = received
    assert record.levelno == logging.ERROR and record.name == "dit_lifecycle_test_route"
    assert record.getMessage() == "lifecycle.request module=m error='50% done'"
    assert record.event == "lifecycle.request"  # type: ignore[attr-defined]
    assert record.fields == {"module": "m", "error": "50% done"}  # type: ignore[attr-defined]


def test_the_library_logger_has_only_a_null_handler() -> None:
    """Nothing of ours prints on its own: the library's logger carries a NullHandler (so
    logging's last-resort handler stays silent) and no other handler, and keeps propagating."""
    import lifecycle.audit  # noqa: F401  (installs the NullHandler)

    std = logging.getLogger(LOGGER_NAME)
    assert [type(h) for h in std.handlers] == [logging.NullHandler]
    assert std.propagate and std.level == logging.NOTSET
