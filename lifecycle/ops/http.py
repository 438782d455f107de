"""Health probes and ``/metrics`` over HTTP: plain functions, a WSGI app, an ASGI app, and a small
server on a thread for hosts that have none.

Routes (GET and HEAD):

- ``/health/live``, ``/v2/health/live``: 200 while the process answers. Never depends on the
  lifecycle: a module compiling for minutes is alive, not dead.
- ``/health/ready``, ``/v2/health/ready``: 200 when every given lifecycle is ready
  (``lc.ready``: WarmedUp, and warm in every declared bucket), else 503; the JSON body has
  each lifecycle's state (and a pipeline's members') either way.
- ``/v2/models/{name}/ready`` (also ``/v2/models/{name}/versions/{v}/ready``): the same for one
  lifecycle, or one pipeline member, by name (percent-decoded: ``flux%20dev``); 404 for a name it
  does not serve.
- ``/metrics``: the Prometheus text exposition of the registry given (default: the global one).

Stdlib only (``http.server``); ``prometheus_client`` is imported for ``/metrics`` alone. The
built-in server drops a connection idle for ``idle_timeout`` seconds, and ``stop()`` cuts the
open ones, so a silent client holds no thread past either.
"""

from __future__ import annotations

import errno
import json
import math
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from lifecycle.ops.errors import InvalidConfigError, OpsError, PortInUseError, ServerStoppedError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

JSON: str = "application/json"
LIVE_PATHS = ("/health/live", "/v2/health/live")
READY_PATHS = ("/health/ready", "/v2/health/ready")
METRICS_PATH = "/metrics"
PATHS = (*LIVE_PATHS, *READY_PATHS, "/v2/models/{name}/ready", METRICS_PATH)
# How long the built-in server waits on a connection that sends (or reads) nothing: a probe
# sends its request at once, and a silent client must not hold a thread for ever.
IDLE_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------- what is watched
def _name_of(lifecycle: Any) -> str:
    name = getattr(lifecycle, "name", None)
    if isinstance(name, str) and name:
        return name
    return "pipeline" if hasattr(lifecycle, "members") else type(lifecycle).__name__


def _check(lifecycle: Any) -> None:
    if not (hasattr(lifecycle, "ready") and hasattr(lifecycle, "state")):
        raise InvalidConfigError(
            f"cannot probe a {type(lifecycle).__name__}: expected a ModuleLifecycle or PipelineLifecycle "
            "(anything with .ready and .state)"
        )


class Lifecycles:
    """The lifecycles a probe answers for, by name; a host may add more later (``add``).

    Built from one lifecycle, a sequence of them (named by ``.name``; a pipeline is
    ``"pipeline"``), or a mapping of name to lifecycle. Two with one name raise
    ``InvalidConfigError``: pass a mapping to name them.

    Args:
        lifecycles: a lifecycle or pipeline, a list of them, a mapping of name to lifecycle, or
            another ``Lifecycles`` (copied).

    Raises:
        InvalidConfigError: something that is not a lifecycle, or two lifecycles with one name.

    Example::

        probes = Lifecycles({"flux": flux_lc, "sd3": sd3_lc})
        probes.add(vae_lc, name="vae")
        sorted(probes)     # ["flux", "sd3", "vae"]
    """

    def __init__(self, lifecycles: Any = ()) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, Any] = {}
        if isinstance(lifecycles, Lifecycles):
            self._by_name = lifecycles.snapshot()
        elif isinstance(lifecycles, Mapping):
            for name, lifecycle in lifecycles.items():
                self.add(lifecycle, name=name)
        elif isinstance(lifecycles, (list, tuple, set, frozenset)):
            for lifecycle in lifecycles:
                self.add(lifecycle)
        else:
            self.add(lifecycles)

    def add(self, lifecycle: Any, name: str | None = None) -> None:
        """Answer for ``lifecycle`` too, under ``name`` (default: its own name).

        Args:
            lifecycle: a ``ModuleLifecycle`` or ``PipelineLifecycle``.
            name: the name the probes use; None for ``lifecycle.name``.

        Example::

            probes.add(lc)                    # under lc.name
            probes.add(other, name="refiner")

        Raises:
            InvalidConfigError: not a lifecycle, an empty name, or a name another lifecycle has.
        """
        _check(lifecycle)
        key = _name_of(lifecycle) if name is None else name
        if not isinstance(key, str) or not key:
            raise InvalidConfigError(f"a lifecycle's name must be a non-empty str, got {key!r}")
        with self._lock:
            other = self._by_name.get(key)
            if other is not None and other is not lifecycle:
                raise InvalidConfigError(
                    f"two lifecycles named {key!r}; pass a mapping {{name: lifecycle}} to name them apart"
                )
            self._by_name[key] = lifecycle

    def snapshot(self) -> dict[str, Any]:
        """The lifecycles by name, as of now (a copy).

        Example::

            for name, lc in probes.snapshot().items():
                print(name, lc.state)
        """
        with self._lock:
            return dict(self._by_name)

    def __len__(self) -> int:
        return len(self.snapshot())

    def __iter__(self) -> Iterator[str]:
        return iter(self.snapshot())

    def __repr__(self) -> str:
        return f"Lifecycles({sorted(self.snapshot())})"


