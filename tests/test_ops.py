"""Operations on real parts: a tiny real Flux lifecycle, the real HTTP server on 127.0.0.1 asked
with urllib, and ``/metrics`` read back with prometheus_client's own parser and compared with
the audit events captured from the same structlog chain."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import structlog
from conftest import FAST_COMPILE, SERVING_STEPS
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import LogCapture

from lifecycle import (
    IllegalTransitionError,
    InvalidConfigError,
    LifecyclePolicy,
    ModuleLifecycle,
    PipelineLifecycle,
    TransitionFailedError,
    audit,
)
from lifecycle.ops import (
    LifecycleMetrics,
    MetricsAlreadyRegisteredError,
    OpsError,
    OpsServer,
    PortInUseError,
    ServerStoppedError,
    health_live,
    health_ready,
    make_asgi_app,
    make_wsgi_app,
    serve,
)
from lifecycle.testing import NoopBackend
from lifecycle.testing.tiny import denoise, denoiser, flux_inputs, tiny_flux


# ---------------------------------------------------------------------------- helpers
def get(url: str) -> tuple[int, dict[str, Any] | str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            status, body, kind = response.status, response.read().decode(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        status, body, kind = exc.code, exc.read().decode(), exc.headers["Content-Type"]
    return status, json.loads(body) if kind == "application/json" else body


def samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics: (name, labels) -> value, through prometheus_client's parser."""
    status, text = get(url + "/metrics")
    assert status == 200 and isinstance(text, str)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def pick(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> dict[
    frozenset[tuple[str, str]], float
]:
    """Samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return {lab: v for (n, lab), v in found.items() if n == name and want <= lab}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metered(registry: CollectorRegistry) -> Iterator[tuple[LifecycleMetrics, list[dict[str, Any]]]]:
    """A host's structlog chain: the metrics processor, then a capture of the audit events."""
    old = structlog.get_config()
    metrics = LifecycleMetrics(registry)
    capture = LogCapture()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, metrics, capture],
        wrapper_class=structlog.make_filtering_bound_logger(0),
        cache_logger_on_first_use=False,
    )
    try:
        yield metrics, capture.entries
    finally:
        structlog.configure(**old)


@pytest.fixture
def servers() -> Iterator[list[OpsServer]]:
    started: list[OpsServer] = []
    yield started
    for server in started:
        server.stop()
        assert not server.thread.is_alive()


def events(captured: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in captured if e.get("event") == name]


class ProbingBackend(NoopBackend):
    """Asks the endpoint for readiness while a reset drops the compiled code (inside its work)."""

    def __init__(self) -> None:
        super().__init__()
        self.url: str | None = None
        self.seen: list[int] = []

    def decompile(self, module: Any) -> None:
        if self.url is not None:
            self.seen.append(get(self.url + "/health/ready")[0])
        super().decompile(module)


