"""The lifecycle's states and its legal-transition table, as plain data (stdlib only)."""

from states.table import (
    PROGRESS,
    LifecyclePolicy,
    State,
    Transition,
    Trigger,
    allowed_triggers,
    destination,
    explain_illegal,
    remaining_path,
    transitions_for,
)

__all__ = [
    "PROGRESS",
    "LifecyclePolicy",
    "State",
    "Transition",
    "Trigger",
    "allowed_triggers",
    "destination",
    "explain_illegal",
    "remaining_path",
    "transitions_for",
]