def _as_lifecycles(lifecycles: Any) -> Lifecycles:
    return lifecycles if isinstance(lifecycles, Lifecycles) else Lifecycles(lifecycles)


# ---------------------------------------------------------------------------- plain functions
@dataclass(frozen=True)
class Health:
    """A probe's answer: HTTP status and JSON body.

    Args:
        status: the HTTP status (200, 503 or 404).
        body: the JSON body, as a dict.

    Example::

        health = health_ready(lc)
        if not health.ok:
            print(health.status, health.body["models"])
    """

    status: int
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the probe passed (status 200).

        Example::

            assert health_live().ok
        """
        return self.status == 200

    def json(self) -> bytes:
        """The body as the HTTP response sends it: sorted-key JSON and a newline.

        Example::

            health_live().json()     # b'{"live": true}\\n'
        """
        return json.dumps(self.body, sort_keys=True).encode() + b"\n"


def _describe(lifecycle: Any) -> dict[str, Any]:
    """Ready and state of one lifecycle (lock-free reads: a probe never waits on a compile)."""
    try:
        ready = bool(lifecycle.ready)
        state = lifecycle.state
        entry: dict[str, Any] = {"ready": ready, "state": str(getattr(state, "value", state))}
        members = getattr(lifecycle, "members", None)
        if isinstance(members, Mapping):
            entry["members"] = {name: _describe(member) for name, member in members.items()}
    except Exception as exc:  # a probe reports, it does not crash the server
        return {"ready": False, "state": "unknown", "error": f"{type(exc).__name__}: {exc}"}
    return entry


def health_live() -> Health:
    """Liveness: 200 while the process answers; it never looks at any lifecycle.

    Example::

        health = health_live()
        assert health.status == 200 and health.body == {"live": True}
    """
    return Health(200, {"live": True})


def health_ready(lifecycles: Any) -> Health:
    """Readiness: 200 when every lifecycle is ready, else 503; the body has every state.
    With no lifecycle at all it is 503 (nothing warm to serve yet).

    Args:
        lifecycles: a lifecycle or pipeline, a list of them, a mapping of name to lifecycle, or a
            ``Lifecycles``.

    Raises:
        InvalidConfigError: something that is not a lifecycle, or two lifecycles with one name.

    Example::

        health = health_ready([flux_lc, sd3_lc])
        health.status                         # 200 once both are warm, else 503
        health.body["models"]["flux"]["state"]
    """
    models = {name: _describe(lc) for name, lc in _as_lifecycles(lifecycles).snapshot().items()}
    ready = bool(models) and all(entry["ready"] for entry in models.values())
    body: dict[str, Any] = {"ready": ready, "models": models}
    if not models:
        body["reason"] = "no lifecycle registered yet"
    return Health(200 if ready else 503, body)


def model_ready(lifecycles: Any, name: str) -> Health:
    """One lifecycle's readiness by name (or one pipeline member's); 404 for a name not served.

    Args:
        lifecycles: what the probes answer for, as ``health_ready`` takes it.
        name: a lifecycle's name, or the name of a pipeline's member.

    Raises:
        InvalidConfigError: something that is not a lifecycle, or two lifecycles with one name.

    Example::

        model_ready(plc, "transformer").status     # 200 ready, 503 not yet
        model_ready(plc, "nope").status            # 404
    """
    snapshot = _as_lifecycles(lifecycles).snapshot()
    found = snapshot.get(name)
    if found is None:
        for lifecycle in snapshot.values():
            members = getattr(lifecycle, "members", None)
            if isinstance(members, Mapping) and name in members:
                found = members[name]
                break
    if found is None:
        return Health(404, {"name": name, "ready": False, "error": f"no model named {name!r}",
                            "models": sorted(snapshot)})
    entry = _describe(found)
    return Health(200 if entry["ready"] else 503, {"name": name, **entry})


# ---------------------------------------------------------------------------- the router
@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _health(health: Health) -> Response:
    return Response(health.status, JSON, health.json())


def metrics_text(registry: CollectorRegistry | None = None) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` (default: the global one) and its type.

    Args:
        registry: a ``prometheus_client.CollectorRegistry``; None for the global ``REGISTRY``.

    Raises:
        ImportError: ``prometheus_client`` is not installed (the ``ops`` extra).

    Example::

        body, content_type = metrics_text(registry)
        assert b"dit_lifecycle_state" in body     # once a LifecycleMetrics is on registry
    """
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    return generate_latest(REGISTRY if registry is None else registry), CONTENT_TYPE_LATEST


