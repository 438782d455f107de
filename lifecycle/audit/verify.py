"""Replay JSONL audits and check them against the legal-transition table.

The rules are not copied here: every ``ok`` transition is checked with ``states.destination``
under the policy the event itself recorded, exactly as the lifecycle checked it when it ran.
Per ``module_id``: ``seq`` runs from 1 without gaps, each transition starts where the previous
one left the module, refused and failed transitions leave the state unchanged, and requests
that ran (``ok`` or ``failed``) ran in ``WarmedUp``. Each file is replayed on its own, and
reading stops at the first problem: after it, nothing later in the file can be trusted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lifecycle import audit
from states import LifecyclePolicy, State, Trigger, destination, explain_illegal

_STATE_NAMES = ", ".join(state.value for state in State)
_TRIGGER_NAMES = ", ".join(trigger.value for trigger in Trigger)


class AuditFormatError(ValueError):
    """One line of an audit file cannot be read as an event (or replayed)."""

    def __init__(self, line: int, reason: str, *, torn: bool = False) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason
        self.torn = torn


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of replaying one audit file. ``line`` and ``reason`` name the first problem
    (``line`` is 0 when the file itself cannot be read); both are None when the file is clean."""

    file: str
    line: int | None = None
    reason: str | None = None
    torn: bool = False
    events: int = 0
    modules: int = 0
    transitions: int = 0
    requests: int = 0
    recompiles: int = 0

    @property
    def ok(self) -> bool:
        return self.reason is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "ok": self.ok,
            "line": self.line,
            "reason": self.reason,
            "torn": self.torn,
            "events": self.events,
            "modules": self.modules,
            "transitions": self.transitions,
            "requests": self.requests,
            "recompiles": self.recompiles,
        }

    def __str__(self) -> str:
        if self.ok:
            recompiles = f", {self.recompiles} recompile event(s)" if self.recompiles else ""
            return (
                f"{self.file}: OK ({self.events} lifecycle events: {self.transitions} transitions, "
                f"{self.requests} requests, {self.modules} module(s){recompiles})"
            )
        return f"{self.file}:{self.line}: {self.reason}"


