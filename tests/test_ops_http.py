"""The ops routes inside a host's app: a real uvicorn on 127.0.0.1 serving a FastAPI app that
mounts the ops at ``/ops`` next to its own ``/generate`` (and the router variant, and the app in
front of the host's at ``/``), asked with httpx; ``/metrics`` negotiated by prometheus_client's
own app (OpenMetrics, gzip); malformed requests answered with a 4xx, never a traceback."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import FAST_COMPILE, SERVING_STEPS
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from lifecycle import (
    IllegalTransitionError,
    InvalidConfigError,
    LifecyclePolicy,
    ModuleLifecycle,
    PipelineLifecycle,
)
from lifecycle.ops import (
    LifecycleMetrics,
    make_asgi_app,
    make_router,
    make_wsgi_app,
    serve,
)
from lifecycle.testing import NoopBackend
from lifecycle.testing.tiny import denoise, denoiser, tiny_flux

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@contextmanager
def uvicorn_on_loopback(app: Any) -> Iterator[str]:
    """A real uvicorn on 127.0.0.1 and a free port, in a thread; stopped through should_exit."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive()


def eager(name: str = "transformer") -> ModuleLifecycle:
    return ModuleLifecycle(tiny_flux(), name=name, policy=LifecyclePolicy(cache_dit=False, compile=False),
                           backend=NoopBackend())


def host_app(lc: Any, inputs: Any = None) -> FastAPI:
    """A host's own app: one generate route that serves a request through the lifecycle."""
    app = FastAPI()

    @app.exception_handler(IllegalTransitionError)
    async def not_warm(request: Request, exc: IllegalTransitionError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503)

    @app.post("/generate")
    def generate(body: dict[str, Any]) -> dict[str, Any]:
        steps = int(body.get("steps", 2))
        with lc.request(num_inference_steps=steps, request_id=body.get("id")) as req:
            if inputs is not None:
                denoise(lc.module, inputs, steps)
        return {"state": lc.state.value, "new_graphs": req.new_graphs, "cached_steps": req.cached_steps}

    return app


