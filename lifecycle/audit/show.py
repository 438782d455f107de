"""``audit show FILE``: a readable timeline per module of a JSONL audit, then the verifier's
verdict. Streams: rows are spooled per module (to disk past 1 MiB), so a big audit is shown in
bounded memory. A request row that ran where the table has no ``request`` is marked."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import IO, Any, TextIO

from lifecycle._cli.format import ms, table_lines
from lifecycle.audit import events as audit
from lifecycle.audit.verify import AuditFormatError, VerifyResult, read_events, short, verify_file
from states import LifecyclePolicy, State, Trigger, destination

HEADERS = ("time", "seq", "event", "detail", "outcome", "duration")
_RIGHT = (1, 5)  # seq and duration
_SPOOL_BYTES = 1 << 20
_SKIP = frozenset({"event", "module", "module_id", "timestamp", "level", "policy", "backend"})


def _time(event: Mapping[str, Any]) -> str:
    stamp = event.get("timestamp")
    if not isinstance(stamp, str):
        return "-"
    # ISO 8601 from structlog's TimeStamper: keep the time of day, to the millisecond.
    clock = stamp.split("T", 1)[-1].rstrip("Z").split("+", 1)[0]
    return clock[:12]


def _text(value: Any, limit: int = 80) -> str:
    """A value as a table cell: on one line, cut to ``limit``, safe for any nesting."""
    text = value if isinstance(value, str) else short(value, limit)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _duration(value: Any) -> str:
    """``ms`` for a cell, bounded: an integer too large for a float (valid JSON, and the
    verifier accepts it) is shown in scientific notation instead of failing the timeline."""
    try:
        return ms(value)
    except OverflowError:
        return f"{Decimal(value) / 1000:.2e} s"


def _policy(event: Mapping[str, Any]) -> LifecyclePolicy | None:
    data = event.get("policy")
    try:
        return LifecyclePolicy.from_dict(data) if isinstance(data, dict) else None
    except (ValueError, TypeError, RecursionError):
        return None


@dataclass
class _Block:
    """One module's rows, spooled, and what the timeline knows of its state."""

    header: str
    policy: LifecyclePolicy | None
    state: State = State.LOADED
    widths: list[int] = field(default_factory=lambda: [len(h) for h in HEADERS])
    spool: IO[str] = field(
        default_factory=lambda: tempfile.SpooledTemporaryFile(_SPOOL_BYTES, mode="w+", encoding="utf-8")
    )

    def add(self, row: tuple[str, ...]) -> None:
        self.widths = [max(width, len(cell)) for width, cell in zip(self.widths, row, strict=True)]
        self.spool.write(json.dumps(row) + "\n")

    def rows(self) -> Iterator[list[str]]:
        self.spool.seek(0)
        for line in self.spool:
            yield [str(cell) for cell in json.loads(line)]


def _transition_row(event: Mapping[str, Any], block: _Block) -> tuple[str, ...]:
    detail = f"{_text(event.get('source'))} -> {_text(event.get('dest'))}"
    if event.get("error"):
        detail += f"  [{_text(event['error'], 160)}]"
    if event.get("outcome") == "ok":
        try:
            block.state = State(event.get("dest"))
        except ValueError:
            pass
    return (_time(event), _text(event.get("seq", "")), _text(event.get("trigger")), detail,
            _text(event.get("outcome", "")), _duration(event.get("duration_ms")))


def _request_row(event: Mapping[str, Any], block: _Block) -> tuple[str, ...]:
    detail = (
        f"{_text(event.get('num_inference_steps'))} steps, {_text(event.get('cached_steps'))} cached, "
        f"{_text(event.get('new_graphs'))} new graphs"
    )
    if event.get("error"):
        detail += f"  [{_text(event['error'], 160)}]"
    policy = block.policy or LifecyclePolicy()
    if event.get("outcome") != "refused" and destination(policy, block.state, Trigger.REQUEST) is None:
        detail += f"  [ILLEGAL: no request from {block.state.value} in the table]"
    return (_time(event), "", f"request {_text(event.get('request_id'))}", detail,
            _text(event.get("outcome", "")), _duration(event.get("duration_ms")))


def _row(event: Mapping[str, Any], block: _Block) -> tuple[str, ...]:
    """(time, seq, what, detail, outcome, duration) for one lifecycle event."""
    name = event.get("event")
    if name == audit.TRANSITION_EVENT:
        return _transition_row(event, block)
    if name == audit.REQUEST_EVENT:
        return _request_row(event, block)
    if name == audit.RECOMPILE_EVENT:
        detail = f"{_text(event.get('new_graphs'))} graph(s) compiled after warm-up"
        if event.get("request_id"):
            detail += f" (request {_text(event['request_id'])})"
        return (_time(event), "", "RECOMPILE", detail, "warning", "")
    detail = ", ".join(f"{_text(k, 40)}={_text(v, 60)}" for k, v in event.items() if k not in _SKIP)
    return (_time(event), "", _text(name).removeprefix("lifecycle."), _text(detail, 240),
            _text(event.get("outcome", event.get("level", ""))), "")


def _header(event: Mapping[str, Any], module_id: str, policy: LifecyclePolicy | None) -> str:
    policy_text = f"cache_dit={policy.cache_dit}, compile={policy.compile}" if policy else "?"
    return (
        f"{_text(event.get('module', '?'))}  (module_id {module_id}, backend "
        f"{_text(event.get('backend', '?'))}, policy {policy_text})"
    )


def write_timeline(path: str | os.PathLike[str], out: TextIO) -> VerifyResult:
    """Write the timeline of ``path`` to ``out``, then the verifier's verdict; return it.

    Reads what it can: a bad line stops the timeline there, and the verdict names it.

    Args:
        path: the JSONL audit file.
        out: where the text goes.

    Raises:
        OSError: ``out`` cannot be written (a bad or unreadable audit file is in the verdict).

    Example::

        verdict = write_timeline("audit.jsonl", sys.stdout)
        sys.exit(0 if verdict.ok else 1)
    """
    blocks: dict[str, _Block] = {}
    try:
        try:
            for _line, event in read_events(path):
                name = event.get("event")
                if not isinstance(name, str) or not name.startswith("lifecycle."):
                    continue
                key = _text(event.get("module_id", event.get("module", "?")))
                block = blocks.get(key)
                if block is None:
                    policy = _policy(event)
                    block = blocks[key] = _Block(_header(event, key, policy), policy)
                block.add(_row(event, block))
        except (AuditFormatError, OSError):
            pass  # the verdict below reports it
        first = True
        for block in blocks.values():
            out.write(("" if first else "\n") + block.header + "\n")
            first = False
            for line in table_lines(HEADERS, block.rows(), block.widths, right=_RIGHT, indent="  "):
                out.write(line + "\n")
    finally:
        for block in blocks.values():
            block.spool.close()
    if not blocks:
        out.write(f"{os.fspath(path)}: no lifecycle events\n")
    verdict = verify_file(path)
    out.write(f"\nverify: {verdict}\n")
    return verdict


def render_timeline(path: str | os.PathLike[str]) -> str:
    """The timeline text, then the verifier's verdict on the file (see ``write_timeline``).

    Args:
        path: the JSONL audit file (a bad or unreadable one is named in the verdict).

    Example::

        print(render_timeline("audit.jsonl"))
    """
    buffer = io.StringIO()
    write_timeline(path, buffer)
    return buffer.getvalue()


__all__ = ["render_timeline", "write_timeline"]
