"""The ops routes, independent of any server or framework: which route a path names, and the
probes' answers as ``Response`` objects. The ASGI, WSGI and router front-ends all route here.

Routes (GET and HEAD; any other method is 405 with ``Allow: GET, HEAD``):

- ``/health/live``, ``/v2/health/live``: 200 while the process answers.
- ``/health/ready``, ``/v2/health/ready``: 200 when every lifecycle is ready, else 503.
- ``/v2/models/{name}/ready``, ``/v2/models/{name}/versions/{v}/ready``: one lifecycle or pipeline
  member by name, percent-decoded once (``flux%20dev``; ``org%2Fmodel`` where the raw path is
  known); 404 naming the known models for another name.
- ``/metrics``: the registry's exposition (the front-ends hand it to prometheus_client's app).

A path of no route is 404 (or, with a ``fallback``, the host's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import unquote

from lifecycle.ops.errors import InvalidConfigError
from lifecycle.ops.probes import Health, Lifecycles, health_live, health_ready, model_ready

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

JSON: Final = "application/json"
LIVE_PATHS: Final = ("/health/live", "/v2/health/live")
READY_PATHS: Final = ("/health/ready", "/v2/health/ready")
METRICS_PATH: Final = "/metrics"
MODEL_PATHS: Final = ("/v2/models/{name}/ready", "/v2/models/{name}/versions/{version}/ready")
PATHS: Final = (*LIVE_PATHS, *READY_PATHS, *MODEL_PATHS, METRICS_PATH)
ALLOWED: Final = ("GET", "HEAD")
ALLOW_HEADER: Final = ", ".join(ALLOWED)

RouteKind = Literal["live", "ready", "model", "metrics"]


@dataclass(frozen=True)
class Route:
    """A path matched: its kind, and the model's name for ``model``."""

    kind: RouteKind
    name: str | None = None


