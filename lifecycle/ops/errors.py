"""The operations layer's typed errors (all are ``lifecycle.LifecycleError``)."""

from __future__ import annotations

from lifecycle._errors import InvalidConfigError, LifecycleError


class OpsError(LifecycleError):
    """Base of the errors of ``lifecycle.ops`` (metrics and the HTTP endpoint).

    Example::

        try:
            handle = serve(lc, port=9464)
        except OpsError as exc:   # PortInUseError, or an address it may not bind
            print(f"no probes: {exc}")
    """


class MetricsAlreadyRegisteredError(OpsError, ValueError):
    """The registry already holds ``dit_lifecycle_*`` metrics: two feeds would double-count.

    Reuse the ``LifecycleMetrics`` already attached to it, pass a fresh
    ``prometheus_client.CollectorRegistry()``, or call ``.unregister()`` on the old one first.

    Example::

        registry = prometheus_client.CollectorRegistry()
        metrics = LifecycleMetrics(registry)
        LifecycleMetrics(registry)     # raises MetricsAlreadyRegisteredError
        metrics.unregister()           # now another one may register
    """


class PortInUseError(OpsError, OSError):
    """The HTTP endpoint cannot listen on the address asked for (another process holds it).

    Example::

        try:
            handle = serve(lc, port=9464)
        except PortInUseError:
            handle = serve(lc, port=0)     # any free port; handle.port says which
    """


class ServerStoppedError(OpsError):
    """The handle's server was stopped; call ``serve(...)`` again for a new one.

    Example::

        handle = serve(lc, port=0)
        handle.stop()
        handle.watch(other_lc)     # raises ServerStoppedError
    """


__all__ = [
    "InvalidConfigError",
    "MetricsAlreadyRegisteredError",
    "OpsError",
    "PortInUseError",
    "ServerStoppedError",
]
