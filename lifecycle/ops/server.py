"""``serve``: the ops WSGI app on the standard library's threaded WSGI server, on a daemon thread,
for hosts that have no HTTP server of their own.

The HTTP plumbing is ``wsgiref``'s (request parsing, 400/414 for malformed requests, the
response); what is added here is the server's lifecycle: a connection silent for
``idle_timeout`` seconds is closed, and ``stop()`` cuts the open ones, so a silent client holds
no thread past either.
"""

from __future__ import annotations

import errno
import math
import socket
import socketserver
import sys
import threading
import time
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from lifecycle.ops.errors import InvalidConfigError, OpsError, PortInUseError, ServerStoppedError
from lifecycle.ops.probes import Lifecycles
from lifecycle.ops.routes import LIVE_PATHS, METRICS_PATH, READY_PATHS, OpsApp
from lifecycle.ops.wsgi import OpsWSGIApp

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# How long the server waits on a connection that sends (or reads) nothing: a probe sends its
# request at once, and a silent client must not hold a thread for ever.
IDLE_TIMEOUT_S = 10.0


class _Handler(WSGIRequestHandler):
    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        # The raw target, as gunicorn names it: a model name may hold %2F, which PATH_INFO loses.
        environ["RAW_URI"] = self.path
        return environ

    def log_message(self, format: str, *args: Any) -> None:
        return None  # probes every few seconds would flood stderr; the audit is the record


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler]) -> None:
        # Each open connection, so that ``close_connections`` can cut them at stop.
        self._open: dict[socket.socket, threading.Thread] = {}
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a reverse DNS lookup that can stall
        # for seconds in a pod without DNS); the probes never need it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()

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
        """Cut every open connection and wait (until ``deadline``) for the threads answering them."""
        with self._open_lock:
            open_now = list(self._open.items())
        for request, _ in open_now:
            try:
                request.shutdown(socket.SHUT_RDWR)  # a blocked read or write returns at once
            except OSError:
                pass  # closed meanwhile
        for _, thread in open_now:
            thread.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up, times out or is cut at stop() is the client's business.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class OpsServer:
    """A running endpoint: ``url``, ``host``, ``port`` (the real one when 0 was asked for),
    ``thread``; ``stop()`` shuts it down and joins the thread. A context manager too.
    ``serve(...)`` builds it; it is not built directly.

    Example::

        with serve(lc, port=0) as handle:
            print(handle.urls()["ready"])
            handle.watch(other_lc)
    """

    def __init__(self, server: _Server, app: OpsWSGIApp, thread: threading.Thread) -> None:
        self._server = server
        self._app = app
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
        return self._app.ops

    @property
    def lifecycles(self) -> Lifecycles:
        """The lifecycles the probes answer for (``watch`` adds one).

        Example::

            sorted(handle.lifecycles)     # ["transformer"]
        """
        return self._app.ops.lifecycles

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
        return {"live": self.url + LIVE_PATHS[0], "ready": self.url + READY_PATHS[0],
                "metrics": self.url + METRICS_PATH}

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
    """Serve the probes and ``/metrics`` on a daemon thread (the standard library's threaded WSGI
    server running ``make_wsgi_app``); returns the running ``OpsServer``.

    Loopback by default: pass ``host="0.0.0.0"`` (or the pod IP) for a kubelet or Prometheus on
    another host. ``port=0`` picks a free port (``handle.port`` says which). A connection that
    sends or reads nothing for ``idle_timeout`` seconds is closed. A host with its own ASGI or
    WSGI server mounts ``make_asgi_app`` / ``make_wsgi_app`` instead.

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
    app = OpsWSGIApp(lifecycles, registry)
    handler = type("_IdleHandler", (_Handler,), {"timeout": idle_timeout})
    server_class: type[_Server] = _Server
    if ":" in host:
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    try:
        server = server_class((host, port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"cannot listen on {host}:{port} for the lifecycle's probes and metrics: "
                f"{exc.strerror or exc}; choose another port (or port=0 for any free one)"
            ) from exc
        hint = "use a port >= 1024" if exc.errno == errno.EACCES else "check the host address"
        raise OpsError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}") from exc
    server.set_app(app)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05},
        name=f"dit-lifecycle-ops:{server.server_address[1]}", daemon=True,
    )
    thread.start()
    return OpsServer(server, app, thread)


__all__ = ["IDLE_TIMEOUT_S", "OpsServer", "serve"]
