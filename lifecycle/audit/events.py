"""The audit's event names, keys and levels, and the one logger every event goes through.

The library never calls ``structlog.configure`` or ``logging.basicConfig``. Each event goes
through structlog when the host configured structlog (and ``structlog.testing.capture_logs``
sees it), otherwise through the standard ``logging`` logger ``dit_lifecycle`` (see
``lifecycle.audit.route``). structlog itself is imported at the first event, so that the
verifier and ``audit show``, which only need the names, start fast.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, Literal

from lifecycle.audit.route import AuditLogger

LOGGER_NAME: Final = "dit_lifecycle"
"""The logger name every event goes through: ``structlog.get_logger(LOGGER_NAME)`` when the host
configured structlog, else ``logging.getLogger(LOGGER_NAME)``."""
TRANSITION_EVENT: Final = "lifecycle.transition"
"""One per trigger attempt: ok, refused or failed."""
REQUEST_EVENT: Final = "lifecycle.request"
"""One per ``request()``: served, failed or refused."""
RECOMPILE_EVENT: Final = "lifecycle.recompile"
"""A request compiled new graphs after warm-up: alert on any."""
WARMUP_COVERAGE_EVENT: Final = "lifecycle.warmup_coverage"
"""Warm-up could not run the cached-step branch requests will take."""
CACHE_REFRESH_EVENT: Final = "lifecycle.cache_refresh"
"""Debug level: the serving cache context was rebuilt (after warm-up, before a request)."""
# Written by ``JsonlSink`` itself (not through structlog) when it opens a file whose last line
# was cut short by a crash: the verifier then accepts that torn line as a recorded crash.
RESUMED_EVENT: Final = "lifecycle.audit_resumed"
"""Written by ``JsonlSink`` after a torn last line it repaired: the crash is recorded, not damage."""

Outcome = Literal["ok", "refused", "failed"]
# The verifier checks transition and request events and tolerates other lifecycle.* events.
OUTCOMES: Final[tuple[Outcome, ...]] = ("ok", "refused", "failed")
"""An event's ``outcome``: ``ok`` (info level), ``refused`` (warning), ``failed`` (error)."""

# Keys every transition event carries; "error" is added when the outcome is not ok.
TRANSITION_KEYS: Final = (
    "module",
    "module_id",
    "trigger",
    "source",
    "dest",
    "outcome",
    "duration_ms",
    "backend",
    "policy",
    "seq",
)
"""Keys every ``lifecycle.transition`` event carries (``error`` too when not ok)."""
REQUEST_KEYS: Final = (
    "module",
    "module_id",
    "request_id",
    "num_inference_steps",
    "cached_steps",
    "new_graphs",
    "duration_ms",
    "outcome",
)
"""Keys every ``lifecycle.request`` event carries (``error`` too when it failed)."""

_LEVEL_BY_OUTCOME: Final = {"ok": "info", "refused": "warning", "failed": "error"}

_LOGGER: Final = AuditLogger(LOGGER_NAME)
# The library convention for its own logger: without it, a process that configured no logging
# at all would have the warning events printed by logging's last-resort handler.
if not any(isinstance(h, logging.NullHandler) for h in logging.getLogger(LOGGER_NAME).handlers):
    logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())


def logger() -> AuditLogger:
    """The library's audit logger: structlog's methods (``info``, ``debug``, ...), routed per
    event to structlog when the host configured it, else to ``logging.getLogger(LOGGER_NAME)``.

    Example::

        logger().info("lifecycle.note", module="transformer")
    """
    return _LOGGER


def debug_enabled() -> bool:
    """Whether a debug event would be written, so a caller can skip building one. structlog
    loggers without ``is_enabled_for`` (the unfiltered ``BoundLogger``) are taken to write it.

    Example::

        if debug_enabled():
            logger().debug(CACHE_REFRESH_EVENT, module="transformer")
    """
    return _LOGGER.is_enabled_for(logging.DEBUG)


def level_for(outcome: str) -> str:
    """The log level an event of ``outcome`` is emitted at (unknown outcomes: warning).

    Args:
        outcome: ``"ok"``, ``"refused"`` or ``"failed"``.

    Example::

        assert level_for("ok") == "info" and level_for("failed") == "error"
    """
    return _LEVEL_BY_OUTCOME.get(outcome, "warning")


# Called with (event, fields) for every event ``emit`` sends: how the library's own metrics are
# fed without a place in the host's structlog chain. A tuple replaced whole on each change, so
# that ``emit`` reads it without a lock.
Listener = Callable[[str, Mapping[str, Any]], None]
"""``listener(event, fields)``: called for every audit event (see ``add_listener``).

Example::

    def count(event: str, fields: Mapping[str, Any]) -> None:
        counts[event] += 1
    add_listener(count)
"""
_LISTENERS: tuple[Listener, ...] = ()
_LISTENERS_LOCK = threading.Lock()


def add_listener(listener: Listener) -> None:
    """Call ``listener(event, fields)`` for every audit event from now on (once, however often
    it is added). It sees the event whatever the host's logging keeps or drops; it gets a
    read-only view of the fields, must be quick, and what it raises is ignored (the audit goes
    on).

    Args:
        listener: called as ``listener(event, fields)``.

    Raises:
        TypeError: ``listener`` is not callable.

    Example::

        from lifecycle.audit import add_listener, remove_listener

        def on_recompile(event, fields):
            if event == "lifecycle.recompile":
                page_someone(fields["module"], fields["new_graphs"])

        add_listener(on_recompile)
        ...
        remove_listener(on_recompile)
    """
    global _LISTENERS
    if not callable(listener):
        raise TypeError(f"an audit listener must be callable, got {type(listener).__name__}")
    with _LISTENERS_LOCK:
        if listener not in _LISTENERS:  # equality: a bound method is a new object each time
            _LISTENERS = (*_LISTENERS, listener)


def remove_listener(listener: Listener) -> None:
    """Stop calling ``listener`` (idempotent).

    Args:
        listener: a listener given to ``add_listener`` (one never added is ignored).

    Example::

        remove_listener(on_recompile)
    """
    global _LISTENERS
    with _LISTENERS_LOCK:
        _LISTENERS = tuple(known for known in _LISTENERS if known != listener)


def _tell_listeners(listeners: tuple[Listener, ...], event: str, fields: dict[str, Any]) -> None:
    view = MappingProxyType(fields)
    for listener in listeners:
        try:
            listener(event, view)
        except Exception:  # a listener never breaks (or loses) an audit write
            pass


def emit(event: str, outcome: str, fields: dict[str, Any]) -> None:
    """Send one audit event at the level its outcome deserves, then to the listeners (even when
    the write raised: the transition it records happened).

    Args:
        event: the event name, e.g. ``TRANSITION_EVENT``.
        outcome: ``"ok"``, ``"refused"`` or ``"failed"``; it picks the level (see ``level_for``).
        fields: the event's keys and values.

    Raises:
        Exception: whatever the host's structlog processors raise (e.g. ``AuditSinkError``).

    Example::

        emit("lifecycle.note", "ok", {"module": "transformer"})  # an info-level event
    """
    listeners = _LISTENERS
    try:
        _LOGGER.log(_LEVEL_BY_OUTCOME.get(outcome, "warning"), event, fields)
    finally:
        if listeners:
            _tell_listeners(listeners, event, fields)


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
    "Listener",
    "Outcome",
    "add_listener",
    "debug_enabled",
    "emit",
    "level_for",
    "logger",
    "remove_listener",
]