class OpsApp:
    """The routes, independent of any server: ``handle(method, target)`` -> ``Response`` for a
    raw request target, ``route(method, path)`` for a path already percent-decoded (what WSGI
    and ASGI servers pass).

    Args:
        lifecycles: what the probes answer for, as ``Lifecycles`` takes it.
        registry: the registry ``/metrics`` exposes; None for the global one.

    Raises:
        InvalidConfigError: ``registry`` is not a ``CollectorRegistry``, or a bad ``lifecycles``.

    Example::

        app = OpsApp(lc)
        response = app.handle("GET", "/v2/models/transformer/ready")
        response.status, response.body     # 503 and the JSON body until lc is warm
    """

    def __init__(self, lifecycles: Any = (), registry: CollectorRegistry | None = None) -> None:
        if registry is not None:
            from prometheus_client import CollectorRegistry

            if not isinstance(registry, CollectorRegistry):
                raise InvalidConfigError(
                    f"registry must be a prometheus_client.CollectorRegistry, got {type(registry).__name__}"
                )
        self.lifecycles = _as_lifecycles(lifecycles)
        self.registry = registry

    def handle(self, method: str, target: str) -> Response:
        """Answer a raw request target (``/v2/models/flux%20dev/ready?x=1``).

        Args:
            method: the HTTP method; GET and HEAD are answered, others get 405.
            target: the request target as sent: percent-encoded, query and fragment ignored.

        Example::

            app.handle("GET", "/v2/models/flux%20dev/ready").status
        """
        return self.route(method, unquote(target.split("?", 1)[0].split("#", 1)[0]))

    def route(self, method: str, path: str) -> Response:
        """Answer a decoded path (a model name may hold any character, ``?`` included).

        Args:
            method: the HTTP method; GET and HEAD are answered, others get 405.
            path: the percent-decoded path; an unknown one gets 404.

        Example::

            app.route("GET", "/health/ready").status     # 200 or 503
            app.route("POST", "/health/live").status     # 405
        """
        if len(path) > 1:
            path = path.rstrip("/")
        if method not in ("GET", "HEAD"):
            body = json.dumps({"error": f"method {method} not allowed"}).encode() + b"\n"
            return Response(405, JSON, body, (("Allow", "GET, HEAD"),))
        if path in LIVE_PATHS:
            return _health(health_live())
        if path in READY_PATHS:
            return _health(health_ready(self.lifecycles))
        if path == METRICS_PATH:
            try:
                body, content_type = metrics_text(self.registry)
            except ImportError:
                text = "prometheus_client is not installed: pip install 'dit-lifecycle[ops]'\n"
                return Response(501, "text/plain; charset=utf-8", text.encode())
            return Response(200, content_type, body)
        parts = path.split("/")
        # /v2/models/{name}/ready and /v2/models/{name}/versions/{version}/ready
        if len(parts) in (5, 7) and parts[:3] == ["", "v2", "models"] and parts[-1] == "ready":
            if len(parts) == 5 or parts[4] == "versions":
                return _health(model_ready(self.lifecycles, parts[3]))
        body = json.dumps({"error": f"no route {path}", "routes": list(PATHS)}).encode() + b"\n"
        return Response(404, JSON, body)

    # -- WSGI (PEP 3333)
    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """The app as a WSGI callable (PEP 3333); ``make_wsgi_app`` returns it.

        Args:
            environ: the WSGI environ (``REQUEST_METHOD`` and ``PATH_INFO`` are read).
            start_response: the server's ``start_response``.

        Example::

            from wsgiref.simple_server import make_server
            make_server("127.0.0.1", 9464, OpsApp(lc).wsgi).serve_forever()
        """
        method = str(environ.get("REQUEST_METHOD", "GET"))
        response = self.route(method, str(environ.get("PATH_INFO", "/")) or "/")
        status = f"{response.status} {HTTPStatus(response.status).phrase}"
        headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body))),
                   *response.headers]
        start_response(status, headers)
        return [b""] if method == "HEAD" else [response.body]

    # -- ASGI 3
    async def asgi(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        """The app as an ASGI 3 callable (HTTP and lifespan); ``make_asgi_app`` returns it.

        Args:
            scope: the ASGI connection scope.
            receive: the server's ``receive`` awaitable.
            send: the server's ``send`` awaitable.

        Example::

            import uvicorn
            uvicorn.run(OpsApp(lc).asgi, port=9464)

        Raises:
            ValueError: a scope other than ``http`` or ``lifespan`` (a websocket).
        """
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            raise ValueError(f"lifecycle.ops ASGI app serves http, not {scope['type']!r}")
        method = str(scope.get("method", "GET"))
        response = self.route(method, str(scope.get("path", "/")))
        headers = [(b"content-type", response.content_type.encode()),
                   (b"content-length", str(len(response.body)).encode()),
                   *((k.lower().encode(), v.encode()) for k, v in response.headers)]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else response.body})