@dataclass(frozen=True)
class Response:
    """An answer: status, content type, body and extra headers."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def reason(self) -> str:
        """The status line's text (``"200 OK"``), as WSGI's ``start_response`` takes it."""
        try:
            return f"{self.status} {HTTPStatus(self.status).phrase}"
        except ValueError:
            return str(self.status)

    def header_list(self) -> list[tuple[str, str]]:
        """Content-Type, Content-Length and the extra headers."""
        return [("Content-Type", self.content_type), ("Content-Length", str(len(self.body))),
                *self.headers]


def json_response(status: int, body: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """A JSON answer (sorted keys and a newline, as ``Health.json`` writes it)."""
    return Response(status, JSON, json.dumps(body, sort_keys=True).encode() + b"\n", headers)


def not_found(path: str) -> Response:
    return json_response(404, {"error": f"no route {path}", "routes": list(PATHS)})


def not_allowed(method: str) -> Response:
    shown = method if method.isprintable() and len(method) <= 40 else repr(method[:40])
    return json_response(405, {"error": f"method {shown} not allowed; use GET or HEAD"},
                         (("Allow", ALLOW_HEADER),))


def bad_request(reason: str) -> Response:
    return json_response(400, {"error": reason})


def accept_problem(accept: str | None) -> str | None:
    """Why prometheus_client's app could not answer this ``Accept`` header (it raises on some
    malformed ones, e.g. ``version=zzz``), or None. The check is its own encoder choice."""
    if not accept:
        return None
    try:
        from prometheus_client.exposition import choose_encoder

        choose_encoder(accept)
    except ImportError:
        return None
    except Exception as exc:
        return f"malformed Accept header for /metrics ({type(exc).__name__}); send e.g. 'text/plain' or " \
            "'application/openmetrics-text; version=1.0.0'"
    return None


def relative_path(path: str, root_path: str) -> str:
    """The path below the mount point. Starlette's ``Mount`` keeps the full path in ``path``
    and sets ``root_path``; other routers (and WSGI) strip the prefix from ``path``. Both are
    handled: the prefix is removed only when ``path`` starts with it."""
    root = root_path.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    return path or "/"


def _model_name_from_raw(raw: str) -> str | None:
    """The model's name from the raw (percent-encoded) path, counted from its end, so that an
    encoded slash (``org%2Fmodel``) stays inside the name; None when the tail is no model route."""
    parts = raw.split("?", 1)[0].rstrip("/").split("/")
    if len(parts) < 4 or parts[-1] != "ready":
        return None
    if len(parts) >= 6 and parts[-3] == "versions" and parts[-6:-4] == ["v2", "models"]:
        name = parts[-4]
    elif parts[-4:-2] == ["v2", "models"]:
        name = parts[-2]
    else:
        return None
    return unquote(name) if name else None


def match(path: str, raw_path: str | None = None) -> Route | None:
    """The route ``path`` (decoded, relative to the mount point) names, or None.

    Args:
        path: the percent-decoded path below the mount point.
        raw_path: the request's raw path as sent, when the server gives it (ASGI ``raw_path``,
            WSGI ``RAW_URI``/``REQUEST_URI``): a model name is read from it, so ``%2F`` stays in.

    Example::

        match("/v2/models/flux dev/ready")                 # Route("model", "flux dev")
        match("/v2/models/org/model/ready", "/v2/models/org%2Fmodel/ready")   # name "org/model"
        match("/generate")                                 # None
    """
    if len(path) > 1:
        path = path.rstrip("/")
    if path in LIVE_PATHS:
        return Route("live")
    if path in READY_PATHS:
        return Route("ready")
    if path == METRICS_PATH:
        return Route("metrics")
    if not (path.startswith("/v2/models/") and path.endswith("/ready")):
        return None
    name = _model_name_from_raw(raw_path) if raw_path else None
    if name is None:
        parts = path.split("/")
        if len(parts) == 5 or (len(parts) == 7 and parts[4] == "versions"):
            name = parts[3] or None
    return Route("model", name) if name is not None else None


def metrics_text(registry: CollectorRegistry | None = None) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` (default: the global one) and its type.
    (The HTTP front-ends serve ``/metrics`` with prometheus_client's own app, which also speaks
    OpenMetrics and gzip; this is the plain text for a host's own use.)

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


def check_registry(registry: Any) -> None:
    if registry is None:
        return
    try:
        from prometheus_client import CollectorRegistry
    except ImportError as exc:
        raise InvalidConfigError(
            "a registry was given but prometheus_client is not installed: pip install 'dit-lifecycle[ops]'"
        ) from exc
    if not isinstance(registry, CollectorRegistry):
        raise InvalidConfigError(
            f"registry must be a prometheus_client.CollectorRegistry, got {type(registry).__name__}; "
            "leave it None for the global REGISTRY"
        )


def _health(health: Health) -> Response:
    return Response(health.status, JSON, health.json())


class OpsApp:
    """The routes, independent of any server: ``route(method, path)`` -> ``Response`` for a
    decoded path, ``handle(method, target)`` for a raw request target. ``/metrics`` here is
    the plain text exposition; the ASGI and WSGI apps serve it with prometheus_client's app.

    Args:
        lifecycles: what the probes answer for, as ``Lifecycles`` takes it.
        registry: the registry ``/metrics`` exposes; None for the global one.

    Raises:
        InvalidConfigError: ``registry`` is not a ``CollectorRegistry``, or something in
            ``lifecycles`` is not a lifecycle.

    Example::

        app = OpsApp(lc)
        response = app.handle("GET", "/v2/models/transformer/ready")
        response.status, response.body     # 503 and the JSON body until lc is warm
    """

    def __init__(self, lifecycles: Any = (), registry: CollectorRegistry | None = None) -> None:
        check_registry(registry)
        self.lifecycles = lifecycles if isinstance(lifecycles, Lifecycles) else Lifecycles(lifecycles)
        self.registry = registry

    def handle(self, method: str, target: str) -> Response:
        """Answer a raw request target (``/v2/models/flux%20dev/ready?x=1``).

        Args:
            method: the HTTP method; GET and HEAD are answered, others get 405.
            target: the request target as sent: percent-encoded, query and fragment ignored.

        Example::

            app.handle("GET", "/v2/models/org%2Fmodel/ready").status
        """
        raw = target.split("?", 1)[0].split("#", 1)[0]
        return self.route(method, unquote(raw), raw_path=raw)

    def route(self, method: str, path: str, raw_path: str | None = None) -> Response:
        """Answer a decoded path (a model name may hold any character, ``?`` included).

        Args:
            method: the HTTP method; GET and HEAD are answered, others get 405.
            path: the percent-decoded path; an unknown one gets 404.
            raw_path: the raw path, when known (a model name may hold ``%2F``).

        Example::

            app.route("GET", "/health/ready").status     # 200 or 503
            app.route("POST", "/health/live").status     # 405
        """
        found = match(path, raw_path)
        if found is None:
            return not_found(path)
        if method not in ALLOWED:
            return not_allowed(method)
        if found.kind == "metrics":
            try:
                body, content_type = metrics_text(self.registry)
            except ImportError:
                text = "prometheus_client is not installed: pip install 'dit-lifecycle[ops]'\n"
                return Response(501, "text/plain; charset=utf-8", text.encode())
            return Response(200, content_type, body)
        return self.probe(found)

    def probe(self, found: Route) -> Response:
        """The answer of a probe route (not ``metrics``)."""
        if found.kind == "live":
            return _health(health_live())
        if found.kind == "ready":
            return _health(health_ready(self.lifecycles))
        return _health(model_ready(self.lifecycles, found.name or ""))


__all__ = [
    "ALLOWED",
    "JSON",
    "LIVE_PATHS",
    "METRICS_PATH",
    "PATHS",
    "READY_PATHS",
    "OpsApp",
    "Response",
    "accept_problem",
    "Route",
    "match",
    "metrics_text",
    "relative_path",
]
