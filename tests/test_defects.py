"""One test per numbered defect of issue 14 (1-8, 10; 9 is the verifier's) and issue 20 (1-5). Each
failed on the code these issues were filed against; each scenario's audit replays clean through
the project's own verifier.

Most use the no-op adapters (the lifecycle's own behaviour, fast); the ones about cache-dit or
torch.compile use the real ones on the tiny Flux.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from conftest import FAST_COMPILE
from structlog.testing import capture_logs
from torch import nn

from lifecycle import (
    CompilePlan,
    IllegalTransitionError,
    InvalidConfigError,
    LifecyclePolicy,
    ModuleLifecycle,
    PipelineLifecycle,
    State,
    TransitionFailedError,
    UnsupportedModuleError,
)
from lifecycle._errors import AuditWriteError, AuditWriteWarning
from lifecycle.audit import JsonlSink
from lifecycle.audit.verify import verify_file
from lifecycle.testing import AuditEvents, NoopBackend, NoopCache
from lifecycle.testing.tiny import FluxShape, denoise, flux_inputs, tiny_flux

X = torch.ones(1, 4)


def _run(module: nn.Module) -> None:
    module(X) if isinstance(module, nn.Linear) else None


def _noop(**kwargs: Any) -> ModuleLifecycle:
    kwargs.setdefault("backend", NoopBackend())
    kwargs.setdefault("cache_adapter", NoopCache())
    return ModuleLifecycle(kwargs.pop("module", None) or nn.Linear(4, 4), **kwargs)


@pytest.fixture
def audited(tmp_path: Path) -> Iterator[AuditEvents]:
    """Capture the audit and write it through the JSONL sink; on exit it must verify clean."""
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path)
    with capture_logs(processors=[sink]) as logs:
        yield AuditEvents(logs)
    sink.close()
    result = verify_file(path)
    assert result.ok, (result.line, result.reason)


# ============================================================================ issue 14
class _SlowBackend(NoopBackend):
    """Compiles by meeting the other lifecycle's compile: both must be inside compile at once."""

    def __init__(self, barrier: threading.Barrier) -> None:
        super().__init__()
        self.barrier = barrier

    def compile(self, module: nn.Module, options: Any, plan: Any) -> None:
        self.barrier.wait()  # BrokenBarrierError (a failed compile) if the other one is blocked
        super().compile(module, options, plan)


def test_d1_unrelated_lifecycles_compile_at_the_same_time(audited):
    barrier = threading.Barrier(2, timeout=20)
    lcs = [_noop(name=f"m{i}", backend=_SlowBackend(barrier)) for i in range(2)]
    for lc in lcs:
        lc.mount_cache()
    errors: list[BaseException] = []

    def compile_one(lc: ModuleLifecycle) -> None:
        try:
            lc.compile()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=compile_one, args=(lc,)) for lc in lcs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert [lc.state for lc in lcs] == [State.COMPILED, State.COMPILED]


def test_d2_distributed_lifecycle_accepts_artifact_dir(tmp_path: Path):
    import torch.distributed as dist

    from lifecycle._distributed import DistributedLifecycle

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        lc = DistributedLifecycle(nn.Linear(4, 4), name="d", policy=LifecyclePolicy(cache_dit=False),
                                  backend="cpu", compile_options={"backend": "eager"},
                                  artifact_dir=tmp_path / "artifacts")
        with capture_logs() as logs:
            lc.prepare(_run)
        assert lc.state is State.WARMED_UP
        assert lc.stats()["artifacts"] is not None
        events = [e for e in logs if e["event"] == "lifecycle.transition"]
        assert all(e["rank"] == 0 and e["world_size"] == 1 for e in events)
    finally:
        dist.destroy_process_group()


