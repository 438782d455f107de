"""``python -m lifecycle demo --metrics-port N``: the demo's lifecycle behind real probes.

``DemoOps`` serves ``/health/*`` and ``/metrics`` for the demo's lifecycle while it runs and
asks its own endpoint, over HTTP, for readiness before ``prepare`` and after every transition
(a structlog processor on the demo's audit), so the summary shows readiness flipping to 200
exactly at WarmedUp and the metrics the run produced.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import MutableMapping
from typing import Any

from lifecycle.audit import TRANSITION_EVENT
from lifecycle.ops.metrics import LifecycleMetrics
from lifecycle.ops.server import OpsServer, serve

# Triggers after which the demo asks for readiness (requests and refreshes do not move it).
_PROBED_TRIGGERS = frozenset({"mount_cache", "compile", "warm_up", "invalidate", "reset"})


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``: (status, body), 4xx/5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


class DemoOps:
    """Metrics on a private registry, the endpoint on ``host:port``, and the readiness log."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry

        self.port = port
        self.host = host
        self.registry = CollectorRegistry()
        self.metrics = LifecycleMetrics(self.registry)
        self.server: OpsServer | None = None
        self.readiness: list[dict[str, Any]] = []

    @property
    def processors(self) -> list[Any]:
        """For the demo's structlog chain: the metrics, then the readiness probe."""
        return [self.metrics, self._after_transition]

    def start(self) -> OpsServer:
        self.server = serve(port=self.port, host=self.host, registry=self.registry)
        return self.server

    def watch(self, lifecycle: Any) -> None:
        """The demo built its lifecycle: answer for it, and probe once before ``prepare``."""
        if self.server is None:
            return
        self.server.watch(lifecycle)
        self.metrics.watch(lifecycle)
        self._probe("start", lifecycle.state.value)

    def _probe(self, after: str, state: str) -> None:
        if self.server is None:
            return
        status, body = get(self.server.urls()["ready"])
        self.readiness.append({"after": after, "state": state, "ready_status": status,
                               "body_ready": json.loads(body).get("ready")})

    def _after_transition(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
        if (
            event_dict.get("event") == TRANSITION_EVENT
            and event_dict.get("outcome") == "ok"
            and event_dict.get("trigger") in _PROBED_TRIGGERS
        ):
            self._probe(str(event_dict["trigger"]), str(event_dict.get("dest")))
        return event_dict

    def finish(self) -> dict[str, Any]:
        """Last probes and a scrape of ``/metrics``, as a JSON-serialisable summary."""
        from prometheus_client.parser import text_string_to_metric_families

        if self.server is None:
            return {}
        urls = self.server.urls()
        live, _ = get(urls["live"])
        status, text = get(urls["metrics"])
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        flipped = next((r for r in self.readiness if r["ready_status"] == 200), None)
        return {
            "url": self.server.url,
            "urls": urls,
            "live_status": live,
            "metrics_status": status,
            "readiness": self.readiness,
            "ready_at": flipped["state"] if flipped is not None else None,
            "metric_totals": {name: int(value) for name, value in sorted(totals.items())},
        }

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def format_urls(server: OpsServer) -> str:
    urls = server.urls()
    return (
        f"ops: serving {server.url} while the demo runs: live {urls['live']}, ready {urls['ready']} "
        f"(also /v2/health/ready, /v2/models/transformer/ready), metrics {urls['metrics']}\n"
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The readiness log and the metric totals, for the demo's text output."""
    if not summary:
        return ""
    steps = ", ".join(f"{r['state']} {r['ready_status']}" for r in summary["readiness"])
    totals = summary["metric_totals"]
    picked = ("dit_lifecycle_transitions_total", "dit_lifecycle_requests_total",
              "dit_lifecycle_cached_steps_total", "dit_lifecycle_recompiles_total")
    metrics = ", ".join(f"{name.removeprefix('dit_lifecycle_')} {totals.get(name, 0)}" for name in picked)
    return (
        f"\nops {summary['url']}: /health/ready after each transition: {steps} "
        f"(ready at {summary['ready_at']}); /health/live {summary['live_status']}\n"
        f"/metrics: {metrics}\n"
    )


__all__ = ["DemoOps", "format_summary", "format_urls", "get"]
