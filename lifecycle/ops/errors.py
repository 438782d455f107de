"""The operations layer's typed errors (all are ``lifecycle.LifecycleError``)."""

from __future__ import annotations

from lifecycle.errors import InvalidConfigError, LifecycleError


class OpsError(LifecycleError):
    """Base of the errors of ``lifecycle.ops`` (metrics and the HTTP endpoint)."""


class MetricsAlreadyRegisteredError(OpsError, ValueError):
    """The registry already holds ``dit_lifecycle_*`` metrics: two feeds would double-count.

    Reuse the ``LifecycleMetrics`` already attached to it, pass a fresh
    ``prometheus_client.CollectorRegistry()``, or call ``.unregister()`` on the old one first.
    """


class PortInUseError(OpsError, OSError):
    """The HTTP endpoint cannot listen on the address asked for (another process holds it)."""


class ServerStoppedError(OpsError):
    """The handle's server was stopped; call ``serve(...)`` again for a new one."""


__all__ = [
    "InvalidConfigError",
    "MetricsAlreadyRegisteredError",
    "OpsError",
    "PortInUseError",
    "ServerStoppedError",
]