def make_wsgi_app(lifecycles: Any = (), registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """A WSGI app with the routes above, to mount in a host's own server.

    Args:
        lifecycles: what the probes answer for, as ``Lifecycles`` takes it.
        registry: the registry ``/metrics`` exposes; None for the global one.

    Raises:
        InvalidConfigError: ``registry`` is not a ``CollectorRegistry``, or a bad ``lifecycles``.

    Example::

        from wsgiref.simple_server import make_server
        make_server("0.0.0.0", 9464, make_wsgi_app(plc)).serve_forever()
    """
    return OpsApp(lifecycles, registry).wsgi


def make_asgi_app(lifecycles: Any = (), registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """An ASGI 3 app with the routes above (e.g. ``app.mount("/", make_asgi_app(plc))``).

    Args:
        lifecycles: what the probes answer for, as ``Lifecycles`` takes it.
        registry: the registry ``/metrics`` exposes; None for the global one.

    Raises:
        InvalidConfigError: ``registry`` is not a ``CollectorRegistry``, or a bad ``lifecycles``.

    Example::

        import uvicorn
        uvicorn.run(make_asgi_app(plc), host="0.0.0.0", port=9464)
    """
    return OpsApp(lifecycles, registry).asgi


# ---------------------------------------------------------------------------- the server
class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "dit-lifecycle-ops"

    def setup(self) -> None:
        super().setup()
        # Every read and write on the connection waits at most this long, so a client that
        # connects and goes silent is dropped (the handler's files read the socket's timeout).
        self.connection.settimeout(self.server.idle_timeout)

    def _answer(self) -> None:
        response = self.server.app.handle(self.command, self.path)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for key, value in response.headers:
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        return None  # probes every few seconds would flood stderr; the audit is the record


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: OpsApp
    idle_timeout: float = IDLE_TIMEOUT_S

    def __init__(self, address: tuple[str, int], handler: type[_Handler]) -> None:
        # Each open connection and the thread answering it, so that ``close_connections`` can
        # end them: socketserver keeps no handle on daemon threads.
        self._open: dict[socket.socket, threading.Thread] = {}
        self._open_lock = threading.Lock()
        self._closing = False
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address),
            name=f"dit-lifecycle-ops:{self.server_port}:connection", daemon=True,
        )
        with self._open_lock:
            self._open[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def close_connections(self, deadline: float) -> None:
        """Cut every open connection and wait (until ``deadline``, a ``time.monotonic()``) for
        the threads answering them. Called after ``shutdown()``: no connection is accepted now."""
        with self._open_lock:
            self._closing = True
            open_now = list(self._open.items())
        for request, _ in open_now:
            try:
                request.shutdown(socket.SHUT_RDWR)  # a blocked read or write returns at once
            except OSError:
                pass  # closed meanwhile
        for _, thread in open_now:
            thread.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up, times out or is cut at stop() is the client's business; a
        # traceback on the host's stderr for each would drown what matters.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a reverse DNS lookup that can stall
        # for seconds in a pod without DNS); the probes never need it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class OpsServer:
    """A running endpoint: ``url``, ``host``, ``port`` (the real one when 0 was asked for),
    ``thread``; ``stop()`` shuts it down and joins the thread. A context manager too.
    ``serve(...)`` builds it; it is not built directly.

    Example::

        with serve(lc, port=0) as handle:
            print(handle.urls()["ready"])
            handle.watch(other_lc)
    """

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self.thread = thread
        self._stopped = False
        self._stop_lock = threading.Lock()
        address = server.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])

    @property
    def app(self) -> OpsApp:
        """The routes this server answers with.

        Example::

            handle.app.route("GET", "/health/live").status     # 200
        """
        return self._server.app

    @property
    def lifecycles(self) -> Lifecycles:
        """The lifecycles the probes answer for (``watch`` adds one).

        Example::

            sorted(handle.lifecycles)     # ["transformer"]
        """
        return self._server.app.lifecycles

    @property
    def url(self) -> str:
        """``http://host:port``, with the real port when 0 was asked for.

        Example::

            serve(lc, port=0).url     # e.g. "http://127.0.0.1:40123"
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def urls(self) -> dict[str, str]:
        """The probe and metrics URLs, for printing.

        Example::

            handle.urls()["metrics"]     # "http://127.0.0.1:9464/metrics"
        """
        return {
            "live": self.url + LIVE_PATHS[0],
            "ready": self.url + READY_PATHS[0],
            "metrics": self.url + METRICS_PATH,
        }

    @property
    def running(self) -> bool:
        """Whether the server still answers (``stop()`` not called, its thread alive).

        Example::

            handle.stop()
            assert not handle.running
        """
        return not self._stopped and self.thread.is_alive()

    def watch(self, lifecycle: Any, name: str | None = None) -> None:
        """Answer for one more lifecycle from now on (e.g. one built after the server started).

        Args:
            lifecycle: a ``ModuleLifecycle`` or ``PipelineLifecycle``.
            name: the name the probes use; None for ``lifecycle.name``.

        Raises:
            ServerStoppedError: ``stop()`` was called.
            InvalidConfigError: not a lifecycle, or a name another lifecycle has.

        Example::

            handle = serve(port=9464)      # up before any model is loaded
            handle.watch(lc)               # ready once lc is warm
        """
        if self._stopped:
            raise ServerStoppedError(f"the server at {self.url} is stopped; call serve(...) again")
        self.lifecycles.add(lifecycle, name=name)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, cut the open connections, close the socket and join the threads, all
        within about ``timeout`` seconds (idempotent).

        Args:
            timeout: seconds to wait for the server's threads.

        Raises:
            OpsError: the server's thread did not end within ``timeout``.

        Example::

            handle = serve(lc, port=0)
            handle.stop()
            assert not handle.running
        """
        deadline = time.monotonic() + timeout
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            self._server.shutdown()
            self._server.close_connections(deadline)
            self._server.server_close()
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():  # pragma: no cover - serve_forever returns after shutdown()
            raise OpsError(f"the server thread for {self.url} did not end within {timeout} s")

    def __enter__(self) -> OpsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"OpsServer({self.url!r}, running={self.running}, lifecycles={sorted(self.lifecycles)})"


