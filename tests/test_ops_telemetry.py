"""Tracing and the router metrics on real parts: OpenTelemetry's SDK with its in-memory exporter
over a real lifecycle; the in-flight gauge and the per-bucket histogram fed by real requests;
the gauges aggregated by prometheus_client's multiprocess collector over a real
PROMETHEUS_MULTIPROC_DIR written by separate worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lifecycle import InvalidConfigError, LifecyclePolicy, ModuleLifecycle, TransitionFailedError
from lifecycle.ops import LifecycleMetrics, LifecycleTracing
from lifecycle.testing import NoopBackend
from lifecycle.testing.tiny import tiny_flux

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
A = "dit_lifecycle."


def lifecycle(policy: LifecyclePolicy, cache_config: Any = None) -> ModuleLifecycle:
    return ModuleLifecycle(tiny_flux(), policy=policy, backend=NoopBackend(), cache_config=cache_config)


@pytest.fixture
def spans() -> Any:
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = LifecycleTracing(provider).attach()
    try:
        yield provider, exporter
    finally:
        tracing.detach()


def test_prepare_is_the_parent_of_its_transitions_and_requests_nest_in_the_hosts_span(spans, cache_config):
    provider, exporter = spans
    lc = lifecycle(LifecyclePolicy(), cache_config)
    bucket = {"height": 64, "width": 64}
    lc.prepare(lambda module, shape: None, num_inference_steps=4, shapes=[bucket])
    finished = exporter.get_finished_spans()
    by_name = {s.name: s for s in finished}
    assert [s.name for s in finished] == ["lifecycle.mount_cache", "lifecycle.compile", "lifecycle.warm_up",
                                          "lifecycle.prepare"]
    prepare = by_name["lifecycle.prepare"]
    assert prepare.parent is None and prepare.attributes[A + "outcome"] == "ok"
    assert prepare.attributes[A + "module"] == "transformer"
    for name in ("lifecycle.mount_cache", "lifecycle.compile", "lifecycle.warm_up"):
        child = by_name[name]
        assert child.parent is not None and child.parent.span_id == prepare.context.span_id
        assert child.context.trace_id == prepare.context.trace_id
        assert prepare.start_time <= child.start_time <= child.end_time <= prepare.end_time
        assert child.attributes[A + "outcome"] == "ok"
    warm = by_name["lifecycle.warm_up"]
    assert warm.attributes[A + "state"] == "WarmedUp" and warm.attributes[A + "source"] == "Compiled"
    assert warm.attributes[A + "trigger"] == "warm_up"
    history = {record.trigger.value: record for record in lc.history}
    assert pytest.approx((warm.end_time - warm.start_time) / 1e6, abs=0.01) == history["warm_up"].duration_ms

    exporter.clear()
    tracer = provider.get_tracer("host")
    with tracer.start_as_current_span("POST /generate") as host:
        with lc.request(num_inference_steps=4, request_id="r-1", shape=bucket):
            pass
    request, host_span = exporter.get_finished_spans()
    assert request.name == "lifecycle.request" and request.parent.span_id == host.get_span_context().span_id
    assert request.attributes[A + "request_id"] == "r-1" and request.attributes[A + "outcome"] == "ok"
    assert request.attributes[A + "state"] == "WarmedUp" and request.attributes[A + "new_graphs"] == 0
    assert request.attributes[A + "cached_steps"] == 0
    assert request.attributes[A + "bucket"] == "height=64,width=64"
    assert host_span.name == "POST /generate"


def test_failed_and_refused_work_sets_an_error_status(spans):
    _, exporter = spans
    lc = lifecycle(LifecyclePolicy(cache_dit=False, compile=False))

    def broken(module: Any) -> None:
        raise RuntimeError("weights file truncated")

    with pytest.raises(TransitionFailedError):
        lc.prepare(broken)
    with pytest.raises(Exception, match="prepare"), lc.request():
        pass
    warm, prepare, request = exporter.get_finished_spans()
    assert (warm.name, prepare.name, request.name) == ("lifecycle.warm_up", "lifecycle.prepare",
                                                       "lifecycle.request")
    error = trace.StatusCode.ERROR
    assert warm.status.status_code == error and "weights file truncated" in warm.status.description
    assert warm.attributes[A + "outcome"] == "failed" and warm.attributes[A + "state"] == "Loaded"
    assert prepare.status.status_code == error and prepare.attributes[A + "outcome"] == "failed"
    assert request.attributes[A + "outcome"] == "refused" and request.status.status_code == error
    assert request.parent is None  # no host span current, no prepare running


def test_tracing_costs_nothing_and_imports_nothing_unless_built():
    code = textwrap.dedent("""
        import sys
        from lifecycle import LifecyclePolicy, ModuleLifecycle
        from lifecycle.ops import LifecycleMetrics, make_asgi_app, serve
        from lifecycle.testing import NoopBackend
        from lifecycle.testing.tiny import tiny_flux
        lc = ModuleLifecycle(tiny_flux(), policy=LifecyclePolicy(cache_dit=False), backend=NoopBackend())
        make_asgi_app(lc)
        lc.prepare(lambda module: None)
        with lc.request():
            pass
        assert not [m for m in sys.modules if m.startswith(("opentelemetry", "fastapi"))], sorted(sys.modules)
        from lifecycle.audit import events
        assert events._LISTENERS == ()
        print("clean")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "clean", result.stderr