def test_d3_joint_warmup_writes_each_members_own_fields(tmp_path: Path, audited):
    members = {n: _noop(name=n, artifact_dir=tmp_path / n) for n in ("a", "b")}
    PipelineLifecycle(members).prepare(lambda modules: [m(X) for m in modules.values()])
    warm = [e for e in audited.of("lifecycle.transition") if e["trigger"] == "warm_up"]
    assert sorted(e["module"] for e in warm) == ["a", "b"]
    for event in warm:
        assert event["artifacts_save"] == "empty"  # its own save, on its own event
        assert event["joint_warmup"] == ["a", "b"]
    saves = [e for e in audited.of("lifecycle.artifacts") if e.get("action") == "save"]
    assert sorted(e["module"] for e in saves) == ["a", "b"]


class _RefreshBreaks(NoopCache):
    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def refresh(self, module: nn.Module, config: Any, num_inference_steps: int | None = None) -> None:
        if self.broken:
            raise RuntimeError("context manager gone")
        super().refresh(module, config, num_inference_steps)


def test_d4_pipeline_request_whose_second_member_cannot_start_runs_nowhere(audited):
    broken = _RefreshBreaks()
    plc = PipelineLifecycle({"a": _noop(name="a"), "b": _noop(name="b", cache_adapter=broken)})
    plc.prepare(lambda modules: None)
    broken.broken = True
    ran = False
    with pytest.raises(TransitionFailedError, match="could not start"):
        with plc.request(request_id="p-1"):
            ran = True
    assert not ran
    requests = audited.of("lifecycle.request")
    # a had started (its context was refreshed) and is taken back: refused, nothing ran.
    assert [(e["module"], e["outcome"]) for e in requests] == [("b", "failed"), ("a", "refused")]
    assert "'b' could not start" in requests[1]["error"]
    assert plc.state is State.WARMED_UP


def test_d5_a_differently_configured_lifecycle_over_a_driven_module_is_refused(audited):
    module = nn.Linear(4, 4)
    cached = _noop(module=module, name="cached")
    cached.prepare(_run)
    with pytest.raises(InvalidConfigError, match="'cached'") as info:
        _noop(module=module, name="plain", policy=LifecyclePolicy(cache_dit=False))
    assert "reset()" in str(info.value)
    # Built while the other is Loaded, it is refused when it would start driving the module.
    cached.reset()
    plain = _noop(module=module, name="plain", policy=LifecyclePolicy(cache_dit=False))
    cached.prepare(_run)
    with pytest.raises(InvalidConfigError, match="'cached'"):
        plain.compile()
    assert plain.state is State.LOADED
    assert audited.of("lifecycle.transition", "plain")[-1]["outcome"] == "refused"


def test_d5_lifecycles_sharing_a_module_serve_one_request_at_a_time(audited):
    module = nn.Linear(4, 4)
    first, second = _noop(module=module, name="first"), _noop(module=module, name="second")
    first.prepare(_run)
    second.prepare(_run)  # adopts: configured alike
    entered = threading.Event()

    def serve_second() -> None:
        with second.request(request_id="r-2"):
            entered.set()

    with first.request(request_id="r-1"):
        thread = threading.Thread(target=serve_second)
        thread.start()
        # Same module, same lock: the second request cannot start while this one runs.
        assert not entered.wait(timeout=0.3)
    thread.join(timeout=10)
    assert entered.is_set()
    assert [e["request_id"] for e in audited.of("lifecycle.request")] == ["r-1", "r-2"]


class _FullDisk:
    """A sink processor that fails like a full disk while ``full`` is set."""

    def __init__(self) -> None:
        self.full = False

    def __call__(self, _logger: Any, _method: str, event_dict: Any) -> Any:
        if self.full and event_dict.get("event") == "lifecycle.transition":
            raise OSError(28, "No space left on device")
        return event_dict


def test_d6_a_failed_audit_write_is_reported_and_never_a_state_lie():
    disk = _FullDisk()
    lc = _noop()
    with capture_logs(processors=[disk]):
        disk.full = True
        # Success: the state moved, and the typed error says so.
        with pytest.raises(AuditWriteError, match="state is now CacheMounted") as info:
            lc.mount_cache()
        assert lc.state is State.CACHE_MOUNTED and info.value.state is State.CACHE_MOUNTED
        assert isinstance(info.value.__cause__, OSError)
        assert lc.history[-1].outcome == "ok"
        # Refusal: the refusal's own type survives; the lost event is a warning and a note.
        with pytest.warns(AuditWriteWarning, match="No space left"):
            with pytest.raises(IllegalTransitionError) as refused:
                lc.mount_cache()
        assert any("No space left" in note for note in refused.value.__notes__)
        assert lc.state is State.CACHE_MOUNTED
        disk.full = False
        lc.compile()  # and the lifecycle goes on
    assert [r.seq for r in lc.history] == [1, 2, 3]