# ---------------------------------------------------------------------------- the full story
@pytest.mark.slow  # four real aot_eager warm-ups and a recompile: about a minute on 2 cores
def test_probes_follow_the_lifecycle_and_metrics_equal_the_audit(
    flux, inputs, shape, cache_config, registry, metered, servers
):
    metrics, captured = metered
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    server = serve(lc, port=0, registry=registry)
    servers.append(server)
    metrics.watch(lc)
    url = server.url
    assert server.port > 0 and url == f"http://127.0.0.1:{server.port}"
    live: list[int] = []

    def ready() -> tuple[int, Any]:
        live.append(get(url + "/health/live")[0])
        return get(url + "/health/ready")

    status, body = ready()
    assert status == 503 and body["ready"] is False
    assert body["models"]["transformer"] == {"ready": False, "state": "Loaded"}
    assert get(url + "/v2/health/ready")[0] == 503
    assert get(url + "/v2/models/transformer/ready")[0] == 503
    state = pick(samples(url), "dit_lifecycle_state", module="transformer")
    assert state[frozenset({("module", "transformer"), ("state", "Loaded")})] == 1.0

    lc.prepare(denoiser(inputs, 2))
    status, body = ready()
    assert status == 200
    assert body == {"ready": True, "models": {"transformer": {"ready": True, "state": "WarmedUp"}}}
    assert get(url + "/v2/health/ready")[0] == 200
    assert get(url + "/v2/models/transformer/ready") == (200, {"name": "transformer", "ready": True,
                                                               "state": "WarmedUp"})
    assert get(url + "/v2/models/transformer/versions/1/ready")[0] == 200
    assert get(url + "/v2/models/nope/ready")[0] == 404

    with lc.request(num_inference_steps=SERVING_STEPS):
        denoise(lc.module, inputs, SERVING_STEPS)
    # A request at a new shape under compile: a real recompile after warm-up.
    other = flux_inputs(replace(shape, image_tokens=shape.image_tokens * 2))
    extra = {"on_unwarmed": "compile"} if "on_unwarmed" in inspect.signature(lc.request).parameters else {}
    with lc.request(num_inference_steps=SERVING_STEPS, **extra) as req:
        denoise(lc.module, other, SERVING_STEPS)
    assert req.new_graphs > 0
    with pytest.raises(RuntimeError), lc.request(num_inference_steps=SERVING_STEPS):
        raise RuntimeError("the host's own failure inside a request")
    with pytest.raises(IllegalTransitionError):
        lc.compile()  # refused: already compiled
    assert ready()[0] == 200

    # A reset: not ready after it (during it: test_not_ready_while_a_reset_runs).
    lc.reset()
    assert ready()[0] == 503
    with pytest.raises(IllegalTransitionError):
        with lc.request():
            pass
    lc.prepare(denoiser(inputs, 2))
    assert ready()[0] == 200

    # A failed re-warm-up: weights changed, the second warm-up raises; 503 during and after.
    during: list[int] = []

    def broken(module: Any) -> None:
        during.append(get(url + "/health/ready")[0])
        live.append(get(url + "/health/live")[0])  # alive while warming up
        raise RuntimeError("weights file truncated")

    lc.invalidate()
    assert ready()[0] == 503
    with pytest.raises(TransitionFailedError):
        lc.prepare(broken)
    assert during == [503]
    status, body = ready()
    assert status == 503 and body["models"]["transformer"]["state"] == "Compiled"
    lc.prepare(denoiser(inputs, 2))
    assert ready()[0] == 200
    assert set(live) == {200}

    # Every counter equals the count of the matching audit events of this run.
    found = samples(url)
    transitions = Counter((e["trigger"], e["outcome"]) for e in events(captured, "lifecycle.transition"))
    assert {"failed", "refused", "ok"} <= {outcome for _, outcome in transitions}
    counted = {
        (dict(lab)["trigger"], dict(lab)["outcome"]): v
        for lab, v in pick(found, "dit_lifecycle_transitions_total", module="transformer").items()
    }
    assert counted == {key: float(n) for key, n in transitions.items()}
    per_trigger = Counter(trigger for trigger, _ in transitions.elements())
    for trigger, n in per_trigger.items():
        (count,) = pick(found, "dit_lifecycle_transition_seconds_count", trigger=trigger).values()
        assert count == n
    requests = Counter(e["outcome"] for e in events(captured, "lifecycle.request"))
    assert requests["ok"] == 2 and requests["failed"] == 1 and requests["refused"] >= 1
    counted = {dict(lab)["outcome"]: v for lab, v in pick(found, "dit_lifecycle_requests_total").items()}
    assert counted == {key: float(n) for key, n in requests.items()}
    (ran,) = pick(found, "dit_lifecycle_request_seconds_count").values()
    assert ran == requests["ok"] + requests["failed"]
    recompiles = events(captured, "lifecycle.recompile")
    assert len(recompiles) == 1
    assert pick(found, "dit_lifecycle_recompiles_total") == {
        frozenset({("module", "transformer"), ("backend", "cpu")}): 1.0
    }
    (graphs,) = pick(found, "dit_lifecycle_recompiled_graphs_total").values()
    assert graphs == sum(e["new_graphs"] for e in recompiles) == req.new_graphs
    (cached,) = pick(found, "dit_lifecycle_cached_steps_total").values()
    cached_in_audit = sum(e.get("cached_steps") or 0 for e in events(captured, "lifecycle.request"))
    assert cached == cached_in_audit > 0
    state = {dict(lab)["state"]: v for lab, v in pick(found, "dit_lifecycle_state").items()}
    assert state == {"Loaded": 0.0, "CacheMounted": 0.0, "Compiled": 0.0, "WarmedUp": 1.0}
    assert pick(found, "dit_lifecycle_warmup_covered") == {frozenset({("module", "transformer")}): 1.0}
    assert pick(found, "dit_lifecycle_module_info") == {
        frozenset({("module", "transformer"), ("backend", "cpu"), ("policy", "cache_dit+compile")}): 1.0
    }
    assert pick(found, "dit_lifecycle_metrics_errors_total") == {frozenset(): 0.0}
    # Bounded labels only: no request id or shape anywhere.
    label_names = {name for (_, lab) in found for name, _ in lab}
    assert label_names <= {"module", "trigger", "outcome", "backend", "state", "policy", "le", "bucket"}
    # The bucket label is a declared bucket's key (here the implicit "*") or a fixed word.
    buckets = {value for (_, lab) in found for name, value in lab if name == "bucket"}
    assert buckets and buckets <= {"*", "miss", "none"}


