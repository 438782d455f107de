"""The ops routes as a WSGI app (PEP 3333), for WSGI hosts and for ``serve``'s stdlib server.

``PATH_INFO`` is below the mount point already (``SCRIPT_NAME`` holds the prefix); a raw path,
where the server gives one (``RAW_URI``, ``REQUEST_URI``), keeps ``%2F`` inside a model's name.
``/metrics`` is prometheus_client's own WSGI app (OpenMetrics negotiation, gzip).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from lifecycle.ops.errors import InvalidConfigError
from lifecycle.ops.routes import (
    ALLOWED,
    METRICS_PATH,
    OpsApp,
    Response,
    accept_problem,
    bad_request,
    match,
    not_allowed,
    not_found,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _path_info(environ: dict[str, Any]) -> str:
    """``PATH_INFO`` as text: servers pass the bytes as latin-1 (PEP 3333), UTF-8 names
    included; a path that is not UTF-8 stays as given."""
    path = str(environ.get("PATH_INFO") or "/")
    try:
        return path.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return path


def _raw_path(environ: dict[str, Any]) -> str | None:
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    return str(raw).split("?", 1)[0] if raw else None


def _start(start_response: Callable[..., Any], response: Response, head: bool) -> Iterable[bytes]:
    start_response(response.reason, response.header_list())
    return [] if head else [response.body]


class OpsWSGIApp:
    """The WSGI app ``make_wsgi_app`` returns (its ``ops`` attribute holds the routes).

    Args:
        lifecycles: what the probes answer for, as ``Lifecycles`` takes it.
        registry: the registry ``/metrics`` exposes; None for the global one.
        fallback: a WSGI app for every path the ops routes do not serve.
        disable_compression: never gzip ``/metrics``.

    Raises:
        InvalidConfigError: a bad argument.

    Example::

        from wsgiref.simple_server import make_server
        make_server("127.0.0.1", 9464, OpsWSGIApp(lc)).serve_forever()
    """

    def __init__(
        self,
        lifecycles: Any = (),
        registry: CollectorRegistry | None = None,
        *,
        fallback: WSGIApp | None = None,
        disable_compression: bool = False,
    ) -> None:
        if fallback is not None and not callable(fallback):
            raise InvalidConfigError(
                f"fallback must be a WSGI app (a callable), got {type(fallback).__name__}"
            )
        self.ops = OpsApp(lifecycles, registry)
        self.fallback = fallback
        self._disable_compression = bool(disable_compression)
        self._metrics: WSGIApp | None = None

    @property
    def lifecycles(self) -> Any:
        """The ``Lifecycles`` the probes answer for (``.add`` answers for one more)."""
        return self.ops.lifecycles

    def _metrics_app(self) -> WSGIApp | None:
        if self._metrics is None:
            try:
                from prometheus_client import REGISTRY, make_wsgi_app
            except ImportError:
                return None
            registry = REGISTRY if self.ops.registry is None else self.ops.registry
            self._metrics = make_wsgi_app(registry, disable_compression=self._disable_compression)
        return self._metrics

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = _path_info(environ)
        found = match(path, _raw_path(environ))
        if found is None:
            if self.fallback is not None:
                return self.fallback(environ, start_response)
            return _start(start_response, not_found(path), False)
        method = str(environ.get("REQUEST_METHOD") or "")
        head = method == "HEAD"
        if method not in ALLOWED:
            return _start(start_response, not_allowed(method), False)
        if found.kind != "metrics":
            return _start(start_response, self.ops.probe(found), head)
        problem = accept_problem(environ.get("HTTP_ACCEPT"))
        if problem is not None:
            return _start(start_response, bad_request(problem), head)
        metrics = self._metrics_app()
        if metrics is None:
            return _start(start_response, self.ops.route(method, "/metrics"), head)
        # prometheus_client's app answers GET only: a HEAD is its GET less the body.
        body = metrics({**environ, "PATH_INFO": METRICS_PATH, "REQUEST_METHOD": "GET"}, start_response)
        if not head:
            return body
        close = getattr(body, "close", None)
        if callable(close):
            close()
        return []


def make_wsgi_app(
    lifecycles: Any = (),
    registry: CollectorRegistry | None = None,
    *,
    fallback: WSGIApp | None = None,
    disable_compression: bool = False,
) -> OpsWSGIApp:
    """A WSGI app with the ops routes, to mount in a host's WSGI server (or run by ``serve``).

    Args:
        lifecycles: a lifecycle or pipeline, a list of them, or a mapping of name to lifecycle.
        registry: the registry ``/metrics`` exposes; None for the global one.
        fallback: a WSGI app for every path the ops routes do not serve (else 404).
        disable_compression: never gzip ``/metrics``.

    Raises:
        InvalidConfigError: something that is not a lifecycle, or a registry that is not a
            ``CollectorRegistry``.

    Example::

        from wsgiref.simple_server import make_server
        make_server("0.0.0.0", 9464, make_wsgi_app(plc)).serve_forever()
    """
    return OpsWSGIApp(lifecycles, registry, fallback=fallback, disable_compression=disable_compression)


__all__ = ["OpsWSGIApp", "make_wsgi_app"]