def test_a_bad_tracer_provider_is_refused():
    with pytest.raises(InvalidConfigError, match="TracerProvider"):
        LifecycleTracing(tracer_provider="jaeger")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- router metrics
def test_in_flight_counts_waiting_and_running_requests_and_buckets_split_the_latency():
    registry = CollectorRegistry()
    metrics = LifecycleMetrics(registry).attach()
    lc = lifecycle(LifecyclePolicy(cache_dit=False, compile=False))
    shapes = [{"height": 64, "width": 64}, {"height": 32, "width": 32}]
    lc.prepare(lambda module, shape: None, shapes=shapes)
    labels = {"module": "transformer"}

    def in_flight() -> float | None:
        return registry.get_sample_value("dit_lifecycle_requests_in_flight", labels)

    inside, release = threading.Event(), threading.Event()
    seen: list[float | None] = []

    def first() -> None:
        with lc.request(shape=shapes[0]):
            inside.set()
            release.wait(20)

    def second() -> None:
        with lc.request(shape=shapes[1]):
            seen.append(in_flight())

    try:
        threads = [threading.Thread(target=first)]
        threads[0].start()
        assert inside.wait(20) and in_flight() == 1.0
        threads.append(threading.Thread(target=second))
        threads[1].start()
        for _ in range(200):  # the second waits for the module's lock: in flight too
            if in_flight() == 2.0:
                break
            threading.Event().wait(0.01)
        assert in_flight() == 2.0
        release.set()
        for thread in threads:
            thread.join(20)
        assert seen == [1.0] and in_flight() == 0.0
        with lc.request(shape={"height": 48, "width": 48}):  # a miss, served eagerly
            pass
        with pytest.raises(Exception, match="refused here"), lc.request():
            raise RuntimeError("refused here")
        count = "dit_lifecycle_bucket_request_seconds_count"
        assert registry.get_sample_value(count, {**labels, "bucket": "height=64,width=64"}) == 1.0
        assert registry.get_sample_value(count, {**labels, "bucket": "height=32,width=32"}) == 1.0
        assert registry.get_sample_value(count, {**labels, "bucket": "miss"}) == 1.0
        assert in_flight() == 0.0
        # A request that started before attach() ends unseen-started: never below zero.
        metrics.detach()
        release.clear()
        late = threading.Thread(target=first)
        inside.clear()
        late.start()
        assert inside.wait(20)
        metrics.attach()
        release.set()
        late.join(20)
        assert in_flight() == 0.0
    finally:
        release.set()
        metrics.detach()


WORKER = """
import os, sys
from prometheus_client import CollectorRegistry
from lifecycle.ops import LifecycleMetrics
from lifecycle.audit.signals import REQUEST_STARTED
metrics = LifecycleMetrics(CollectorRegistry())
for _ in range(int(sys.argv[1])):
    metrics.observe(REQUEST_STARTED, {"module": "transformer"})
metrics.observe("lifecycle.transition", {"module": "transformer", "trigger": "warm_up", "outcome": "ok",
                                         "dest": "WarmedUp", "duration_ms": 3.0})
print(os.getpid())
"""


def test_gauges_aggregate_across_worker_processes_under_a_multiproc_dir(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    pids = []
    for in_flight in (2, 3):
        done = subprocess.run([sys.executable, "-c", WORKER, str(in_flight)], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        pids.append(int(done.stdout.strip()))
    assert any(name.startswith("gauge_livesum_") for name in os.listdir(tmp_path))
    collect = textwrap.dedent(f"""
        import json
        from prometheus_client import CollectorRegistry, multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path={str(tmp_path)!r})
        before = registry.get_sample_value("dit_lifecycle_requests_in_flight", {{"module": "transformer"}})
        states = sorted(s.labels["pid"] for f in registry.collect() if f.name == "dit_lifecycle_state"
                        for s in f.samples if s.labels["state"] == "WarmedUp" and s.value == 1)
        multiprocess.mark_process_dead({pids[0]}, path={str(tmp_path)!r})
        after = registry.get_sample_value("dit_lifecycle_requests_in_flight", {{"module": "transformer"}})
        print(json.dumps([before, after, states]))
    """)
    done = subprocess.run([sys.executable, "-c", collect], capture_output=True, text=True,
                          env={**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}, timeout=120)
    assert done.returncode == 0, done.stderr
    import json

    before, after, states = json.loads(done.stdout)
    assert before == 5.0 and after == 3.0  # summed over live workers; a dead worker's share dropped
    assert states == sorted(str(pid) for pid in pids)  # each worker's own state, by pid
