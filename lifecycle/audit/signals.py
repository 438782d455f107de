"""Signals for live views: moments the audit does not write as lines, handed to the audit's
listeners (``add_listener``) only.

A request entering and leaving ``request()`` (the in-flight gauge counts between the two) and a
``prepare`` starting and ending (a tracing span around its transitions) are not records of what
happened, so they never reach the host's logging. With no listener a signal costs one check.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

from lifecycle.audit import events

REQUEST_STARTED: Final = "lifecycle.request_started"
"""A request entered ``request()`` (waiting for the lifecycle's lock counts as in flight)."""
REQUEST_ENDED: Final = "lifecycle.request_ended"
"""A request left ``request()``, after its ``lifecycle.request`` event (served, failed or refused)."""
PREPARE_STARTED: Final = "lifecycle.prepare_started"
"""``prepare`` holds the lifecycle and starts walking to WarmedUp."""
PREPARE_ENDED: Final = "lifecycle.prepare_ended"
"""``prepare`` returned or raised: ``outcome``, ``duration_ms`` and ``error`` when not ok."""
SIGNALS: Final = (REQUEST_STARTED, REQUEST_ENDED, PREPARE_STARTED, PREPARE_ENDED)


def notify(event: str, fields: dict[str, Any]) -> None:
    """Hand ``(event, fields)`` to the audit's listeners, nothing logged.

    Args:
        event: one of ``SIGNALS``.
        fields: the signal's keys and values (``module`` at least).

    Example::

        notify(REQUEST_STARTED, {"module": "transformer", "request_id": "r-17"})
    """
    listeners = events._LISTENERS
    if listeners:
        events._tell_listeners(listeners, event, fields)


def requests(event: str, names: Sequence[str], request_id: str) -> None:
    """One ``REQUEST_STARTED`` or ``REQUEST_ENDED`` signal per module of a request.

    Example::

        requests(REQUEST_STARTED, ["transformer", "transformer_2"], "r-17")
    """
    if events._LISTENERS:
        for name in names:
            notify(event, {"module": name, "request_id": request_id})


def _outcome(error: BaseException) -> str:
    from lifecycle._errors import IllegalTransitionError, InvalidConfigError

    return "refused" if isinstance(error, (IllegalTransitionError, InvalidConfigError)) else "failed"


@contextmanager
def preparing(name: str, modules: Sequence[str]) -> Iterator[None]:
    """``PREPARE_STARTED`` on entry, ``PREPARE_ENDED`` on exit (with its outcome and duration).

    Args:
        name: the lifecycle's name (``"pipeline"`` for a pipeline).
        modules: the names of the modules it walks.

    Example::

        with preparing("transformer", ["transformer"]):
            walk.prepare(...)
    """
    if not events._LISTENERS:
        yield
        return
    base: dict[str, Any] = {"module": name, "modules": list(modules)}
    notify(PREPARE_STARTED, dict(base))
    started = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        ms = round((time.perf_counter() - started) * 1000.0, 3)
        notify(PREPARE_ENDED, {**base, "outcome": _outcome(exc), "duration_ms": ms,
                               "error": f"{type(exc).__name__}: {exc}"})
        raise
    notify(PREPARE_ENDED, {**base, "outcome": "ok",
                           "duration_ms": round((time.perf_counter() - started) * 1000.0, 3)})


__all__ = [
    "PREPARE_ENDED",
    "PREPARE_STARTED",
    "REQUEST_ENDED",
    "REQUEST_STARTED",
    "SIGNALS",
    "notify",
    "preparing",
    "requests",
]