def test_not_ready_while_a_reset_runs(servers):
    backend = ProbingBackend()
    lc = ModuleLifecycle(tiny_flux(), policy=LifecyclePolicy(cache_dit=False), backend=backend)
    server = serve(lc, port=0)
    servers.append(server)
    backend.url = server.url
    lc.prepare(lambda module: None)
    assert get(server.url + "/health/ready")[0] == 200
    # A re-warm-up (WarmedUp -> WarmedUp) takes the module out of service while it runs.
    during_warmup: list[int] = []
    lc.warm_up(lambda module: during_warmup.append(get(server.url + "/health/ready")[0]))
    assert during_warmup and set(during_warmup) == {503}
    assert get(server.url + "/health/ready")[0] == 200
    lc.reset()
    assert backend.seen == [503]


def test_shape_misses_and_warmup_shapes_count_their_events(registry, metered, servers):
    _, captured = metered
    base = {"module": "transformer", "module_id": "abc", "backend": "cpu", "request_id": "r-1",
            "shape": {"height": 512, "width": 512}, "shape_key": "512x512"}
    for policy in ("eager", "eager", "fail", "compile"):
        audit.emit("lifecycle.shape_miss", "refused", {**base, "policy": policy, "outcome": "ok"})
    audit.emit("lifecycle.shape_miss", "refused", {**base, "policy": "weird", "outcome": "ok"})
    audit.emit("lifecycle.warmup_shape", "ok", {**base, "covered": True})
    audit.emit("lifecycle.warmup_coverage", "refused", {**base, "covered": False})
    server = serve([], port=0, registry=registry)
    servers.append(server)
    found = samples(server.url)
    misses = Counter(e["policy"] for e in events(captured, "lifecycle.shape_miss"))
    counted = {dict(lab)["policy"]: v for lab, v in pick(found, "dit_lifecycle_shape_misses_total").items()}
    assert counted == {"eager": misses["eager"], "fail": misses["fail"], "compile": misses["compile"],
                       "other": misses["weird"]}
    assert pick(found, "dit_lifecycle_warmup_shapes_total", outcome="ok") == {
        frozenset({("module", "transformer"), ("outcome", "ok")}): 1.0
    }
    assert pick(found, "dit_lifecycle_warmup_covered") == {frozenset({("module", "transformer")}): 0.0}
    # No lifecycle registered: not ready, still alive.
    assert get(server.url + "/health/ready")[0] == 503
    assert get(server.url + "/health/live") == (200, {"live": True})


def test_malformed_events_never_break_the_audit(registry, metered):
    _, captured = metered
    audit.emit("lifecycle.request", "ok", {"module": "m", "outcome": "ok", "duration_ms": "soon",
                                           "cached_steps": None})
    audit.emit("lifecycle.transition", "ok", {"module": "m", "trigger": "warm_up", "dest": "Nowhere"})
    assert len(events(captured, "lifecycle.request")) == 1
    assert registry.get_sample_value("dit_lifecycle_requests_total", {"module": "m", "outcome": "ok"}) == 1.0
    assert registry.get_sample_value("dit_lifecycle_request_seconds_count", {"module": "m"}) is None


def test_a_pipeline_is_ready_when_every_member_is(servers, registry):
    policy = LifecyclePolicy(cache_dit=False, compile=False)
    members = {
        name: ModuleLifecycle(tiny_flux(), name=name, policy=policy, backend=NoopBackend())
        for name in ("transformer", "transformer_2")
    }
    plc = PipelineLifecycle(members)
    server = serve({"wan": plc}, port=0, registry=registry)
    servers.append(server)
    status, body = get(server.url + "/health/ready")
    assert status == 503
    assert body["models"]["wan"]["members"]["transformer_2"] == {"ready": False, "state": "Loaded"}
    members["transformer"].warm_up(lambda module: None)
    assert get(server.url + "/health/ready")[0] == 503  # one member warm is not enough
    assert get(server.url + "/v2/models/transformer/ready")[0] == 200  # a member, by name
    assert get(server.url + "/v2/models/transformer_2/ready")[0] == 503
    plc.prepare(lambda modules: None)
    assert get(server.url + "/health/ready")[0] == 200
    assert get(server.url + "/v2/models/wan/ready")[0] == 200