def _check_port(port: Any) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidConfigError(
            f"port must be an int from 0 to 65535 (0: any free port, the handle says which), got {port!r}"
        )
    return port


def _check_host(host: Any) -> str:
    if not isinstance(host, str) or not host:
        raise InvalidConfigError(f"host must be a non-empty str (e.g. '127.0.0.1'), got {host!r}")
    # The socket layer refuses these with a bare TypeError; say which argument and why.
    problem = "a NUL character" if "\0" in host else None
    try:
        host.encode("ascii" if host.isascii() else "idna")
    except UnicodeError:
        problem = problem or "characters a host name cannot be encoded with (IDNA)"
    if problem is not None:
        shown = repr(host) if len(host) <= 80 else repr(host[:80]) + "..."
        raise InvalidConfigError(
            f"host must be an address or host name (e.g. '127.0.0.1', '0.0.0.0', '::'); {shown} has {problem}"
        )
    return host


def _check_idle_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise InvalidConfigError(
            f"idle_timeout must be a positive number of seconds (default {IDLE_TIMEOUT_S}), got {value!r}"
        )
    return float(value)


def serve(
    lifecycles: Any = (),
    *,
    port: int,
    host: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    idle_timeout: float = IDLE_TIMEOUT_S,
) -> OpsServer:
    """Serve the probes and ``/metrics`` on a daemon thread; returns the running ``OpsServer``.

    Loopback by default: pass ``host="0.0.0.0"`` (or the pod IP) for a kubelet or Prometheus on
    another host. ``port=0`` picks a free port (``handle.port`` says which). A connection that
    sends or reads nothing for ``idle_timeout`` seconds is closed.

    Args:
        lifecycles: a lifecycle or pipeline, a list of them, or a mapping of name to lifecycle.
        port: the TCP port; 0 for any free one.
        host: the address to listen on.
        registry: the Prometheus registry ``/metrics`` exposes (default: the global one).
        idle_timeout: seconds a silent connection is kept open.

    Raises:
        PortInUseError: another socket holds the port.
        OpsError: the address cannot be bound for another reason (a privileged port).
        InvalidConfigError: a bad argument.

    Example::

        handle = serve(plc, port=9464, host="0.0.0.0")
        print(handle.urls())     # live, ready, metrics
        handle.stop()
    """
    port = _check_port(port)
    host = _check_host(host)
    idle_timeout = _check_idle_timeout(idle_timeout)
    app = OpsApp(lifecycles, registry)
    server_class: type[_Server] = _Server
    if ":" in host:
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    try:
        server = server_class((host, port), _Handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"cannot listen on {host}:{port} for the lifecycle's probes and metrics: "
                f"{exc.strerror or exc}; choose another port (or port=0 for any free one)"
            ) from exc
        hint = "use a port >= 1024" if exc.errno == errno.EACCES else "check the host address"
        raise OpsError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}") from exc
    server.app = app
    server.idle_timeout = idle_timeout
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05},
        name=f"dit-lifecycle-ops:{server.server_address[1]}", daemon=True,
    )
    thread.start()
    return OpsServer(server, thread)


__all__ = [
    "Health",
    "Lifecycles",
    "OpsApp",
    "OpsServer",
    "Response",
    "health_live",
    "health_ready",
    "make_asgi_app",
    "make_wsgi_app",
    "metrics_text",
    "model_ready",
    "serve",
]