# ---------------------------------------------------------------------------- mounted at /ops
def test_fastapi_mounts_the_ops_at_a_prefix_next_to_its_own_route(flux, inputs, cache_config):
    registry = CollectorRegistry()
    metrics = LifecycleMetrics(registry).attach()
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    metrics.watch(lc)
    app = host_app(lc, inputs)
    app.mount("/ops", make_asgi_app(lc, registry))
    try:
        with uvicorn_on_loopback(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/ops/health/live").status_code == 200
            ready = client.get("/ops/health/ready")
            assert ready.status_code == 503 and ready.json()["models"]["transformer"]["state"] == "Loaded"
            assert client.get("/ops/v2/health/ready").status_code == 503
            assert client.get("/ops/v2/models/transformer/ready").status_code == 503
            # Not warm: the host's route answers with its own error (the lifecycle refuses).
            refused = client.post("/generate", json={"steps": SERVING_STEPS})
            assert refused.status_code == 503 and "prepare" in refused.json()["error"]

            lc.prepare(denoiser(inputs, 2))
            assert client.get("/ops/health/ready").json() == {
                "ready": True, "models": {"transformer": {"ready": True, "state": "WarmedUp"}}}
            assert client.get("/ops/v2/models/transformer/versions/3/ready").status_code == 200
            served = client.post("/generate", json={"steps": SERVING_STEPS, "id": "r-1"})
            assert served.status_code == 200
            assert served.json()["new_graphs"] == 0 and served.json()["cached_steps"] > 0

            # Only the ops' own unknown paths are its 404; the host's unknown paths are the host's.
            missing = client.get("/ops/nope")
            assert missing.status_code == 404 and "/v2/models/{name}/ready" in missing.json()["routes"]
            assert client.get("/nope").json() == {"detail": "Not Found"}
            unknown = client.get("/ops/v2/models/sd3/ready")
            assert unknown.status_code == 404 and unknown.json()["models"] == ["transformer"]
            assert "'transformer'" in unknown.json()["error"]

            scraped = client.get("/ops/metrics")
            assert scraped.status_code == 200
            found = {(s.name, tuple(sorted(s.labels.items()))): s.value
                     for family in text_string_to_metric_families(scraped.text) for s in family.samples}
            ok = (("module", "transformer"), ("outcome", "ok"))
            assert found[("dit_lifecycle_requests_total", ok)] == 1
            assert found[("dit_lifecycle_requests_in_flight", (("module", "transformer"),))] == 0
            assert found[("dit_lifecycle_bucket_request_seconds_count",
                          (("bucket", "*"), ("module", "transformer")))] == 1
    finally:
        metrics.detach()


def test_in_flight_counts_a_request_while_it_runs_behind_uvicorn():
    registry = CollectorRegistry()
    metrics = LifecycleMetrics(registry).attach()
    lc = eager()
    lc.prepare(lambda module: None)
    inside, release = threading.Event(), threading.Event()
    app = FastAPI()

    @app.post("/generate")
    def generate() -> dict[str, str]:
        with lc.request(num_inference_steps=2):
            inside.set()
            release.wait(20)
        return {"ok": "yes"}

    app.mount("/ops", make_asgi_app(lc, registry))
    labels = {"module": "transformer"}
    try:
        with uvicorn_on_loopback(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            results: list[int] = []
            worker = threading.Thread(target=lambda: results.append(client.post("/generate").status_code))
            worker.start()
            assert inside.wait(20)
            text = client.get("/ops/metrics").text
            assert 'dit_lifecycle_requests_in_flight{module="transformer"} 1.0' in text
            release.set()
            worker.join(20)
            assert results == [200]
            assert registry.get_sample_value("dit_lifecycle_requests_in_flight", labels) == 0.0
    finally:
        release.set()
        metrics.detach()


def test_the_router_variant_and_the_app_in_front_of_the_host():
    registry = CollectorRegistry()
    LifecycleMetrics(registry)
    members = {name: eager(name) for name in ("transformer", "org/model")}
    plc = PipelineLifecycle(members)
    app = host_app(members["transformer"])
    app.include_router(make_router({"wan": plc}, registry), prefix="/ops")
    front = make_asgi_app({"wan": plc}, registry, fallback=host_app(members["transformer"]))
    for served, prefix in ((app, "/ops"), (front, "")):
        with uvicorn_on_loopback(served) as url, httpx.Client(base_url=url, timeout=30) as client:
            assert client.get(f"{prefix}/health/ready").status_code == 503
            assert client.get(f"{prefix}/v2/models/org%2Fmodel/ready").status_code == 503
            plc.prepare(lambda modules: None)
            assert client.get(f"{prefix}/health/ready").json()["models"]["wan"]["members"]["org/model"] == {
                "ready": True, "state": "WarmedUp"}
            for path in ("wan", "org%2Fmodel", "transformer", "org%2Fmodel/versions/2"):
                answer = client.get(f"{prefix}/v2/models/{path}/ready")
                assert answer.status_code == 200, (prefix, path, answer.text)
            assert client.get(f"{prefix}/v2/models/org%2Fmodel/ready").json()["name"] == "org/model"
            head = client.head(f"{prefix}/health/live")
            assert head.status_code == 200 and head.content == b""
            assert client.post(f"{prefix}/health/live").status_code == 405
            assert "GET" in client.post(f"{prefix}/health/live").headers["allow"]
            assert client.post("/generate", json={}).status_code == 200  # the host's route, not shadowed
            assert client.get(f"{prefix}/metrics").status_code == 200
            plc.reset()


# ---------------------------------------------------------------------------- /metrics negotiation
def test_metrics_speak_openmetrics_and_gzip_when_asked():
    registry = CollectorRegistry()
    metrics = LifecycleMetrics(registry)
    metrics.observe("lifecycle.request",
                    {"module": "m", "outcome": "ok", "duration_ms": 5.0, "bucket": "512x512"})
    app = FastAPI()
    app.mount("/ops", make_asgi_app(eager(), registry))
    with uvicorn_on_loopback(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        plain = client.get("/ops/metrics", headers={"Accept-Encoding": "identity"})
        assert plain.headers["content-type"].startswith("text/plain")
        assert "content-encoding" not in plain.headers
        assert list(text_string_to_metric_families(plain.text))

        om = client.get("/ops/metrics", headers={"Accept": "application/openmetrics-text",
                                                 "Accept-Encoding": "identity"})
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.endswith("# EOF\n")
        families = {f.name: f for f in parse_openmetrics(om.text)}
        (sample,) = [s for s in families["dit_lifecycle_bucket_request_seconds"].samples
                     if s.name.endswith("_count")]
        assert sample.labels == {"module": "m", "bucket": "512x512"} and sample.value == 1

        with httpx.stream("GET", url + "/ops/metrics", headers={"Accept-Encoding": "gzip"}) as raw:
            assert raw.headers["content-encoding"] == "gzip"
            body = gzip.decompress(b"".join(raw.iter_raw()))  # the bytes as sent
        assert b"dit_lifecycle_bucket_request_seconds_count" in body

        head = client.head("/ops/metrics")
        assert head.status_code == 200 and head.content == b""
        # Only the named families, through prometheus_client's own query handling.
        only = client.get("/ops/metrics", params={"name[]": "dit_lifecycle_requests_total"})
        assert 'dit_lifecycle_requests_total{module="m",outcome="ok"} 1.0' in only.text
        assert "dit_lifecycle_bucket_request_seconds" not in only.text


def test_the_wsgi_app_and_serve_negotiate_the_same():
    registry = CollectorRegistry()
    LifecycleMetrics(registry)
    with serve(eager(), port=0, registry=registry) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            om = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
            assert om.status_code == 200 and om.headers["content-type"].startswith(OPENMETRICS)
            zipped = client.get("/metrics", headers={"Accept-Encoding": "gzip"})
            assert zipped.headers["content-encoding"] == "gzip" and b"dit_lifecycle_state" in zipped.content
            assert client.get("/v2/models/nope/ready").json()["models"] == ["transformer"]
            head = client.head("/metrics")
            assert head.status_code == 200 and head.content == b""


# ---------------------------------------------------------------------------- bad input
class Recorder:
    """An ASGI app driven by hand: what the ops app sends."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, scope: dict[str, Any]) -> tuple[int, dict[bytes, bytes], bytes]:
        import asyncio

        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        asyncio.run(self.app({"type": "http", "headers": [], "query_string": b"", **scope}, receive, send))
        return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_mount_conventions_and_malformed_requests_get_a_4xx():
    lc = eager("org/model")
    ops = Recorder(make_asgi_app(lc, CollectorRegistry()))
    # Starlette's Mount: the full path, root_path set; other routers: the path stripped.
    assert ops({"method": "GET", "path": "/ops/health/live", "root_path": "/ops"})[0] == 200
    assert ops({"method": "GET", "path": "/health/live", "root_path": "/ops"})[0] == 200
    assert ops({"method": "GET", "path": "/opsx/health/live", "root_path": "/ops"})[0] == 404
    status, _, body = ops({"method": "GET", "path": "/ops/v2/models/org/model/ready", "root_path": "/ops",
                           "raw_path": b"/ops/v2/models/org%2Fmodel/ready"})
    assert status == 503 and b'"name": "org/model"' in body
    status, headers, body = ops({"method": "DELETE", "path": "/health/ready"})
    assert status == 405 and headers[b"allow"] == b"GET, HEAD" and b"DELETE" in body
    assert ops({"method": "\x00BREW\n", "path": "/health/live"})[0] == 405
    for bad in ({"headers": [(b"accept", b"\xff\xfe")]}, {"query_string": b"name[]=\xff"},
                {"headers": [(b"accept", b"application/openmetrics-text; version=x.y")]}):
        status, _, body = ops({"method": "GET", "path": "/metrics", **bad})
        assert status == 400 and (b"not UTF-8" in body or b"Accept" in body)
    assert ops({"method": "GET", "path": "/v2/models/%ZZ/ready"})[0] == 404
    assert ops({"method": "GET", "path": "/v2/models//ready"})[0] == 404
    assert ops({"method": "GET", "path": "/" + "a" * 10000})[0] == 404

    with serve(lc, port=0) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.get("/v2/models/org%2Fmodel/ready").json()["name"] == "org/model"
            assert client.request("BREW", "/health/live").status_code == 405
            assert client.get("/v2/models/caf%FF/ready").status_code == 404
            # prometheus_client's own encoder choice raises on this header: a 400, not its 500.
            bad_accept = client.get("/metrics", headers={"Accept": "text/plain; version=zzz; q=x"})
            assert bad_accept.status_code == 400 and "Accept" in bad_accept.json()["error"]
        import socket

        with socket.create_connection((server.host, server.port), timeout=10) as raw:
            raw.sendall(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")  # the stdlib's 414
            assert raw.recv(64).split(b" ")[1] == b"414"



@pytest.mark.parametrize("thing", [object(), ModuleLifecycle, "transformer", None, [tiny_flux()], {"a": 1}],
                         ids=["object", "the-class", "a-str", "none", "a-module", "a-mapping-of-int"])
def test_something_that_is_not_a_lifecycle_is_refused_at_construction(thing):
    for build in (make_asgi_app, make_wsgi_app, make_router):
        with pytest.raises(InvalidConfigError, match="ModuleLifecycle or PipelineLifecycle"):
            build(thing)
    with pytest.raises(InvalidConfigError, match="fallback must be"):
        make_asgi_app(eager(), fallback="app")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="CollectorRegistry"):
        make_asgi_app(eager(), registry={})  # type: ignore[arg-type]
