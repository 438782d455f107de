"""The ops routes as an ASGI 3 app, to mount in a host's app at any prefix.

- Routed on the path below the mount point: Starlette's ``Mount`` (full ``path``, ``root_path``
  set) and routers that strip the prefix are both handled.
- ``/metrics`` is prometheus_client's own ASGI app over the registry given (OpenMetrics when the
  ``Accept`` header asks for it, gzip when ``Accept-Encoding`` allows it).
- A path of no route is 404, or handed to ``fallback`` (the host's app) when given: the ops app
  can then sit in front of the host's app at ``/`` without shadowing any host route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from lifecycle.ops.errors import InvalidConfigError
from lifecycle.ops.routes import (
    ALLOWED,
    OpsApp,
    Response,
    Route,
    accept_problem,
    bad_request,
    match,
    not_allowed,
    not_found,
    relative_path,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# Headers prometheus_client's app decodes as UTF-8: refused with 400 when they are not.
_READ_HEADERS = (b"accept", b"accept-encoding")


async def send_response(send: Send, response: Response, *, head: bool = False) -> None:
    """Send ``response`` (no body for HEAD)."""
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.header_list()]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else response.body})


def _malformed(scope: Scope) -> str | None:
    """Why the request's query or read headers cannot be decoded, or None."""
    accept: list[str] = []
    try:
        bytes(scope.get("query_string", b"")).decode("utf-8")
        for name, value in scope.get("headers", ()):
            if bytes(name).lower() in _READ_HEADERS:
                text = bytes(value).decode("utf-8")
                if bytes(name).lower() == b"accept":
                    accept.append(text)
    except (UnicodeDecodeError, TypeError, ValueError):
        return "malformed request: the query string or an Accept header is not UTF-8"
    return accept_problem(",".join(accept))


class OpsASGIApp:
    """The ASGI 3 app ``make_asgi_app`` returns (its ``ops`` attribute holds the routes).

    Args:
        lifecycles: what the probes answer for, as ``Lifecycles`` takes it.
        registry: the registry ``/metrics`` exposes; None for the global one.
        fallback: an ASGI app for every path (and scope) the ops routes do not serve.
        disable_compression: never gzip ``/metrics``.

    Raises:
        InvalidConfigError: a bad argument (not a lifecycle, not a registry, a fallback that is not
            callable).

    Example::

        app.mount("/ops", OpsASGIApp(lc))
    """

    def __init__(
        self,
        lifecycles: Any = (),
        registry: CollectorRegistry | None = None,
        *,
        fallback: ASGIApp | None = None,
        disable_compression: bool = False,
    ) -> None:
        if fallback is not None and not callable(fallback):
            raise InvalidConfigError(
                f"fallback must be an ASGI app (a callable), got {type(fallback).__name__}"
            )
        self.ops = OpsApp(lifecycles, registry)
        self.fallback = fallback
        self._disable_compression = bool(disable_compression)
        self._metrics: ASGIApp | None = None

    @property
    def lifecycles(self) -> Any:
        """The ``Lifecycles`` the probes answer for (``.add`` answers for one more)."""
        return self.ops.lifecycles

    def _metrics_app(self) -> ASGIApp | None:
        if self._metrics is None:
            try:
                from prometheus_client import REGISTRY, make_asgi_app
            except ImportError:
                return None
            registry = REGISTRY if self.ops.registry is None else self.ops.registry
            self._metrics = make_asgi_app(registry, disable_compression=self._disable_compression)
        return self._metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind != "http":
            if self.fallback is not None:
                await self.fallback(scope, receive, send)
            elif kind == "lifespan":
                await _lifespan(receive, send)
            elif kind == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        path = relative_path(str(scope.get("path") or "/"), str(scope.get("root_path") or ""))
        raw = scope.get("raw_path")
        raw_path = bytes(raw).decode("latin-1") if isinstance(raw, (bytes, bytearray)) else None
        found = match(path, raw_path)
        if found is None:
            if self.fallback is not None:
                await self.fallback(scope, receive, send)
            else:
                await send_response(send, not_found(path))
            return
        method = str(scope.get("method") or "")
        await self.answer(found, method, scope, receive, send)

    async def answer(self, found: Route, method: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a matched route (also what the FastAPI router's endpoints call)."""
        head = method == "HEAD"
        if method not in ALLOWED:
            await send_response(send, not_allowed(method))
            return
        if found.kind != "metrics":
            await send_response(send, self.ops.probe(found), head=head)
            return
        problem = _malformed(scope)
        if problem is not None:
            await send_response(send, bad_request(problem), head=head)
            return
        metrics = self._metrics_app()
        if metrics is None:
            await send_response(send, self.ops.route(method, "/metrics"), head=head)
            return
        await metrics(scope, _request_receive(receive), _strip_body(send) if head else send)


def _request_receive(receive: Receive) -> Receive:
    """prometheus_client's app answers only after an ``http.request`` message: give it one even
    when the server already delivered the (empty) body elsewhere."""

    async def wrapped() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    return wrapped


def _strip_body(send: Send) -> Send:
    async def wrapped(message: MutableMapping[str, Any]) -> None:
        if message.get("type") == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return wrapped


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message.get("type") == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message.get("type") == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def make_asgi_app(
    lifecycles: Any = (),
    registry: CollectorRegistry | None = None,
    *,
    fallback: ASGIApp | None = None,
    disable_compression: bool = False,
) -> OpsASGIApp:
    """An ASGI 3 app with the ops routes, to mount at any prefix of a host's app.

    Mount it at a prefix (``app.mount("/ops", ...)``): routes are taken below the mount point
    (``root_path`` honoured), and only its own unknown paths get its 404. At ``/`` in front of the
    host's app, pass the host's app as ``fallback`` so that every other path reaches it.

    Args:
        lifecycles: a lifecycle or pipeline, a list of them, or a mapping of name to lifecycle.
        registry: the registry ``/metrics`` exposes; None for the global one.
        fallback: an ASGI app for every path the ops routes do not serve.
        disable_compression: never gzip ``/metrics``.

    Raises:
        InvalidConfigError: something that is not a lifecycle, a registry that is not a
            ``CollectorRegistry``, or a fallback that is not callable.

    Example::

        from fastapi import FastAPI
        app = FastAPI()
        app.mount("/ops", make_asgi_app(plc, registry))   # /ops/health/ready, /ops/metrics
        # or, in front of the whole app:  server_app = make_asgi_app(plc, fallback=app)
    """
    return OpsASGIApp(lifecycles, registry, fallback=fallback, disable_compression=disable_compression)


__all__ = ["OpsASGIApp", "make_asgi_app", "send_response"]