# ---------------------------------------------------------------------------- bad inputs
def test_a_registry_that_has_our_metrics_is_refused(registry):
    first = LifecycleMetrics(registry)
    with pytest.raises(MetricsAlreadyRegisteredError, match="double-count") as info:
        LifecycleMetrics(registry)
    assert isinstance(info.value, ValueError) and isinstance(info.value, OpsError)
    # Nothing half-registered: the first still owns every metric; after unregister a new one fits.
    first.observe("lifecycle.request", {"module": "m", "outcome": "ok"})
    assert registry.get_sample_value("dit_lifecycle_requests_total", {"module": "m", "outcome": "ok"}) == 1.0
    first.unregister()
    assert registry.get_sample_value("dit_lifecycle_requests_total", {"module": "m", "outcome": "ok"}) is None
    LifecycleMetrics(registry)
    with pytest.raises(InvalidConfigError, match="CollectorRegistry"):
        LifecycleMetrics(registry="global")  # type: ignore[arg-type]


def test_a_port_in_use_is_a_typed_error(servers):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"127.0.0.1:{port}.*another port") as info:
            serve([], port=port)
        assert isinstance(info.value, OSError)
    finally:
        holder.close()
    server = serve([], port=0)
    servers.append(server)
    with pytest.raises(PortInUseError):
        serve([], port=server.port)


@pytest.mark.parametrize("port", [-1, 65536, "8080", True, None, 1.5])
def test_bad_ports_are_refused(port):
    with pytest.raises(InvalidConfigError, match="port must be an int"):
        serve([], port=port)


