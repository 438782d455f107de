"""One lifecycle driven from many threads and from an event loop, on a tiny real Flux."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import pytest
import torch
from conftest import FAST_COMPILE

from adapters import CacheDitAdapter
from lifecycle import IllegalTransitionError, LifecyclePolicy, ModuleLifecycle, PipelineLifecycle, State
from lifecycle.testing.tiny import denoise, tiny_flux

THREADS = 32
JOIN_S = 120  # a hung thread fails the test instead of hanging the suite


def _lifecycle(flux, cache_config, policy=None) -> ModuleLifecycle:
    return ModuleLifecycle(flux, backend="cpu", policy=policy, cache_config=cache_config,
                           compile_options=FAST_COMPILE)


def _join(*threads: threading.Thread) -> None:
    for thread in threads:
        thread.join(JOIN_S)
        assert not thread.is_alive(), f"{thread.name} did not finish"


def _gated_run(inputs, entered: threading.Event, release: threading.Event):
    """A warm-up callable that parks in the middle of the warm-up until released."""
    def run(module):
        denoise(module, inputs, 1)
        entered.set()
        assert release.wait(JOIN_S), "never released"
    return run


def _seqs_ok(lc: ModuleLifecycle) -> None:
    assert [r.seq for r in lc.history] == list(range(1, len(lc.history) + 1))


@pytest.mark.slow
def test_prepare_from_32_threads_compiles_once_and_all_return_warm(flux, inputs, cache_config,
                                                                  audit_events):
    lc = _lifecycle(flux, cache_config)
    calls = []
    start = threading.Barrier(THREADS)
    seen: dict[int, object] = {}

    def worker(index: int) -> None:
        start.wait()
        try:
            lc.prepare(lambda module: calls.append(denoise(module, inputs, 1)))
            seen[index] = lc.state  # read at return: prepare returns only once warm
        except BaseException as exc:  # recorded, asserted below
            seen[index] = exc

    threads = [threading.Thread(target=worker, args=(i,), name=f"prepare-{i}") for i in range(THREADS)]
    for thread in threads:
        thread.start()
    _join(*threads)
    assert seen == {i: State.WARMED_UP for i in range(THREADS)}
    assert lc.stats()["compiles"] == 1
    walk = [(e["trigger"], e["outcome"]) for e in audit_events.of("lifecycle.transition")]
    assert walk == [("mount_cache", "ok"), ("compile", "ok"), ("warm_up", "ok")]
    warm = audit_events.of("lifecycle.transition")[-1]
    assert len(calls) == warm["warmup_runs"]  # one warm-up, not one per thread
    _seqs_ok(lc)


def test_an_illegal_trigger_during_a_transition_waits_and_gets_a_clear_error(flux, inputs, cache_config):
    lc = _lifecycle(flux, cache_config, LifecyclePolicy(compile=False))
    lc.mount_cache()
    entered, release = threading.Event(), threading.Event()
    errors: dict[str, BaseException] = {}

    def call(name, fn):
        def body():
            try:
                fn()
            except BaseException as exc:
                errors[name] = exc
        return threading.Thread(target=body, name=name)

    warm = call("warm", lambda: lc.warm_up(_gated_run(inputs, entered, release)))
    warm.start()
    assert entered.wait(JOIN_S)
    intruder = call("intruder", lc.mount_cache)
    intruder.start()
    intruder.join(0.3)
    # The warm-up holds the lifecycle: the intruder waits, and nobody sees a half-moved state.
    assert intruder.is_alive()
    assert lc.state is State.CACHE_MOUNTED
    release.set()
    _join(warm, intruder)
    assert "warm" not in errors
    error = errors["intruder"]
    assert isinstance(error, IllegalTransitionError)
    assert error.state is State.WARMED_UP  # judged against the state the warm-up committed
    assert "cannot mount_cache in state WarmedUp" in str(error) and "Allowed now:" in str(error)
    assert lc.state is State.WARMED_UP
    assert [(r.trigger.value, r.outcome) for r in lc.history] == [
        ("mount_cache", "ok"), ("warm_up", "ok"), ("mount_cache", "refused"),
    ]
    _seqs_ok(lc)


def _assert_consistent(lc: ModuleLifecycle) -> None:
    """State and module agree: mounted and compiled exactly when the state says so."""
    mounted = CacheDitAdapter().is_mounted(lc.module)
    compiled = lc.module._compiled_call_impl is not None
    if lc.state is State.LOADED:
        assert not mounted and not compiled
    else:
        assert lc.state is State.WARMED_UP and mounted and compiled


@pytest.mark.slow
def test_reset_issued_mid_prepare_runs_after_it(flux, inputs, cache_config):
    lc = _lifecycle(flux, cache_config)
    entered, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def guarded(fn):
        def body():
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
        return body

    preparer = threading.Thread(target=guarded(lambda: lc.prepare(_gated_run(inputs, entered, release))))
    preparer.start()
    assert entered.wait(JOIN_S)
    resetter = threading.Thread(target=guarded(lc.reset))
    resetter.start()
    resetter.join(0.3)
    assert resetter.is_alive() and lc.state is State.COMPILED  # reset waits for the warm-up
    release.set()
    _join(preparer, resetter)
    assert errors == []
    assert [r.trigger.value for r in lc.history] == ["mount_cache", "compile", "warm_up", "reset"]
    assert lc.state is State.LOADED
    _assert_consistent(lc)
    assert torch.equal(denoise(lc.module, inputs, 2), denoise(tiny_flux(), inputs, 2))


@pytest.mark.slow
def test_reset_racing_prepare_never_tears_the_state(flux, inputs, cache_config):
    lc = _lifecycle(flux, cache_config)
    errors: list[BaseException] = []
    for _ in range(3):
        start = threading.Barrier(2)

        def racer(fn, start=start):
            def body():
                start.wait()
                try:
                    fn()
                except BaseException as exc:
                    errors.append(exc)
            return threading.Thread(target=body)

        threads = [racer(lambda: lc.prepare(lambda m: denoise(m, inputs, 1))), racer(lc.reset)]
        for thread in threads:
            thread.start()
        _join(*threads)
        _assert_consistent(lc)
    assert errors == []
    _seqs_ok(lc)
    assert all(r.outcome == "ok" for r in lc.history)


async def _ticking_while(start: Callable[[], Awaitable[None]], release: threading.Event) -> int:
    """Await ``start()`` while a ticker runs on the loop; the fifth tick sets ``release``.
    Returns the ticks counted: a loop blocked by the awaited work never reaches five."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1
            if ticks == 5:
                release.set()

    task = asyncio.create_task(ticker())
    await start()
    task.cancel()
    return ticks


