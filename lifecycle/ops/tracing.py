"""OpenTelemetry spans from the lifecycle's own audit events (the ``otel`` extra), through
``opentelemetry-api`` only: the host's tracer provider and exporter decide where they go.

A listener on the audit, like the metrics': each ``lifecycle.transition`` and
``lifecycle.request`` event becomes a span whose start is its end less the event's
``duration_ms``; a ``prepare`` is a span from its start to its end, current while it runs, so its
transitions are its children. A request's span is a child of whatever span is current where
``request()`` runs (the host's HTTP span, say). Nothing here is imported, and nothing costs, until
a ``LifecycleTracing`` is built.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from lifecycle.audit import REQUEST_EVENT, TRANSITION_EVENT, add_listener, remove_listener
from lifecycle.audit.signals import PREPARE_ENDED, PREPARE_STARTED
from lifecycle.ops.errors import InvalidConfigError

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

INSTRUMENTATION: Final = "dit_lifecycle"
ATTRIBUTE_PREFIX: Final = "dit_lifecycle."
# Event field -> span attribute (bounded values only: no error text, shapes as their key).
_TRANSITION_FIELDS: Final = ("module", "trigger", "source", "dest", "outcome", "backend", "seq", "new_graphs",
                              "graphs", "warmup_runs", "cached_branch_covered", "num_inference_steps")
_REQUEST_FIELDS: Final = ("module", "request_id", "state", "outcome", "bucket", "shape", "new_graphs",
                          "cached_steps", "num_inference_steps")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dit-lifecycle")
    except PackageNotFoundError:
        return "unknown"


def _attributes(fields: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key in keys:
        value = fields.get(key)
        if isinstance(value, (str, bool, int, float)):
            found[ATTRIBUTE_PREFIX + key] = value
    return found


def _ns_before(end_ns: int, duration_ms: Any) -> int:
    bad = isinstance(duration_ms, bool) or not isinstance(duration_ms, (int, float))
    if bad or duration_ms != duration_ms:
        return end_ns
    return end_ns - max(0, int(float(duration_ms) * 1_000_000))


class LifecycleTracing:
    """Spans for ``prepare``, each transition and each request, from the audit events.

    Span names: ``lifecycle.prepare``, ``lifecycle.<trigger>`` (``lifecycle.compile``, ...) and
    ``lifecycle.request``. Attributes (prefixed ``dit_lifecycle.``): ``module``, ``trigger``,
    ``source``, ``dest`` (the state reached), ``state`` (a request's), ``outcome``, ``bucket``,
    ``new_graphs``, ``cached_steps``, ``request_id``, ``backend``, ``seq``. An outcome other
    than ``ok`` sets the span's status to ERROR with the event's error.

    Args:
        tracer_provider: an OpenTelemetry ``TracerProvider``; None for the global one.

    Raises:
        ImportError: ``opentelemetry-api`` is not installed (``pip install 'dit-lifecycle[otel]'``).
        InvalidConfigError: ``tracer_provider`` has no ``get_tracer``.

    Example::

        from lifecycle.ops import LifecycleTracing

        tracing = LifecycleTracing().attach()   # the global tracer provider
        lc.prepare(run)                         # a lifecycle.prepare span, a child per transition
        tracing.detach()
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        try:
            from opentelemetry import trace
        except ImportError as exc:  # pragma: no cover - the test environment has the extra
            raise ImportError(
                "LifecycleTracing needs opentelemetry-api: pip install 'dit-lifecycle[otel]'"
            ) from exc
        if tracer_provider is not None and not callable(getattr(tracer_provider, "get_tracer", None)):
            raise InvalidConfigError(
                "tracer_provider must be an OpenTelemetry TracerProvider, got "
                f"{type(tracer_provider).__name__}; leave it None for the global one"
            )
        self._tracer: Tracer = trace.get_tracer(INSTRUMENTATION, _version(), tracer_provider=tracer_provider)
        # The prepares running in each thread, innermost last: (span, context token).
        self._local = threading.local()

    def attach(self) -> LifecycleTracing:
        """Trace every audit event from now on (idempotent).

        Returns:
            This instance, for chaining.

        Example::

            tracing = LifecycleTracing(provider).attach()
        """
        add_listener(self._listen)
        return self

    def detach(self) -> None:
        """Stop tracing (idempotent); spans already ended stay exported.

        Example::

            tracing.detach()
        """
        remove_listener(self._listen)

    # ------------------------------------------------------------------ events
    def _listen(self, event: str, fields: Mapping[str, Any]) -> None:
        if event == TRANSITION_EVENT:
            trigger = str(fields.get("trigger", "unknown"))
            attributes = _attributes(fields, _TRANSITION_FIELDS)
            # The state the module is in after the attempt: where it went, or where it stayed.
            state = fields.get("dest") if fields.get("outcome") == "ok" else fields.get("source")
            if isinstance(state, str):
                attributes[ATTRIBUTE_PREFIX + "state"] = state
            self._closed_span(f"lifecycle.{trigger}", fields, attributes)
        elif event == REQUEST_EVENT:
            self._closed_span("lifecycle.request", fields, _attributes(fields, _REQUEST_FIELDS))
        elif event == PREPARE_STARTED:
            self._start_prepare(fields)
        elif event == PREPARE_ENDED:
            self._end_prepare(fields)

    def _closed_span(self, name: str, fields: Mapping[str, Any], attributes: dict[str, Any]) -> None:
        """A span for work that just ended, over the ``duration_ms`` it took."""
        end = time.time_ns()
        span = self._tracer.start_span(name, start_time=_ns_before(end, fields.get("duration_ms")),
                                       attributes=attributes)
        self._set_status(span, fields)
        span.end(end_time=end)

    def _start_prepare(self, fields: Mapping[str, Any]) -> None:
        from opentelemetry import context, trace

        modules = fields.get("modules")
        attributes = _attributes(fields, ("module",))
        if isinstance(modules, (list, tuple)):
            attributes[ATTRIBUTE_PREFIX + "modules"] = [str(m) for m in modules]
        span = self._tracer.start_span("lifecycle.prepare", attributes=attributes)
        token = context.attach(trace.set_span_in_context(span))
        stack: list[tuple[Span, object]] = getattr(self._local, "prepares", [])
        stack.append((span, token))
        self._local.prepares = stack

    def _end_prepare(self, fields: Mapping[str, Any]) -> None:
        from opentelemetry import context

        stack: list[tuple[Span, Any]] = getattr(self._local, "prepares", [])
        if not stack:
            return  # attached while a prepare ran: its start was not seen
        span, token = stack.pop()
        context.detach(token)
        span.set_attributes(_attributes(fields, ("outcome",)))
        self._set_status(span, fields)
        span.end()

    @staticmethod
    def _set_status(span: Span, fields: Mapping[str, Any]) -> None:
        from opentelemetry.trace import Status, StatusCode

        outcome = fields.get("outcome")
        if outcome not in (None, "ok"):
            error = fields.get("error")
            span.set_status(Status(StatusCode.ERROR, str(error) if error else str(outcome)))

    def __repr__(self) -> str:
        return f"LifecycleTracing(tracer={self._tracer!r})"


__all__ = ["LifecycleTracing"]
