"""Where an audit event goes: through structlog when the host configured structlog, otherwise
through the standard ``logging`` logger of the same name.

Decided per event (one attribute read), so a host that configures structlog after importing the
library, or a test inside ``structlog.testing.capture_logs``, is followed from its next event on.
A host that configured only ``logging`` gets every event through its handlers and levels, and a
process that configured neither prints nothing: unconfigured structlog would print each event to
stdout, which is why an unconfigured structlog is never used. structlog is imported at the first
event, so that the verifier and ``audit show``, which only need the event names, start fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Written into the message bare; anything else is quoted (repr) so that the line splits back.
_BARE: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:/[]")


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and _BARE.issuperset(value) else repr(value)
    if isinstance(value, (bool, int, float)) or value is None:
        return str(value)
    return repr(value)


def render(event: str, fields: Mapping[str, Any]) -> str:
    """The readable message of a ``logging`` record: the event name, then ``key=value`` pairs
    (strings with spaces or quotes as ``repr``).

    Example::

        render("lifecycle.transition", {"module": "transformer", "outcome": "ok"})
        # 'lifecycle.transition module=transformer outcome=ok'
    """
    return " ".join([event, *(f"{key}={_value(value)}" for key, value in fields.items())])


class AuditLogger:
    """The one logger every audit event goes through, with structlog's method names
    (``debug``/``info``/``warning``/``error``, ``is_enabled_for``).

    With structlog configured (``structlog.is_configured()``), an event is
    ``structlog.get_logger(name).<level>(event, **fields)`` as the host's processors want it.
    Otherwise it is a record of the ``logging`` logger ``name`` at the same level, built only
    when that logger is enabled for it: ``record.getMessage()`` is ``render(event, fields)``,
    ``record.event`` the event name and ``record.fields`` a dict of its fields (with the
    contextvars bound through ``structlog.contextvars``, e.g. a request's ``request_id``).

    Args:
        name: the structlog and ``logging`` logger name.

    Example::

        log = AuditLogger("dit_lifecycle")
        log.info("lifecycle.note", module="transformer")
    """

    __slots__ = ("_contextvars", "_is_configured", "_std", "_struct", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._std = logging.getLogger(name)
        self._struct: Any = None
        self._is_configured: Callable[[], bool] | None = None
        self._contextvars: Callable[[], dict[str, Any]] = dict

    def _load(self) -> Callable[[], bool]:
        # Two threads racing here load the same things: harmless.
        import structlog

        self._struct = structlog.get_logger(self.name)
        self._contextvars = structlog.contextvars.get_contextvars
        self._is_configured = structlog.is_configured
        return structlog.is_configured

    def log(self, method: str, event: str, fields: Mapping[str, Any]) -> None:
        """Send ``event`` at level ``method`` (``"info"``, ...; unknown names: warning).

        Raises:
            Exception: whatever the host's structlog processors raise (``logging`` handlers
                report their own errors and never raise here).
        """
        configured = self._is_configured or self._load()
        if configured():
            getattr(self._struct, method if method in _LEVELS else "warning")(event, **fields)
            return
        level = _LEVELS.get(method, logging.WARNING)
        if self._std.isEnabledFor(level):
            merged = {**self._contextvars(), **fields}
            self._std.log(level, render(event, merged), extra={"event": event, "fields": merged})

    def debug(self, event: str, **fields: Any) -> None:
        self.log("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, fields)

    def is_enabled_for(self, level: int) -> bool:
        """Whether an event at ``level`` would be written where events go now. A structlog
        logger without ``is_enabled_for`` (the unfiltered ``BoundLogger``) is taken to write it."""
        configured = self._is_configured or self._load()
        if configured():
            check = getattr(self._struct, "is_enabled_for", None)
            return bool(check(level)) if callable(check) else True
        return self._std.isEnabledFor(level)


__all__ = ["AuditLogger", "render"]
