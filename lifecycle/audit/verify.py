"""Replay JSONL audits and check them against the legal-transition table.

The rules are not copied here: every ``ok`` transition, and every request that ran, is checked
with ``states.destination`` (a request is the table's ``request`` trigger) under the policy the
event recorded, exactly as the lifecycle checked it when it ran. Per ``module_id``: ``seq`` runs
from 1 without gaps, each transition starts where the previous one left the module, refused and
failed transitions leave the state unchanged. Each file is replayed on its own, streaming (the
memory used does not grow with the file), and reading stops at the first problem: after it,
nothing later in the file can be trusted.

Torn lines: a writer that crashes mid-line leaves its last line unterminated. At the end of the
file that is reported as a torn last line. When a later ``JsonlSink`` opened the file, it ended
that line and wrote a ``lifecycle.audit_resumed`` line after it: such a torn line is a recorded
crash, listed in ``VerifyResult.repaired``, and the lines after it are checked as usual. A line
that is not JSON anywhere else is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any, TypeVar

from lifecycle.audit import events as audit
from states import LifecyclePolicy, State, Trigger, destination, explain_illegal

_STATE_NAMES = ", ".join(state.value for state in State)
_TRIGGER_NAMES = ", ".join(trigger.value for trigger in Trigger)
# No audit event is anywhere near this long; a longer line is refused without being held whole.
MAX_LINE_BYTES = 16 << 20
_E = TypeVar("_E", bound=Enum)


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
    (``line`` is 0 when the file itself cannot be read); both are None when the file is clean.
    ``repaired`` lists torn lines that a later writer's ``lifecycle.audit_resumed`` follows.

    Example::

        result = verify_file("audit.jsonl")
        if not result.ok:
            print(result.line, result.reason, result.as_dict())
    """

    file: str
    line: int | None = None
    reason: str | None = None
    torn: bool = False
    events: int = 0
    modules: int = 0
    transitions: int = 0
    requests: int = 0
    recompiles: int = 0
    repaired: tuple[int, ...] = ()

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
            "repaired": list(self.repaired),
        }

    def __str__(self) -> str:
        if self.ok:
            recompiles = f", {self.recompiles} recompile event(s)" if self.recompiles else ""
            repaired = (
                f"; torn line(s) {', '.join(map(str, self.repaired))} from a crash, resumed after"
                if self.repaired else ""
            )
            return (
                f"{self.file}: OK ({self.events} lifecycle events: {self.transitions} transitions, "
                f"{self.requests} requests, {self.modules} module(s){recompiles}{repaired})"
            )
        return f"{self.file}:{self.line}: {self.reason}"


# ---------------------------------------------------------------------------- reading lines
def _raw_lines(handle: IO[bytes]) -> Iterator[tuple[int, bytes, bool]]:
    """``(number, line without its newline, terminated)``, one line in memory at a time."""
    number = 0
    while True:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        number += 1
        terminated = raw.endswith(b"\n")
        if not terminated and len(raw) > MAX_LINE_BYTES:
            raise AuditFormatError(
                number,
                f"line longer than {MAX_LINE_BYTES >> 20} MiB; an audit event is never that long "
                "(not an audit file, or a damaged one)",
            )
        yield number, raw[:-1] if terminated else raw, terminated


