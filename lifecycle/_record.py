"""What a transition leaves behind: its record in ``history`` and its audit event, written so that a
sink failure is never silent."""

from __future__ import annotations

import warnings
from typing import Any, Literal, NamedTuple

from lifecycle import audit
from lifecycle._errors import AuditWriteWarning
from states import State, Trigger

Outcome = Literal["ok", "refused", "failed"]


class TransitionRecord(NamedTuple):
    """One trigger attempt, as kept in ``ModuleLifecycle.history``. Immutable; a named tuple
    because one is built per transition (a frozen dataclass is slower to construct).

    Example::

        for record in lc.history:
            print(record.seq, record.trigger, record.source, record.dest, record.outcome)
    """

    seq: int
    trigger: Trigger
    source: State
    dest: State
    outcome: Outcome
    duration_ms: float
    error: str | None = None


def emit_checked(event: str, outcome: str, fields: dict[str, Any]) -> Exception | None:
    """Send one audit event; return the sink's exception instead of raising it (the caller
    decides what the caller of the lifecycle must be told)."""
    try:
        audit.emit(event, outcome, fields)
    except Exception as exc:  # a host's sink may raise anything (OSError on a full disk)
        return exc
    return None


def warn_unwritten(event: str, name: str, error: Exception, then: BaseException | None = None) -> None:
    """Report an audit event that could not be written while another error is being raised."""
    text = (
        f"{name}: the {event} audit event could not be written ({type(error).__name__}: {error}); "
        "fix the audit sink"
    )
    add_note = getattr(then, "add_note", None)  # Python 3.11+
    if callable(add_note):
        add_note(text)
    warnings.warn(text, AuditWriteWarning, stacklevel=3)
