"""The audit: event names and the logger (``events``), the JSONL sink (``sink``), the replaying
verifier (``verify``) and the timeline (``show``).

The library never calls ``structlog.configure`` or ``logging.basicConfig``: an event goes through
structlog when the host configured structlog (and ``structlog.testing.capture_logs`` sees it),
otherwise through the standard ``logging`` logger ``dit_lifecycle`` (``route``).
``add_listener`` hands every event to a callable as well (how ``LifecycleMetrics.attach`` feeds
the metrics). Nothing
here imports torch, and the sink (with structlog) loads on first use of its names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lifecycle.audit.events import (
    CACHE_REFRESH_EVENT,
    LOGGER_NAME,
    OUTCOMES,
    RECOMPILE_EVENT,
    REQUEST_EVENT,
    REQUEST_KEYS,
    RESUMED_EVENT,
    TRANSITION_EVENT,
    TRANSITION_KEYS,
    WARMUP_COVERAGE_EVENT,
    Listener,
    Outcome,
    add_listener,
    debug_enabled,
    emit,
    level_for,
    logger,
    remove_listener,
)

if TYPE_CHECKING:
    from lifecycle.audit.sink import AuditSinkError, JsonlSink, configure_default

_SINK_NAMES = frozenset({"AuditSinkError", "JsonlSink", "configure_default"})


def __getattr__(name: str) -> Any:
    if name in _SINK_NAMES:
        value = getattr(importlib.import_module("lifecycle.audit.sink"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lifecycle.audit' has no attribute {name!r}")

__all__ = [
    "CACHE_REFRESH_EVENT",
    "LOGGER_NAME",
    "OUTCOMES",
    "RECOMPILE_EVENT",
    "REQUEST_EVENT",
    "REQUEST_KEYS",
    "RESUMED_EVENT",
    "TRANSITION_EVENT",
    "TRANSITION_KEYS",
    "WARMUP_COVERAGE_EVENT",
    "AuditSinkError",
    "JsonlSink",
    "Listener",
    "Outcome",
    "add_listener",
    "configure_default",
    "debug_enabled",
    "emit",
    "level_for",
    "logger",
    "remove_listener",
]