class _NotJson(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _NotJson("not UTF-8") from None
    except RecursionError:
        raise _NotJson("nested deeper than the JSON reader can follow; an audit event is flat") from None
    except json.JSONDecodeError as exc:
        raise _NotJson(f"{exc.msg} at column {exc.colno}") from None
    except ValueError as exc:  # e.g. an integer with too many digits
        raise _NotJson(_cut(str(exc))) from None


def read_events(
    path: str | os.PathLike[str], *, repaired: list[int] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, event)`` for every JSON object in a JSONL file, from line 1,
    streaming (one line in memory at a time). Blank lines are skipped.

    Raises ``AuditFormatError`` at the first line that is not a JSON object (``torn=True`` when
    it is the last line and has no newline: a writer stopped mid-line), and ``OSError`` when
    the file cannot be read. A non-JSON line that a ``lifecycle.audit_resumed`` line follows is
    a torn line a later writer repaired: its number is appended to ``repaired`` (when given)
    and reading goes on.
    """
    with Path(path).open("rb") as handle:
        pending: AuditFormatError | None = None
        for number, raw, terminated in _raw_lines(handle):
            if not raw.strip():
                continue
            try:
                value = _parse(raw)
            except _NotJson as bad:
                if pending is not None:
                    raise pending from None
                if not terminated:
                    raise AuditFormatError(
                        number,
                        f"torn last line: it ends after {len(raw)} bytes without a newline (the "
                        "writer stopped mid-line, e.g. a crash); the lines before it are complete",
                        torn=True,
                    ) from None
                hint = (
                    "; it looks cut short: a writer crashed mid-line and another appended after it "
                    "without ending the line (JsonlSink ends it when it opens the file)"
                    if raw.lstrip().startswith(b"{") else ""
                )
                pending = AuditFormatError(number, f"not valid JSON ({bad.reason}): {_preview(raw)}{hint}")
                continue
            if pending is not None:
                if isinstance(value, dict) and value.get("event") == audit.RESUMED_EVENT:
                    if repaired is not None:
                        repaired.append(pending.line)
                    pending = None
                else:
                    raise pending
            if not isinstance(value, dict):
                kind = "list" if isinstance(value, list) else type(value).__name__
                raise AuditFormatError(number, f"a JSON {kind}, not an object (one event per line)")
            yield number, value
        if pending is not None:
            raise pending


def _preview(raw: bytes, limit: int = 60) -> str:
    text = raw[: limit * 4].decode("utf-8", errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: Any, limit: int = 80) -> str:
    """``repr`` of an event value for a one-line reason: cut to ``limit`` characters, and safe
    for values nested too deeply to print."""
    try:
        return _cut(repr(value), limit)
    except RecursionError:
        return f"<a {type(value).__name__} nested too deeply to print>"


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
        try:
            if name == audit.TRANSITION_EVENT:
                self._transition(line, event)
            elif name == audit.REQUEST_EVENT:
                self._request(line, event)
            elif name == audit.RECOMPILE_EVENT:
                self.recompiles += 1
        except RecursionError:
            raise AuditFormatError(line, f"a {name} event nested too deeply to replay") from None

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
            raise AuditFormatError(line, f"'seq' must be an integer, got {short(seq)}")
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
            raise AuditFormatError(line, f"'module_id' must be a non-empty string, got {short(module_id)}")
        policy = _policy(line, event["policy"])
        module = self.modules.get(module_id)
        if module is None:
            module = _Module(short(event["module"]) if not isinstance(event["module"], str)
                             else event["module"], module_id, policy)
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
        """A request is the table's ``request`` trigger: one that ran (ok or failed) must be
        legal from the state the module was in, as replayed and as the event recorded."""
        _require(line, event, audit.REQUEST_KEYS, audit.REQUEST_EVENT)
        outcome = _outcome(line, event)
        recorded = event.get("state")
        recorded_state = None if recorded is None else _enum(line, State, recorded, "state", _STATE_NAMES)
        self.requests += 1
        if outcome == "refused":
            return  # the lifecycle refused it: legal or not, nothing ran
        module = self.modules.get(str(event["module_id"]))
        if "policy" in event:
            policy = _policy(line, event["policy"])
        else:
            policy = module.policy if module is not None else LifecyclePolicy()
        replayed = module.state if module is not None else State.LOADED
        label = (
            module.label() if module is not None
            else f"module {short(event['module'])} (module_id {short(event['module_id'])})"
        )
        checks = ((replayed, "the transitions before it left it there"), (recorded_state, "the event says"))
        for state, how in checks:
            if state is None:
                continue
            legal = destination(policy, state, Trigger.REQUEST)
            if legal is None:
                raise AuditFormatError(
                    line,
                    f"request {short(event['request_id'])} of {label} ran ({outcome}) in {state.value} "
                    f"({how}), where the table has no request under policy {policy}: "
                    f"{explain_illegal(policy, state, Trigger.REQUEST)}",
                )
            if module is not None and state is replayed:
                module.state = legal


def _policy(line: int, data: Any) -> LifecyclePolicy:
    if not isinstance(data, dict):
        raise AuditFormatError(
            line,
            f"'policy' must be an object like {{\"cache_dit\": true, \"compile\": true}}, got {short(data)}",
        )
    try:
        return LifecyclePolicy.from_dict(data)
    except (ValueError, TypeError, RecursionError) as exc:
        try:
            text = str(exc)
        except RecursionError:
            text = "a value nested too deeply"
        raise AuditFormatError(line, f"bad 'policy': {_cut(text, 160)}") from None


def _require(line: int, event: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [key for key in keys if key not in event]
    if missing:
        names = ", ".join(repr(key) for key in missing)
        plural = "s" if len(missing) > 1 else ""
        raise AuditFormatError(line, f"missing key{plural} {names} in a {what} event")


def _enum(line: int, kind: type[_E], value: Any, key: str, known: str) -> _E:
    try:
        return kind(value)
    except (ValueError, TypeError):
        noun = "state" if kind is State else "trigger"
        raise AuditFormatError(line, f"unknown {noun} {short(value)} in {key!r}; known: {known}") from None


def _outcome(line: int, event: Mapping[str, Any]) -> audit.Outcome:
    outcome = event["outcome"]
    for known in audit.OUTCOMES:
        if outcome == known and isinstance(outcome, str):
            return known
    raise AuditFormatError(line, f"unknown outcome {short(outcome)}; known: {', '.join(audit.OUTCOMES)}")


# ---------------------------------------------------------------------------- entry points
def verify_file(path: str | os.PathLike[str]) -> VerifyResult:
    """Replay one JSONL audit file, streaming; never raises for a bad or unreadable file.

    Args:
        path: the JSONL audit file.

    Returns:
        The verdict: ``ok``, or the first problem's ``line`` and ``reason`` (line 0: unreadable).

    Example::

        result = verify_file("audit.jsonl")
        print(result)  # audit.jsonl: OK (12 lifecycle events: ...)
    """
    name = os.fspath(path)
    replay = Replay()
    repaired: list[int] = []
    problem: AuditFormatError | None = None
    try:
        for line, event in read_events(path, repaired=repaired):
            replay.feed(line, event)
    except AuditFormatError as exc:
        problem = exc
    except OSError as exc:
        problem = AuditFormatError(0, f"cannot read the file: {exc.strerror or exc}")
    return VerifyResult(
        name,
        line=None if problem is None else problem.line,
        reason=None if problem is None else problem.reason,
        torn=False if problem is None else problem.torn,
        events=replay.events,
        modules=len(replay.modules),
        transitions=replay.transitions,
        requests=replay.requests,
        recompiles=replay.recompiles,
        repaired=tuple(repaired),
    )


def verify_files(paths: list[str | os.PathLike[str]]) -> list[VerifyResult]:
    """``verify_file`` for each path (each replayed on its own); never raises for a bad file.

    Args:
        paths: the JSONL audit files, e.g. one per rank.

    Example::

        results = verify_files(["rank0.jsonl", "rank1.jsonl"])
        assert all(result.ok for result in results)
    """
    return [verify_file(path) for path in paths]


__all__ = [
    "MAX_LINE_BYTES",
    "AuditFormatError",
    "Replay",
    "VerifyResult",
    "read_events",
    "short",
    "verify_file",
    "verify_files",
]