def test_aprepare_keeps_the_event_loop_running(flux, inputs, cache_config):
    lc = _lifecycle(flux, cache_config)
    release = threading.Event()

    def run(module):
        denoise(module, inputs, 1)
        # Finishes only once the event loop has run the ticker: a blocked loop would time out.
        assert release.wait(JOIN_S), "the event loop did not run during aprepare"

    ticks = asyncio.run(_ticking_while(lambda: lc.aprepare(run), release))
    assert ticks >= 5
    assert lc.state is State.WARMED_UP


# (Requests from several threads run one at a time: tests/test_requests.py, four threads.)


def test_pipeline_aprepare_keeps_the_event_loop_running(shape, inputs, cache_config):
    members = {
        name: ModuleLifecycle(tiny_flux(shape), name=name, policy=LifecyclePolicy(compile=False),
                              backend="cpu", cache_config=cache_config)
        for name in ("transformer", "transformer_2")
    }
    plc = PipelineLifecycle(members)
    release = threading.Event()
    calls = []

    def run(modules):
        calls.append(sorted(modules))
        for module in modules.values():
            denoise(module, inputs, 1)
        assert release.wait(JOIN_S), "the event loop did not run during aprepare"

    async def main() -> int:
        return await _ticking_while(lambda: plc.aprepare(run, num_inference_steps=4), release)

    assert asyncio.run(main()) >= 5
    assert plc.state is State.WARMED_UP and plc.ready
    assert calls[0] == ["transformer", "transformer_2"]  # one joint call drives both members
    assert all(m.stats()["serving_steps"] == 4 for m in members.values())