class _RestoreBreaks(NoopCache):
    """Steering works; restoring the serving context after warm-up fails while ``broken``."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def refresh(self, module: nn.Module, config: Any, num_inference_steps: int | None = None) -> None:
        if self.broken:
            raise RuntimeError("refresh_context failed")
        super().refresh(module, config, num_inference_steps)


def test_d7_a_failed_restore_after_warmup_never_leaves_the_steered_context_ready(audited):
    cache = _RestoreBreaks()
    lc = _noop(cache_adapter=cache)
    lc.prepare(_run)
    assert lc.ready
    cache.broken = True
    with pytest.raises(TransitionFailedError, match="refresh_context failed"):
        lc.warm_up(_run)  # WarmedUp -> WarmedUp: the steered context could not be replaced
    assert lc.state is State.WARMED_UP
    assert not lc.ready  # the warm-up's steered context must not look ready to serve
    cache.broken = False
    lc.refresh()
    assert lc.ready


def test_d8_a_module_the_host_compiled_is_refused(audited):
    module = nn.Linear(4, 4)
    module.compile(backend="eager")
    with pytest.raises(UnsupportedModuleError, match="already compiled in place by the host"):
        _noop(module=module)
    module._compiled_call_impl = None
    _noop(module=module).prepare(_run)  # the fix the message names


def test_d8_a_module_the_host_mounted_is_adopted_explicitly(cache_config, audited):
    import cache_dit

    flux = tiny_flux(FluxShape())
    cache_dit.enable_cache(flux, cache_config=cache_config)
    lc = ModuleLifecycle(flux, policy=LifecyclePolicy(compile=False), backend="cpu",
                         cache_config=cache_config)
    lc.mount_cache()
    (event,) = audited.of("lifecycle.transition")
    assert event["adopted"] == "host"
    lc.reset()
    assert not getattr(flux, "_is_cached", False)  # reset() unmounts what it adopted


def test_d10_wrong_typed_inputs_get_typed_errors(cache_config, audited):
    import cache_dit

    lc = _noop()
    with pytest.raises(InvalidConfigError, match="mapping of member name"):
        PipelineLifecycle([lc, _noop()])  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="CacheAdapter"):
        ModuleLifecycle(nn.Linear(4, 4), backend=NoopBackend(), cache_adapter=object())  # type: ignore[arg-type]
    flux = tiny_flux(FluxShape())
    bad = cache_dit.DBCacheConfig(residual_diff_threshold="0.1")
    with pytest.raises(InvalidConfigError, match="residual_diff_threshold"):
        ModuleLifecycle(flux, backend="cpu", cache_config=bad, compile_options=FAST_COMPILE)
    too_many = cache_dit.DBCacheConfig(Fn_compute_blocks=2, Bn_compute_blocks=1)  # tiny Flux: 2 + 2 blocks
    with pytest.raises(InvalidConfigError, match=r"Fn_compute_blocks=2 \+ Bn_compute_blocks=1 = 3 exceed"):
        ModuleLifecycle(flux, backend="cpu", cache_config=too_many, compile_options=FAST_COMPILE)
    assert getattr(flux, "_is_cached", False) is False and flux._compiled_call_impl is None


# ============================================================================ issue 20
def test_i20_1_another_asyncio_task_cannot_enter_a_running_request(audited):
    lc = _noop()
    lc.prepare(_run)
    seen: dict[str, Any] = {}

    async def serve() -> None:
        with lc.request(num_inference_steps=8, request_id="r-a") as req:
            await asyncio.sleep(0.05)  # suspended mid-request: the other task runs now
            seen["steps"] = req.num_inference_steps

    async def intrude() -> None:
        await asyncio.sleep(0.01)
        for call in (lambda: lc.refresh(num_inference_steps=2), lc.reset):
            with pytest.raises(IllegalTransitionError, match="another asyncio task"):
                call()
        with pytest.raises(IllegalTransitionError, match="another asyncio task"):
            with lc.request(request_id="r-b"):
                pass

    async def main() -> None:
        await asyncio.gather(serve(), intrude())

    asyncio.run(main())
    assert seen["steps"] == 8  # the request's context and record were not touched
    assert lc.state is State.WARMED_UP and lc.stats()["serving_steps"] is None
    outcomes = [(e["request_id"], e["outcome"]) for e in audited.of("lifecycle.request")]
    assert outcomes == [("r-b", "refused"), ("r-a", "ok")] or outcomes == [(None, "refused"), ("r-a", "ok")]
    refused = [e for e in audited.of("lifecycle.transition") if e["outcome"] == "refused"]
    assert [e["trigger"] for e in refused] == ["refresh", "reset"]


@pytest.mark.parametrize(("run", "steps"), [(None, None), (_run, 0), (_run, 2.5)])
def test_i20_2_prepare_refusals_are_audited(run: Any, steps: Any, audited):
    lc = _noop()
    with pytest.raises(InvalidConfigError):
        lc.prepare(run, steps)
    assert lc.state is State.LOADED
    (event,) = audited.of("lifecycle.transition")
    assert event["outcome"] == "refused" and event["error_type"] == "InvalidConfigError"
    assert event["source"] == event["dest"] == "Loaded"


def test_i20_3_the_same_lifecycle_twice_in_a_pipeline_is_refused(audited):
    lc = _noop(name="t")
    with pytest.raises(InvalidConfigError, match="'a' and 'b' are the same lifecycle"):
        PipelineLifecycle({"a": lc, "b": lc})
    assert lc.history == ()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"backend": "inductor", "options": {"no_such_option": 1}}, "unknown inductor option"),
        ({"backend": "inductor", "options": {"max_autotune": "yes"}}, "max_autotune.*must be bool"),
        ({"backend": "eager"}, "no repeated blocks"),
    ],
)
def test_i20_4_compile_options_that_fail_inside_compile_are_refused_at_construction(options, match):
    module = nn.Sequential(nn.Linear(4, 4), nn.ReLU())  # no repeated blocks
    plan = CompilePlan(scope="blocks") if match == "no repeated blocks" else CompilePlan()
    with pytest.raises(InvalidConfigError, match=match):
        ModuleLifecycle(module, policy=LifecyclePolicy(cache_dit=False), backend="cpu",
                        compile_options=options, compile_plan=plan)
    assert module._compiled_call_impl is None


@pytest.mark.slow
def test_i20_5_a_plain_warmup_at_two_shapes_fails_typed_naming_declared_shapes(cache_config, audited):
    shape = FluxShape()
    small = FluxShape(image_tokens=16)
    flux = tiny_flux(shape)
    big_inputs, small_inputs = flux_inputs(shape), flux_inputs(small)
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)

    def two_shapes(module: nn.Module) -> None:
        denoise(module, big_inputs, 1)
        denoise(module, small_inputs, 1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TransitionFailedError, match=r"prepare\(run, shapes=\[\.\.\.\]\)"):
            lc.prepare(two_shapes)
    assert lc.state is State.COMPILED
    assert lc.history[-1].outcome == "failed"
    # One shape per warm-up prepares.
    lc.prepare(lambda module: denoise(module, big_inputs, 1))
    assert lc.state is State.WARMED_UP


def test_request_events_carry_the_lifecycles_base_fields(audited):
    lc = _noop(name="base")
    lc.prepare(_run)
    with lc.request(request_id="r"):
        pass
    (request,) = audited.of("lifecycle.request")
    transition = audited.of("lifecycle.transition")[-1]
    for key in ("module", "module_id", "backend", "policy"):
        assert request[key] == transition[key]
    assert "rank" not in structlog.contextvars.get_contextvars()
    time.sleep(0)  # (nothing bound leaks out of a request either)