def test_bad_lifecycles_and_routes_are_refused(servers):
    with pytest.raises(InvalidConfigError, match="ModuleLifecycle"):
        serve([object()], port=0)
    policy = LifecyclePolicy(cache_dit=False, compile=False)
    a = ModuleLifecycle(tiny_flux(), policy=policy, backend=NoopBackend())
    b = ModuleLifecycle(tiny_flux(), policy=policy, backend=NoopBackend())
    with pytest.raises(InvalidConfigError, match="two lifecycles named 'transformer'"):
        serve([a, b], port=0)
    with pytest.raises(InvalidConfigError, match="host"):
        serve(a, port=0, host="")
    server = serve({"a": a, "b": b}, port=0)
    servers.append(server)
    assert get(server.url + "/nope")[0] == 404
    request = urllib.request.Request(server.url + "/health/ready", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 405 and info.value.headers["Allow"] == "GET, HEAD"
    head = urllib.request.Request(server.url + "/health/live", method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as response:
        assert response.status == 200 and response.read() == b""
    server.stop()
    server.stop()  # idempotent
    assert not server.running and not server.thread.is_alive()
    with pytest.raises(ServerStoppedError):
        server.watch(a, name="c")
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url + "/health/live", timeout=2)


# ---------------------------------------------------------------------------- hosts with a server
def test_plain_functions_wsgi_and_asgi_apps_answer_the_same(registry):
    policy = LifecyclePolicy(cache_dit=False, compile=False)
    lc = ModuleLifecycle(tiny_flux(), policy=policy, backend=NoopBackend())
    LifecycleMetrics(registry).watch(lc)
    assert health_live().status == 200
    assert health_ready(lc).status == 503
    assert health_ready(lc).body["models"]["transformer"]["state"] == "Loaded"

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = make_server("127.0.0.1", 0, make_wsgi_app(lc, registry), handler_class=Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    asgi = make_asgi_app(lc, registry)

    async def call(path: str) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await asgi({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    try:
        url = f"http://127.0.0.1:{httpd.server_port}"
        assert get(url + "/health/ready")[0] == 503
        assert asyncio.run(call("/health/ready"))[0] == 503
        lc.warm_up(lambda module: None)
        assert health_ready(lc).ok
        assert get(url + "/health/ready")[0] == 200
        assert get(url + "/v2/health/live")[0] == 200
        status, body = asyncio.run(call("/v2/models/transformer/ready"))
        assert status == 200 and json.loads(body)["ready"] is True
        status, body = asyncio.run(call("/metrics"))
        assert status == 200
        status, text = get(url + "/metrics")
        assert status == 200 and isinstance(text, str) and "dit_lifecycle_state" in text
        assert list(text_string_to_metric_families(body.decode()))
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
    assert not thread.is_alive()


def test_attach_counts_the_audit_without_configuring_structlog(registry):
    # A library never configures logging: attach() listens to the library's own audit, and the
    # host's structlog configuration is the very same objects afterwards.
    old = structlog.get_config()
    capture = LogCapture()
    structlog.configure(processors=[capture], cache_logger_on_first_use=False)
    metrics = LifecycleMetrics(registry)
    recompile = {"module": "m", "backend": "cpu", "new_graphs": 2}
    labels = {"module": "m", "backend": "cpu"}
    try:
        config = structlog.get_config()
        metrics.attach().attach()
        after = structlog.get_config()
        assert after["processors"] is config["processors"] and after == config
        audit.emit("lifecycle.recompile", "refused", recompile)
        assert len(events(capture.entries, "lifecycle.recompile")) == 1  # the host's chain has it, once
        assert registry.get_sample_value("dit_lifecycle_recompiles_total", labels) == 1.0
        assert registry.get_sample_value("dit_lifecycle_recompiled_graphs_total", labels) == 2.0

        lc = ModuleLifecycle(tiny_flux(), policy=LifecyclePolicy(cache_dit=False, compile=False),
                             backend=NoopBackend())
        lc.prepare(lambda module: None)
        with pytest.raises(IllegalTransitionError):
            lc.compile()
        written = Counter((e["trigger"], e["outcome"])
                          for e in events(capture.entries, "lifecycle.transition"))
        assert written == {("warm_up", "ok"): 1, ("compile", "refused"): 1}
        for (trigger, outcome), count in written.items():
            found = {"module": lc.name, "trigger": trigger, "outcome": outcome}
            assert registry.get_sample_value("dit_lifecycle_transitions_total", found) == count
        warm = {"module": lc.name, "state": "WarmedUp"}
        assert registry.get_sample_value("dit_lifecycle_state", warm) == 1.0

        metrics.detach()
        metrics.detach()
        audit.emit("lifecycle.recompile", "refused", recompile)
        assert len(events(capture.entries, "lifecycle.recompile")) == 2
        assert registry.get_sample_value("dit_lifecycle_recompiles_total", labels) == 1.0
        assert structlog.get_config()["processors"] is config["processors"]

        # A host that also put the instance in its own chain still counts each event once.
        structlog.configure(processors=[metrics, capture])
        metrics.attach()
        audit.emit("lifecycle.recompile", "refused", recompile)
        assert registry.get_sample_value("dit_lifecycle_recompiles_total", labels) == 2.0
    finally:
        metrics.detach()
        structlog.configure(**old)


# ---------------------------------------------------------------------------- the demo
def test_demo_metrics_port_serves_and_flips_ready_at_warmed_up(capsys):
    from lifecycle._cli import main

    before = {t.name for t in threading.enumerate()}
    code = main(["demo", "--no-compile", "--metrics-port", "0", "--json", "--quiet",
                 "--requests", "1", "--steps", "4", "--warmup-steps", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    ops = result["ops"]
    assert f"ops: serving {ops['url']}" in err and ops["urls"]["ready"] in err
    # Asked over HTTP before prepare and after every transition: 200 exactly from WarmedUp on.
    seen = [(r["state"], r["ready_status"]) for r in ops["readiness"]]
    assert seen == [("Loaded", 503), ("CacheMounted", 503), ("WarmedUp", 200)]
    assert result["state_path"] == [state for state, _ in seen]
    assert ops["ready_at"] == "WarmedUp" and ops["live_status"] == 200
    totals = ops["metric_totals"]
    assert totals["dit_lifecycle_transitions_total"] == len(result["phases"])
    assert totals["dit_lifecycle_requests_total"] == 1
    assert totals["dit_lifecycle_recompiles_total"] == 0
    # The server ended with the demo.
    assert not [t for t in threading.enumerate() if t.name.startswith("dit-lifecycle-ops") and
                t.name not in before]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(ops["urls"]["live"], timeout=2)


def test_demo_metrics_port_in_use_is_one_line(capsys):
    from lifecycle._cli import main

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        code = main(["demo", "--no-compile", "--quiet", "--metrics-port", str(holder.getsockname()[1])])
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert code == 1 and "another port" in err and "Traceback" not in err
    assert main(["demo", "--metrics-port", "99999"]) == 2
