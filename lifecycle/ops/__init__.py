"""Operations: readiness and liveness probes, Prometheus metrics fed by the audit, and a small
HTTP endpoint (or a WSGI/ASGI app to mount) for hosts that have none.

``prometheus_client`` comes with the ``ops`` extra (``pip install 'dit-lifecycle[ops]'``); it
is imported by ``LifecycleMetrics`` and ``/metrics`` only, so the probes work without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lifecycle.ops.errors import (
    MetricsAlreadyRegisteredError,
    OpsError,
    PortInUseError,
    ServerStoppedError,
)
from lifecycle.ops.http import (
    Health,
    Lifecycles,
    OpsApp,
    OpsServer,
    health_live,
    health_ready,
    make_asgi_app,
    make_wsgi_app,
    metrics_text,
    model_ready,
    serve,
)

if TYPE_CHECKING:
    from lifecycle.ops.metrics import LifecycleMetrics, policy_label

_LAZY = {"LifecycleMetrics": "lifecycle.ops.metrics", "policy_label": "lifecycle.ops.metrics"}


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
    "Lifecycles",
    "MetricsAlreadyRegisteredError",
    "OpsApp",
    "OpsError",
    "OpsServer",
    "PortInUseError",
    "ServerStoppedError",
    "health_live",
    "health_ready",
    "make_asgi_app",
    "make_wsgi_app",
    "metrics_text",
    "model_ready",
    "policy_label",
    "serve",
]
