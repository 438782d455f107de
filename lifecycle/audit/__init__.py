"""Audit events and the JSONL sink a host can attach to its structlog configuration.

The library never calls ``structlog.configure``: events go through ``structlog.get_logger`` and
follow whatever the host configured (and ``structlog.testing.capture_logs`` sees them).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import IO, Any, TextIO

import structlog

LOGGER_NAME = "dit_lifecycle"
TRANSITION_EVENT = "lifecycle.transition"
REQUEST_EVENT = "lifecycle.request"
RECOMPILE_EVENT = "lifecycle.recompile"
WARMUP_COVERAGE_EVENT = "lifecycle.warmup_coverage"
CACHE_REFRESH_EVENT = "lifecycle.cache_refresh"
# The verifier checks transition and request events and tolerates other lifecycle.* events.
OUTCOMES = ("ok", "refused", "failed")

# Keys every transition event carries (API.md); "error" is added when the outcome is not ok.
TRANSITION_KEYS = (
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
REQUEST_KEYS = (
    "module",
    "module_id",
    "request_id",
    "num_inference_steps",
    "cached_steps",
    "new_graphs",
    "duration_ms",
    "outcome",
)

_LEVEL_BY_OUTCOME = {"ok": "info", "refused": "warning", "failed": "error"}


# A lazy proxy: it binds against the configuration current at each call, so a host that
# configures structlog later (or structlog.testing.capture_logs) is still followed.
_LOGGER = structlog.get_logger(LOGGER_NAME)


def logger() -> Any:
    return _LOGGER


def emit(event: str, outcome: str, fields: dict[str, Any]) -> None:
    """Send one audit event at the level its outcome deserves."""
    method = getattr(_LOGGER, _LEVEL_BY_OUTCOME.get(outcome, "warning"))
    method(event, **fields)


class AuditSinkError(OSError):
    """The audit file cannot be opened or written; raised at set-up, not at the first event."""


class JsonlSink:
    """A structlog processor that writes each event as one JSON line, flushed per event.

    Put it last among the host's processors (it raises ``structlog.DropEvent`` when
    ``drop=True``) or anywhere before the renderer with ``drop=False`` (the default), which
    passes the event on unchanged. Lines from several threads never interleave: one lock per
    sink around write + flush. ``fsync=True`` also survives an OS crash (about 20x slower).
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False, drop: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.drop = drop
        self._lock = threading.Lock()
        try:
            self._file: IO[str] = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise AuditSinkError(
                f"cannot open audit file {self.path}: {exc.strerror or exc}; "
                "choose a writable path"
            ) from exc

    def __call__(self, _logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
        record = dict(event_dict)
        record.setdefault("level", method_name)
        # One string per event, written and flushed under the lock: a line is never split
        # between two threads' writes, and a crash can tear at most the last line.
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file.closed:
                raise AuditSinkError(f"audit file {self.path} is closed; attach a new JsonlSink")
            self._file.write(line)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        if self.drop:
            raise structlog.DropEvent
        return event_dict

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r}, fsync={self.fsync}, drop={self.drop})"


def _drop_all(_logger: Any, _method_name: str, _event_dict: MutableMapping[str, Any]) -> Any:
    raise structlog.DropEvent


def configure_default(
    path: str | os.PathLike[str] | None = None,
    *,
    fsync: bool = False,
    echo: bool = True,
    stream: TextIO | None = None,
    level: int | str = logging.INFO,
    processors: Iterable[Any] = (),
) -> JsonlSink | None:
    """Configure structlog for a *script* that has no logging configuration of its own.

    The library never calls this (a host owns its logging); scripts, notebooks and the CLI
    may. Events get the contextvars bound with ``structlog.contextvars`` (e.g. a request id
    or rank), the level and a UTC ISO timestamp; then ``processors`` (extra ones of the
    caller's, e.g. a progress display); then, when ``path`` is given, one JSON line each in
    that file (``fsync=True`` also survives an OS crash). With ``echo`` the events are also
    printed readably to ``stream`` (stderr by default), otherwise they stop after the file.

    Returns the sink (close it when done), or None without ``path``. Raises ``AuditSinkError``
    at once when the file cannot be opened, so that no event is lost later.
    """
    sink = JsonlSink(path, fsync=fsync, drop=not echo) if path is not None else None
    chain: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *processors,
    ]
    if sink is not None:
        chain.append(sink)
    if echo:
        chain.append(structlog.dev.ConsoleRenderer(colors=False))
    elif sink is None:
        chain.append(_drop_all)
    numeric_level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    structlog.configure(
        processors=chain,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=stream if stream is not None else sys.stderr),
        # Not cached: a later configure_default (a new file) reaches loggers made earlier.
        cache_logger_on_first_use=False,
    )
    return sink
