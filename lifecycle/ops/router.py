"""The ops routes as a FastAPI ``APIRouter``, for hosts that prefer ``app.include_router`` to a
mount. FastAPI is imported here only (the ``ops`` extra has it); each route's endpoint is the
ASGI app's own answer, so the router and the mounted app answer alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lifecycle.ops.asgi import OpsASGIApp, Receive, Scope, Send
from lifecycle.ops.routes import ALLOWED, LIVE_PATHS, METRICS_PATH, READY_PATHS, Route, RouteKind

if TYPE_CHECKING:
    from fastapi import APIRouter
    from prometheus_client import CollectorRegistry


class _Endpoint:
    """One route's raw ASGI endpoint (an instance, so Starlette passes it scope, receive, send)."""

    def __init__(self, app: OpsASGIApp, kind: RouteKind) -> None:
        self.app = app
        self.kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = None
        if self.kind == "model":
            name = str(scope.get("path_params", {}).get("name", ""))
        await self.app.answer(Route(self.kind, name), str(scope.get("method") or ""), scope, receive, send)


def make_router(
    lifecycles: Any = (),
    registry: CollectorRegistry | None = None,
    *,
    disable_compression: bool = False,
) -> APIRouter:
    """A FastAPI ``APIRouter`` with the ops routes (``/health/*``, ``/v2/...``, ``/metrics``).

    Include it at any prefix; it declares its own paths only, so it never shadows the host's.

    Args:
        lifecycles: a lifecycle or pipeline, a list of them, or a mapping of name to lifecycle.
        registry: the registry ``/metrics`` exposes; None for the global one.
        disable_compression: never gzip ``/metrics``.

    Raises:
        InvalidConfigError: something that is not a lifecycle, or a registry that is not a
            ``CollectorRegistry``.
        ImportError: FastAPI is not installed (``pip install 'dit-lifecycle[ops]'``).

    Example::

        app = FastAPI()
        app.include_router(make_router(plc, registry), prefix="/ops")
    """
    ops = OpsASGIApp(lifecycles, registry, disable_compression=disable_compression)
    from fastapi import APIRouter
    from starlette.routing import Route as StarletteRoute

    router = APIRouter()
    methods = list(ALLOWED)
    paths: list[tuple[str, RouteKind]] = [
        *((path, "live") for path in LIVE_PATHS),
        *((path, "ready") for path in READY_PATHS),
        # The versioned form first: a name may hold slashes ({name:path}).
        ("/v2/models/{name:path}/versions/{version}/ready", "model"),
        ("/v2/models/{name:path}/ready", "model"),
        (METRICS_PATH, "metrics"),
    ]
    for path, kind in paths:
        router.routes.append(
            StarletteRoute(path, _Endpoint(ops, kind), methods=methods, name=f"ops_{kind}",
                           include_in_schema=False)
        )
    return router


__all__ = ["make_router"]
