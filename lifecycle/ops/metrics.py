"""Prometheus metrics fed by the lifecycle's own audit events.

Two ways in, one source (the audit events), so the metrics and the audit cannot disagree:

- ``.attach()``: the metrics listen to every event the library emits (``audit.add_listener``);
  the host's structlog configuration is not touched, and events the host's level filter drops
  still count.
- as a structlog processor in the host's own chain: a counter is then the number of matching
  events that chain received (events its level filter drops are dropped for both).

Labels are bounded: module name, trigger, outcome, backend, state, policy, and a declared
bucket's key (``*`` for the implicit one, ``miss`` for a request no warm bucket served, ``none``
when the request named no shape). Request ids, free shapes and errors never become labels.

Every gauge declares its ``multiprocess_mode``, so that a host running several worker processes
under ``PROMETHEUS_MULTIPROC_DIR`` aggregates them: in-flight requests sum over the live
workers, each worker's state and info keep a ``pid`` label.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from lifecycle.audit import (
    OUTCOMES,
    RECOMPILE_EVENT,
    REQUEST_EVENT,
    TRANSITION_EVENT,
    WARMUP_COVERAGE_EVENT,
    add_listener,
    remove_listener,
)
from lifecycle.audit.signals import REQUEST_ENDED, REQUEST_STARTED
from lifecycle.ops.errors import InvalidConfigError, MetricsAlreadyRegisteredError
from states import State

# Named here (not imported from lifecycle.shapes) so that metrics load without torch.
SHAPE_MISS_EVENT: Final = "lifecycle.shape_miss"
WARMUP_SHAPE_EVENT: Final = "lifecycle.warmup_shape"
# The per-request ``on_unwarmed`` policies a shape miss carries as its "policy" label.
ON_UNWARMED_POLICIES: Final = ("eager", "compile", "fail")

PREFIX: Final = "dit_lifecycle"
# Transitions run from microseconds (a refusal) to many minutes (an inductor warm-up).
TRANSITION_BUCKETS: Final = (0.0001, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                             1800.0)
# A diffusion request: tens of milliseconds (tiny model, CPU) to minutes (video).
REQUEST_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                          300.0)

_STATES: Final = tuple(state.value for state in State)


def policy_label(policy: Any) -> str:
    """A LifecyclePolicy (or its audit dict) as one bounded label: ``cache_dit+compile``,
    ``cache_dit``, ``compile`` or ``none`` (``unknown`` for anything else; it never raises).

    Args:
        policy: a ``LifecyclePolicy``, or a mapping with ``cache_dit`` and ``compile`` keys.

    Example::

        policy_label(LifecyclePolicy(cache_dit=True, compile=True))   # "cache_dit+compile"
        policy_label({"cache_dit": False, "compile": True})           # "compile"
        policy_label(None)                                            # "unknown"
    """
    if isinstance(policy, Mapping):
        cache_dit, compiled = bool(policy.get("cache_dit")), bool(policy.get("compile"))
    elif hasattr(policy, "cache_dit") and hasattr(policy, "compile"):
        cache_dit, compiled = bool(policy.cache_dit), bool(policy.compile)
    else:
        return "unknown"
    parts = [name for name, on in (("cache_dit", cache_dit), ("compile", compiled)) if on]
    return "+".join(parts) or "none"


def _outcome(value: Any) -> str:
    text = str(value)
    return text if text in OUTCOMES else "other"


def _seconds(duration_ms: Any) -> float | None:
    if isinstance(duration_ms, bool) or not isinstance(duration_ms, (int, float)):
        return None
    return max(0.0, float(duration_ms) / 1000.0)


def _bucket(fields: Mapping[str, Any]) -> str:
    """The request's bucket label: the warm bucket that served it, ``miss`` when it named a
    shape no warm bucket holds, ``none`` when it named none (bounded: never a free shape)."""
    bucket = fields.get("bucket")
    if isinstance(bucket, str) and bucket:
        return bucket
    return "miss" if fields.get("shape") is not None else "none"


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(0, value)


class LifecycleMetrics:
    """The ``dit_lifecycle_*`` metrics on ``registry`` (default: prometheus_client's global
    ``REGISTRY``), updated by the audit events: heard through ``attach()``, or passing through
    this instance as a structlog processor.

    Registering a second instance on a registry that has them raises
    ``MetricsAlreadyRegisteredError`` (two feeds would double-count). The processor never raises
    and never changes the event: a metric it cannot update counts in
    ``dit_lifecycle_metrics_errors_total`` and the audit goes on.

    Args:
        registry: a ``prometheus_client.CollectorRegistry``; None for the global ``REGISTRY``.

    Raises:
        MetricsAlreadyRegisteredError: the registry already has the ``dit_lifecycle_*`` metrics.
        InvalidConfigError: ``registry`` is not a ``CollectorRegistry``.

    Example::

        from lifecycle.ops import LifecycleMetrics, serve

        metrics = LifecycleMetrics().attach()   # every audit event from now on
        metrics.watch(lc)                       # show the module before its first event
        handle = serve(lc, port=9464)           # /metrics, /health/live, /health/ready
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise InvalidConfigError(
                f"registry must be a prometheus_client.CollectorRegistry, got {type(registry).__name__}; "
                "leave it None for the global REGISTRY"
            )
        self.registry: CollectorRegistry = REGISTRY if registry is None else registry
        self._lock = threading.Lock()
        self._attached = False
        self._states: dict[str, str] = {}
        self._known: set[tuple[str, str]] = set()
        self._in_flight: dict[str, int] = {}
        self.state = Gauge(
            f"{PREFIX}_state", "1 for the state each managed module is in now, 0 for the others",
            ["module", "state"], registry=None, multiprocess_mode="liveall",
        )
        self.info = Gauge(
            f"{PREFIX}_module_info", "1 per managed module, with its backend and policy",
            ["module", "backend", "policy"], registry=None, multiprocess_mode="liveall",
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "Requests inside request() now (waiting for the module included), summed over live workers",
            ["module"], registry=None, multiprocess_mode="livesum",
        )
        self.transitions = Counter(
            f"{PREFIX}_transitions", "Trigger attempts (lifecycle.transition events) by trigger and outcome",
            ["module", "trigger", "outcome"], registry=None,
        )
        self.transition_seconds = Histogram(
            f"{PREFIX}_transition_seconds", "Time of each trigger attempt (its work), per trigger",
            ["module", "trigger"], buckets=TRANSITION_BUCKETS, registry=None,
        )
        self.requests = Counter(
            f"{PREFIX}_requests", "Requests (lifecycle.request events) by outcome",
            ["module", "outcome"], registry=None,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_request_seconds", "Time of each request that ran (ok or failed)",
            ["module"], buckets=REQUEST_BUCKETS, registry=None,
        )
        self.bucket_request_seconds = Histogram(
            f"{PREFIX}_bucket_request_seconds",
            "Time of each request that ran, per shape bucket (a declared bucket's key, * for the "
            "implicit one, miss when no warm bucket served it, none when it named no shape)",
            ["module", "bucket"], buckets=REQUEST_BUCKETS, registry=None,
        )
        self.cached_steps = Counter(
            f"{PREFIX}_cached_steps", "Denoising steps served from cache-dit's cache, summed over requests",
            ["module"], registry=None,
        )
        self.recompiles = Counter(
            f"{PREFIX}_recompiles",
            "Requests that compiled new graphs after warm-up (lifecycle.recompile events): alert on any",
            ["module", "backend"], registry=None,
        )
        self.recompiled_graphs = Counter(
            f"{PREFIX}_recompiled_graphs", "Graphs compiled by requests after warm-up",
            ["module", "backend"], registry=None,
        )
        self.warmup_covered = Gauge(
            f"{PREFIX}_warmup_covered",
            "1 when the last warm-up covered the path requests take (cache-dit's cached-step branch), "
            "0 when it did not or the module is not warm",
            ["module"], registry=None, multiprocess_mode="liveall",
        )
        self.warmup_shapes = Counter(
            f"{PREFIX}_warmup_shapes", "Declared shape buckets warmed (lifecycle.warmup_shape events)",
            ["module", "outcome"], registry=None,
        )
        self.shape_misses = Counter(
            f"{PREFIX}_shape_misses",
            "Requests at a shape no warm-up covered (lifecycle.shape_miss events), by on_unwarmed policy",
            ["module", "policy"], registry=None,
        )
        self.errors = Counter(
            f"{PREFIX}_metrics_errors", "Audit events the metrics could not account for (the audit has them)",
            [], registry=None,
        )
        self._collectors: tuple[MetricWrapperBase, ...] = (
            self.state, self.info, self.in_flight, self.transitions, self.transition_seconds,
            self.requests, self.request_seconds, self.bucket_request_seconds, self.cached_steps,
            self.recompiles, self.recompiled_graphs,
            self.warmup_covered, self.warmup_shapes, self.shape_misses, self.errors,
        )
        self._register()

    # ------------------------------------------------------------------ registry
    def _register(self) -> None:
        done: list[MetricWrapperBase] = []
        for collector in self._collectors:
            try:
                self.registry.register(collector)
            except ValueError as exc:
                for registered in done:
                    self.registry.unregister(registered)
                raise MetricsAlreadyRegisteredError(
                    f"this prometheus registry already has the {PREFIX}_* metrics ({exc}); a second "
                    "LifecycleMetrics on it would double-count. Reuse the one already attached, pass "
                    "registry=prometheus_client.CollectorRegistry(), or call .unregister() on the old one"
                ) from exc
            done.append(collector)

    def unregister(self) -> None:
        """Take the metrics off the registry (idempotent); the processor keeps counting privately.

        Example::

            metrics.detach()
            metrics.unregister()     # a new LifecycleMetrics may register on the registry now
        """
        for collector in self._collectors:
            try:
                self.registry.unregister(collector)
            except KeyError:
                pass

    # ------------------------------------------------------------------ feeds
    def __call__(self, _logger: Any, _method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
        """The structlog processor. While attached, the listener counts instead (an instance in
        the chain as well would count every event twice)."""
        event = event_dict.get("event")
        if not self._attached and isinstance(event, str):
            self._account(event, event_dict)
        return event_dict

    def _listen(self, event: str, fields: Mapping[str, Any]) -> None:
        self._account(event, fields)

    def _account(self, event: str, fields: Mapping[str, Any]) -> None:
        if event.startswith("lifecycle."):
            try:
                self.observe(event, fields)
            except Exception:  # never break (or lose) an audit write for a metric
                self.errors.inc()

    def attach(self) -> LifecycleMetrics:
        """Count every audit event the library emits from now on (idempotent).

        The metrics listen to the library's audit (``audit.add_listener``): the host's logging,
        structlog's configuration included, stays as the host set it. Hosts that build their own
        structlog chain may put the instance in it instead.

        Returns:
            This instance, for chaining.

        Example::

            metrics = LifecycleMetrics(registry).attach()
        """
        with self._lock:
            self._attached = True
        add_listener(self._listen)
        return self

    def detach(self) -> None:
        """Stop listening to the audit (idempotent); the metrics stay on the registry.

        Example::

            metrics = LifecycleMetrics().attach()
            metrics.detach()     # events from now on are not counted
        """
        remove_listener(self._listen)
        with self._lock:
            self._attached = False

    def watch(self, *lifecycles: Any) -> LifecycleMetrics:
        """Show modules that have had no event yet: their current state and info. A
        ``PipelineLifecycle`` (anything with ``members``) counts as its members.

        Args:
            *lifecycles: ``ModuleLifecycle`` or ``PipelineLifecycle`` instances.

        Returns:
            This instance, for chaining.

        Raises:
            InvalidConfigError: an argument that is neither.

        Example::

            metrics = LifecycleMetrics().attach().watch(plc)
        """
        for lc in _modules(lifecycles):
            name = str(lc.name)
            self._set_state(name, State(lc.state).value)
            self._module_seen(name, str(lc.backend.name), policy_label(lc.policy))
        return self

    def _module_seen(self, module: str, backend: str, policy: str) -> None:
        """Start a module's series at 0, so that ``increase(...[5m])`` sees its first event."""
        self.info.labels(module, backend, policy).set(1)
        with self._lock:
            if (module, backend) in self._known:
                return
            self._known.add((module, backend))
        self.recompiles.labels(module, backend)
        self.recompiled_graphs.labels(module, backend)
        self.cached_steps.labels(module)
        self.in_flight.labels(module)
        self.warmup_covered.labels(module)
        for outcome in OUTCOMES:
            self.requests.labels(module, outcome)
        for on_unwarmed in ON_UNWARMED_POLICIES:
            self.shape_misses.labels(module, on_unwarmed)

    # ------------------------------------------------------------------ events
    def observe(self, event: str, fields: Mapping[str, Any]) -> None:
        """Account for one audit event (what the processor does; public for a host's own hook).

        Args:
            event: the audit event's name (``"lifecycle.request"``, ``"lifecycle.transition"``, ...);
                other names are ignored.
            fields: the event's fields (``module``, ``outcome``, ``duration_ms``, ...).

        Example::

            metrics.observe("lifecycle.request",
                            {"module": "transformer", "outcome": "ok", "duration_ms": 840})
        """
        module = str(fields.get("module", "unknown"))
        if event == TRANSITION_EVENT:
            self._transition(module, fields)
        elif event == REQUEST_EVENT:
            outcome = _outcome(fields.get("outcome"))
            self.requests.labels(module, outcome).inc()
            seconds = _seconds(fields.get("duration_ms"))
            if outcome != "refused" and seconds is not None:
                self.request_seconds.labels(module).observe(seconds)
                self.bucket_request_seconds.labels(module, _bucket(fields)).observe(seconds)
            self.cached_steps.labels(module).inc(_count(fields.get("cached_steps")))
        elif event in (REQUEST_STARTED, REQUEST_ENDED):
            self._count_in_flight(module, 1 if event == REQUEST_STARTED else -1)
        elif event == RECOMPILE_EVENT:
            backend = str(fields.get("backend", "unknown"))
            self.recompiles.labels(module, backend).inc()
            self.recompiled_graphs.labels(module, backend).inc(_count(fields.get("new_graphs")))
        elif event == WARMUP_COVERAGE_EVENT:
            if "covered" in fields:
                self.warmup_covered.labels(module).set(1 if fields["covered"] else 0)
        elif event == WARMUP_SHAPE_EVENT:
            self.warmup_shapes.labels(module, _outcome(fields.get("outcome", "ok"))).inc()
        elif event == SHAPE_MISS_EVENT:
            policy = str(fields.get("policy"))
            self.shape_misses.labels(module, policy if policy in ON_UNWARMED_POLICIES else "other").inc()

    def _count_in_flight(self, module: str, step: int) -> None:
        # Counted here as well, so that a request that started before attach() (its start
        # unseen) never takes the gauge below zero.
        with self._lock:
            now = self._in_flight.get(module, 0)
            if now + step < 0:
                return
            self._in_flight[module] = now + step
            self.in_flight.labels(module).set(now + step)

    def _transition(self, module: str, fields: Mapping[str, Any]) -> None:
        trigger = str(fields.get("trigger", "unknown"))
        outcome = _outcome(fields.get("outcome"))
        self.transitions.labels(module, trigger, outcome).inc()
        seconds = _seconds(fields.get("duration_ms"))
        if seconds is not None:
            self.transition_seconds.labels(module, trigger).observe(seconds)
        if "backend" in fields and "policy" in fields:
            self._module_seen(module, str(fields["backend"]), policy_label(fields["policy"]))
        if outcome != "ok":
            return
        dest = str(fields.get("dest"))
        if dest not in _STATES:
            return
        self._set_state(module, dest)
        if dest != State.WARMED_UP.value:
            self.warmup_covered.labels(module).set(0)
        elif trigger == "warm_up":
            covered = fields.get("cached_branch_covered", fields.get("warmup_covered_cached_branch", True))
            # None: nothing to cover (no cache-dit, or no compile); the warm-up is complete.
            self.warmup_covered.labels(module).set(0 if covered is False else 1)

    def _set_state(self, module: str, state: str) -> None:
        with self._lock:
            if self._states.get(module) == state:
                return
            self._states[module] = state
            for name in _STATES:
                self.state.labels(module, name).set(1 if name == state else 0)

    def __repr__(self) -> str:
        return f"LifecycleMetrics(registry={self.registry!r}, modules={sorted(self._states)})"


def _modules(lifecycles: Iterable[Any]) -> Iterable[Any]:
    for lc in lifecycles:
        members = getattr(lc, "members", None)
        if isinstance(members, Mapping):
            yield from members.values()
        elif hasattr(lc, "name") and hasattr(lc, "state"):
            yield lc
        else:
            raise InvalidConfigError(
                f"expected a ModuleLifecycle or PipelineLifecycle, got {type(lc).__name__}"
            )


__all__ = ["LifecycleMetrics", "policy_label"]