# ---------------------------------------------------------------------------- reading lines
def read_events(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, event)`` for every JSON object in a JSONL file, from line 1.

    Raises ``AuditFormatError`` at the first line that is not a JSON object (``torn=True``
    when it is the last line and has no newline: a writer stopped mid-line) and ``OSError``
    when the file cannot be read. Blank lines are skipped.
    """
    with Path(path).open("rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")
    # A file that ends with "\n" splits into a last empty chunk; otherwise the last line is
    # unterminated, which JsonlSink never writes unless it was interrupted.
    unterminated = lines[-1] != b""
    if not unterminated:
        lines.pop()
    last = len(lines)
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            value = json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            if number == last and unterminated:
                raise AuditFormatError(
                    number,
                    f"torn last line: it ends after {len(raw)} bytes without a newline (the writer "
                    "stopped mid-line, e.g. a crash); the lines before it are complete",
                    torn=True,
                ) from exc
            raise AuditFormatError(number, f"not valid JSON ({_json_reason(exc)}): {_preview(raw)}") from exc
        if not isinstance(value, dict):
            kind = type(value).__name__
            raise AuditFormatError(number, f"a JSON {kind}, not an object (one event per line)")
        yield number, value


def _json_reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    return str(exc)


def _preview(raw: bytes, limit: int = 60) -> str:
    text = raw.decode("utf-8", errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ---------------------------------------------------------------------------- replay
@dataclass
class _Module:
    """What the replay knows about one lifecycle (one ``module_id``)."""

    name: str
    module_id: str
    policy: LifecyclePolicy
    state: State = State.LOADED
    seq: int = 0
    last_line: int = 0

    def label(self) -> str:
        return f"module {self.name!r} (module_id {self.module_id})"


@dataclass
class Replay:
    """Replays events one at a time; raises ``AuditFormatError`` at the first problem."""

    modules: dict[str, _Module] = field(default_factory=dict)
    events: int = 0
    transitions: int = 0
    requests: int = 0
    recompiles: int = 0

    def feed(self, line: int, event: Mapping[str, Any]) -> None:
        if "event" not in event:
            raise AuditFormatError(line, "missing key 'event' (every structlog event has one)")
        name = event["event"]
        if not isinstance(name, str) or not name.startswith("lifecycle."):
            return  # the host's own events may share the file
        self.events += 1
        if name == audit.TRANSITION_EVENT:
            self._transition(line, event)
        elif name == audit.REQUEST_EVENT:
            self._request(line, event)
        elif name == audit.RECOMPILE_EVENT:
            self.recompiles += 1

    # -- transitions
    def _transition(self, line: int, event: Mapping[str, Any]) -> None:
        _require(line, event, audit.TRANSITION_KEYS, audit.TRANSITION_EVENT)
        module = self._module(line, event)
        trigger = _enum(line, Trigger, event["trigger"], "trigger", _TRIGGER_NAMES)
        source = _enum(line, State, event["source"], "source", _STATE_NAMES)
        dest = _enum(line, State, event["dest"], "dest", _STATE_NAMES)
        outcome = _outcome(line, event)
        seq = event["seq"]
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise AuditFormatError(line, f"'seq' must be an integer, got {seq!r}")
        expected = module.seq + 1
        if seq != expected:
            if module.seq == 0:
                reason = (
                    f"{module.label()} starts at seq {seq}, not 1: its first "
                    f"{seq - 1 if seq > 1 else 'few'} event(s) are missing from this file"
                )
            elif seq > expected:
                reason = (
                    f"seq gap for {module.label()}: expected {expected} after line {module.last_line}, "
                    f"got {seq} (event(s) {expected}..{seq - 1} missing)"
                )
            else:
                reason = (
                    f"seq goes back for {module.label()}: expected {expected} after line "
                    f"{module.last_line}, got {seq} (a duplicated or reordered event)"
                )
            raise AuditFormatError(line, reason)
        where = f"after line {module.last_line}" if module.last_line else "at its start"
        if source is not module.state:
            raise AuditFormatError(
                line,
                f"{module.label()} seq {seq}: {trigger.value} starts from {source.value}, but the "
                f"module was in {module.state.value} {where}",
            )
        if outcome == "ok":
            legal = destination(module.policy, source, trigger)
            if legal is None:
                raise AuditFormatError(
                    line,
                    f"illegal transition for {module.label()} seq {seq}: {trigger.value} from "
                    f"{source.value} under policy {module.policy} "
                    f"({explain_illegal(module.policy, source, trigger)})",
                )
            if legal is not dest:
                raise AuditFormatError(
                    line,
                    f"{module.label()} seq {seq}: {trigger.value} from {source.value} leads to "
                    f"{legal.value} under policy {module.policy}, but the audit says {dest.value}",
                )
        else:
            if dest is not source:
                raise AuditFormatError(
                    line,
                    f"{module.label()} seq {seq}: a {outcome} transition leaves the state unchanged, "
                    f"but the audit says {source.value} -> {dest.value}",
                )
            _require(line, event, ("error",), f"{outcome} {audit.TRANSITION_EVENT}")
        module.state = dest
        module.seq = seq
        module.last_line = line
        self.transitions += 1

    def _module(self, line: int, event: Mapping[str, Any]) -> _Module:
        module_id = event["module_id"]
        if not isinstance(module_id, str) or not module_id:
            raise AuditFormatError(line, f"'module_id' must be a non-empty string, got {module_id!r}")
        policy_data = event["policy"]
        if not isinstance(policy_data, dict):
            raise AuditFormatError(
                line, f"'policy' must be an object like {{\"cache_dit\": true, \"compile\": true}}, "
                f"got {policy_data!r}"
            )
        try:
            policy = LifecyclePolicy.from_dict(policy_data)
        except ValueError as exc:
            raise AuditFormatError(line, f"bad 'policy': {exc}") from None
        module = self.modules.get(module_id)
        if module is None:
            module = _Module(str(event["module"]), module_id, policy)
            self.modules[module_id] = module
        elif module.policy != policy:
            raise AuditFormatError(
                line,
                f"{module.label()}: policy changed from {module.policy} to {policy}; "
                "a lifecycle's policy is fixed when it is built",
            )
        return module

    # -- requests
    def _request(self, line: int, event: Mapping[str, Any]) -> None:
        _require(line, event, audit.REQUEST_KEYS, audit.REQUEST_EVENT)
        outcome = _outcome(line, event)
        recorded = event.get("state")
        if recorded is not None:
            recorded = _enum(line, State, recorded, "state", _STATE_NAMES)
        self.requests += 1
        if outcome == "refused":
            return  # the lifecycle refused it, as it must outside WarmedUp
        module = self.modules.get(str(event["module_id"]))
        replayed = module.state if module is not None else State.LOADED
        label = module.label() if module else f"module {event['module']!r} (module_id {event['module_id']})"
        for state, how in ((replayed, "the transitions before it left it"), (recorded, "the event says")):
            if state is not None and state is not State.WARMED_UP:
                raise AuditFormatError(
                    line,
                    f"request {event['request_id']!r} of {label} ran ({outcome}) outside WarmedUp: "
                    f"the module was in {state.value} ({how}); requests are legal only in WarmedUp",
                )


def _require(line: int, event: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [key for key in keys if key not in event]
    if missing:
        names = ", ".join(repr(key) for key in missing)
        plural = "s" if len(missing) > 1 else ""
        raise AuditFormatError(line, f"missing key{plural} {names} in a {what} event")


def _enum(line: int, kind: Any, value: Any, key: str, known: str) -> Any:
    try:
        return kind(value)
    except (ValueError, TypeError):
        noun = "state" if kind is State else "trigger"
        raise AuditFormatError(line, f"unknown {noun} {value!r} in {key!r}; known: {known}") from None


def _outcome(line: int, event: Mapping[str, Any]) -> str:
    outcome = event["outcome"]
    if outcome not in audit.OUTCOMES:
        raise AuditFormatError(
            line, f"unknown outcome {outcome!r}; known: {', '.join(audit.OUTCOMES)}"
        )
    return str(outcome)


# ---------------------------------------------------------------------------- entry points
def verify_file(path: str | os.PathLike[str]) -> VerifyResult:
    """Replay one JSONL audit file; never raises for a bad or unreadable file."""
    name = os.fspath(path)
    replay = Replay()
    problem: AuditFormatError | None = None
    try:
        for line, event in read_events(path):
            replay.feed(line, event)
    except AuditFormatError as exc:
        problem = exc
    except OSError as exc:
        problem = AuditFormatError(0, f"cannot read the file: {exc.strerror or exc}")
    counts = {
        "events": replay.events,
        "modules": len(replay.modules),
        "transitions": replay.transitions,
        "requests": replay.requests,
        "recompiles": replay.recompiles,
    }
    if problem is None:
        return VerifyResult(name, **counts)
    return VerifyResult(name, problem.line, problem.reason, problem.torn, **counts)


def verify_files(paths: list[str | os.PathLike[str]]) -> list[VerifyResult]:
    """``verify_file`` for each path (each replayed on its own)."""
    return [verify_file(path) for path in paths]


__all__ = ["AuditFormatError", "Replay", "VerifyResult", "read_events", "verify_file", "verify_files"]
