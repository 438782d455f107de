"""``audit show FILE``: a readable timeline per module of a JSONL audit."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lifecycle import audit
from lifecycle.audit.verify import AuditFormatError, read_events, verify_file


def _time(event: Mapping[str, Any]) -> str:
    stamp = event.get("timestamp")
    if not isinstance(stamp, str):
        return "-"
    # ISO 8601 from structlog's TimeStamper: keep the time of day, to the millisecond.
    clock = stamp.split("T", 1)[-1].rstrip("Z").split("+", 1)[0]
    return clock[:12]


def _ms(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "?"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.1f} ms"


def _row(event: Mapping[str, Any]) -> tuple[str, str, str, str, str, str]:
    """(time, seq, what, detail, outcome, duration) for one lifecycle event."""
    name = event.get("event")
    outcome = str(event.get("outcome", ""))
    if name == audit.TRANSITION_EVENT:
        detail = f"{event.get('source')} -> {event.get('dest')}"
        if event.get("error"):
            detail += f"  [{event['error']}]"
        return (_time(event), str(event.get("seq", "")), str(event.get("trigger")), detail, outcome,
                _ms(event.get("duration_ms")))
    if name == audit.REQUEST_EVENT:
        detail = (
            f"{event.get('num_inference_steps')} steps, {event.get('cached_steps')} cached, "
            f"{event.get('new_graphs')} new graphs"
        )
        if event.get("error"):
            detail += f"  [{event['error']}]"
        return (_time(event), "", f"request {event.get('request_id')}", detail, outcome,
                _ms(event.get("duration_ms")))
    if name == audit.RECOMPILE_EVENT:
        detail = f"{event.get('new_graphs')} graph(s) compiled after warm-up"
        if event.get("request_id"):
            detail += f" (request {event['request_id']})"
        return (_time(event), "", "RECOMPILE", detail, "warning", "")
    short = str(name).removeprefix("lifecycle.")
    skip = {"event", "module", "module_id", "timestamp", "level", "policy", "backend"}
    detail = ", ".join(f"{k}={v}" for k, v in event.items() if k not in skip)
    return (_time(event), "", short, detail, outcome or str(event.get("level", "")), "")


def render_timeline(path: str | os.PathLike[str]) -> str:
    """The timeline text, then the verifier's verdict on the file.

    Reads what it can: a bad line stops the timeline there, and the verdict names it.
    """
    modules: dict[str, dict[str, Any]] = {}
    try:
        for _line, event in read_events(path):
            name = event.get("event")
            if not isinstance(name, str) or not name.startswith("lifecycle."):
                continue
            key = str(event.get("module_id", event.get("module", "?")))
            entry = modules.setdefault(key, {"first": event, "rows": []})
            entry["rows"].append(_row(event))
    except AuditFormatError:
        pass  # the verdict below reports it
    blocks = []
    for module_id, entry in modules.items():
        first = entry["first"]
        policy = first.get("policy")
        policy_text = (
            ", ".join(f"{k}={v}" for k, v in policy.items()) if isinstance(policy, dict) else "?"
        )
        header = (
            f"{first.get('module', '?')}  (module_id {module_id}, backend {first.get('backend', '?')}, "
            f"policy {policy_text})"
        )
        rows = [("time", "seq", "event", "detail", "outcome", "duration"), *entry["rows"]]
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines = [header]
        for row in rows:
            cells = [cell.rjust(w) if i in (1, 5) else cell.ljust(w) for i, (cell, w) in
                     enumerate(zip(row, widths, strict=True))]
            lines.append(("  " + "  ".join(cells)).rstrip())
        blocks.append("\n".join(lines))
    if not blocks:
        blocks.append(f"{os.fspath(path)}: no lifecycle events")
    verdict = verify_file(path)
    blocks.append(f"verify: {verdict}")
    return "\n\n".join(blocks) + "\n"


__all__ = ["render_timeline"]
