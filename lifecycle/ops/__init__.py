"""Operations: readiness and liveness probes, Prometheus metrics fed by the audit, OpenTelemetry
spans (the ``otel`` extra), and the HTTP side: an ASGI app and a FastAPI router to mount in the
host's app, a WSGI app, and ``serve`` for hosts without a server.

``prometheus_client`` comes with the ``ops`` extra (``pip install 'dit-lifecycle[ops]'``); it is
imported by ``LifecycleMetrics`` and ``/metrics`` only, so the probes work without it. FastAPI is
imported by ``make_router`` only, OpenTelemetry by ``LifecycleTracing`` only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lifecycle.ops.asgi import OpsASGIApp, make_asgi_app
from lifecycle.ops.errors import (
    MetricsAlreadyRegisteredError,
    OpsError,
    PortInUseError,
    ServerStoppedError,
)
from lifecycle.ops.probes import Health, Lifecycles, health_live, health_ready, model_ready
from lifecycle.ops.routes import OpsApp, metrics_text
from lifecycle.ops.server import OpsServer, serve
from lifecycle.ops.wsgi import OpsWSGIApp, make_wsgi_app

if TYPE_CHECKING:
    from lifecycle.ops.metrics import LifecycleMetrics, policy_label
    from lifecycle.ops.router import make_router
    from lifecycle.ops.tracing import LifecycleTracing

_LAZY = {
    "LifecycleMetrics": "lifecycle.ops.metrics",
    "policy_label": "lifecycle.ops.metrics",
    "make_router": "lifecycle.ops.router",
    "LifecycleTracing": "lifecycle.ops.tracing",
}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'lifecycle.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(target), name)
    globals()[name] = value
    return value


__all__ = [
    "Health",
    "LifecycleMetrics",
    "LifecycleTracing",
    "Lifecycles",
    "MetricsAlreadyRegisteredError",
    "OpsASGIApp",
    "OpsApp",
    "OpsError",
    "OpsServer",
    "OpsWSGIApp",
    "PortInUseError",
    "ServerStoppedError",
    "health_live",
    "health_ready",
    "make_asgi_app",
    "make_router",
    "make_wsgi_app",
    "metrics_text",
    "model_ready",
    "policy_label",
    "serve",
]
