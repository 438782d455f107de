"""The JSONL sink a host attaches to its structlog configuration, and ``configure_default`` for
scripts that have no logging configuration of their own."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

from lifecycle.audit.events import RESUMED_EVENT

# How far back from the end the sink looks for the start of a torn last line.
_TAIL_SCAN = 1 << 16


class AuditSinkError(OSError):
    """The audit file cannot be opened or written; raised at set-up, not at the first event.
    An ``OSError``, so a host's existing handlers catch it.

    Example::

        try:
            sink = JsonlSink("/read-only/audit.jsonl")
        except AuditSinkError as exc:
            sys.exit(f"no audit: {exc}")
    """


def _torn_tail(fd: int) -> int | None:
    """The length of the unterminated last line of the file open as ``fd``, or None when the
    file is empty or ends with a newline. -1 when the line is longer than the scanned tail."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return None
    start = max(0, size - _TAIL_SCAN)
    tail = os.pread(fd, size - start, start)
    newline = tail.rfind(b"\n")
    if newline >= 0:
        return len(tail) - newline - 1
    return size if start == 0 else -1


class JsonlSink:
    """A structlog processor that writes each event as one JSON line.

    Put it last among the host's processors (it raises ``structlog.DropEvent`` when
    ``drop=True``) or anywhere before the renderer with ``drop=False`` (the default), which
    passes the event on unchanged.

    Each line goes to the file in one ``write`` on a descriptor opened with ``O_APPEND`` (no
    user-space buffer: nothing waits to be flushed), under one lock per sink, so lines from
    several threads never interleave and a crash can tear at most the last line. ``fsync=True``
    also survives an OS crash (about 20x slower).

    A file whose last line a crashed writer left unterminated is repaired when the sink opens
    it: the sink ends that line and writes a ``lifecycle.audit_resumed`` line, so this
    process's events start on a line of their own and the verifier knows the torn line is a
    recorded crash, not damage. A write that fails (a full disk) raises ``AuditSinkError``.

    Args:
        path: the JSONL file, created if missing, appended to if not.
        fsync: ``os.fsync`` after every line, so the audit survives an OS crash too.
        drop: end the event here (``structlog.DropEvent``) instead of passing it on.

    Raises:
        AuditSinkError: the file cannot be opened (at once, so no event is lost later) or,
            later, written.

    Example::

        sink = JsonlSink("audit.jsonl")
        structlog.configure(processors=[structlog.contextvars.merge_contextvars,
                                        structlog.processors.TimeStamper(fmt="iso", utc=True),
                                        sink, structlog.processors.JSONRenderer()])
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False, drop: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.drop = drop
        self._lock = threading.Lock()
        self._fd: int | None = None
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _CLOEXEC, 0o666)
            torn = _torn_tail_of(self.path, self._fd)
            if torn is not None:
                marker = {
                    "event": RESUMED_EVENT,
                    "level": "warning",
                    "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z"),
                    "torn_bytes": torn if torn >= 0 else None,
                    "pid": os.getpid(),
                }
                self._write(b"\n" + _encode(marker))
        except OSError as exc:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            raise AuditSinkError(
                f"cannot open audit file {self.path}: {exc.strerror or exc}; choose a writable path"
            ) from exc

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self.fsync:
            os.fsync(self._fd)

    def __call__(self, _logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
        record = dict(event_dict)
        record.setdefault("level", method_name)
        data = _encode(record)  # one string per event, written whole under the lock
        with self._lock:
            if self._fd is None:
                raise AuditSinkError(f"audit file {self.path} is closed; attach a new JsonlSink")
            try:
                self._write(data)
            except OSError as exc:
                raise AuditSinkError(
                    f"cannot write audit file {self.path}: {exc.strerror or exc}; "
                    "free space or choose another path"
                ) from exc
        if self.drop:
            raise structlog.DropEvent
        return event_dict

    @property
    def closed(self) -> bool:
        """Whether ``close()`` ran; a closed sink raises ``AuditSinkError`` at the next event."""
        return self._fd is None

    def close(self) -> None:
        """Close the file (idempotent). The sink is also a context manager that closes it."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # ``os.close`` bound at definition: at interpreter exit module globals may already be None.
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                _close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r}, fsync={self.fsync}, drop={self.drop})"


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode("utf-8")


def _torn_tail_of(path: Path, write_fd: int) -> int | None:
    # O_APPEND descriptors are write-only here; read the tail through a second descriptor.
    # A path that is not a regular file (a FIFO, /dev/stdout) has no tail to repair.
    if not os.path.isfile(path):
        return None
    read_fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        return _torn_tail(read_fd)
    finally:
        os.close(read_fd)


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
    may. Without it, or another structlog configuration, the events go to the ``logging``
    logger ``dit_lifecycle`` instead (``lifecycle.audit.route``). Events get the contextvars
    bound with ``structlog.contextvars`` (e.g. a request id or rank), the level and a UTC ISO
    timestamp; then ``processors`` (extra ones of the caller's, e.g. a progress display); then,
    when ``path`` is given, one JSON line each in that file (``fsync=True`` also survives an OS
    crash). With ``echo`` the events are also printed readably to ``stream`` (stderr by
    default), otherwise they stop after the file.

    Args:
        path: the JSONL audit file; None for no file (events are only printed).
        fsync: ``os.fsync`` after every line.
        echo: also print the events readably to ``stream``.
        stream: where ``echo`` prints (default: stderr).
        level: the lowest level kept (default: info; the cache refresh events are debug).
        processors: the caller's own processors, run before the sink.

    Returns:
        The sink (close it when done), or None without ``path``.

    Raises:
        AuditSinkError: the file cannot be opened (at once, so that no event is lost later).
        ValueError: an unknown level name.

    Example::

        sink = configure_default("audit.jsonl", echo=False)
        lc.prepare(run)
        sink.close()
    """
    numeric_level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
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
    structlog.configure(
        processors=chain,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=stream if stream is not None else sys.stderr),
        # Not cached: a later configure_default (a new file) reaches loggers made earlier.
        cache_logger_on_first_use=False,
    )
    return sink


__all__ = ["AuditSinkError", "JsonlSink", "configure_default"]
