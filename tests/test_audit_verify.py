"""The JSONL audit: real lifecycles write files that verify clean; hand-made bad files fail at
the right line with the right reason; the sink loses nothing and never interleaves lines."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import FAST_COMPILE, SERVING_STEPS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle import (
    IllegalTransitionError,
    LifecyclePolicy,
    ModuleLifecycle,
    State,
    TransitionFailedError,
)
from lifecycle.audit import (
    CACHE_REFRESH_EVENT,
    REQUEST_KEYS,
    TRANSITION_KEYS,
    AuditSinkError,
    JsonlSink,
    configure_default,
)
from lifecycle.audit.verify import read_events, verify_file
from lifecycle.testing.tiny import denoise, denoiser, tiny_flux
from states import Trigger

NO_COMPILE = LifecyclePolicy(compile=False)


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    """configure_default changes structlog's global configuration: put it back afterwards."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def audit_file(tmp_path: Path, restore_structlog: None) -> Iterator[Path]:
    """A JSONL audit attached the way a script does it (configure_default), closed after."""
    path = tmp_path / "audit.jsonl"
    sink = configure_default(path, echo=False)
    assert sink is not None
    yield path
    sink.close()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------- real lifecycles
@pytest.mark.slow
def test_full_lifecycle_with_compile_verifies_clean(flux, inputs, cache_config, audit_file):
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=FAST_COMPILE)
    with pytest.raises(IllegalTransitionError):
        lc.compile()  # the trap, refused and audited
    with structlog.contextvars.bound_contextvars(rank=0):
        lc.prepare(denoiser(inputs, 2), num_inference_steps=SERVING_STEPS)
    for index in range(2):
        with lc.request(num_inference_steps=SERVING_STEPS, request_id=f"r{index}"):
            denoise(lc.module, inputs, SERVING_STEPS)
    lc.refresh(num_inference_steps=SERVING_STEPS)
    lc.invalidate()
    lc.warm_up(denoiser(inputs, 2))
    lc.reset()
    with pytest.raises(IllegalTransitionError):
        with lc.request():
            pass

    result = verify_file(audit_file)
    assert result.ok, str(result)
    assert (result.transitions, result.requests, result.modules, result.recompiles) == (8, 3, 1, 0)
    events = _lines(audit_file)
    transitions = [e for e in events if e["event"] == "lifecycle.transition"]
    assert [e["seq"] for e in transitions] == list(range(1, 9))
    assert all(set(TRANSITION_KEYS) <= set(e) and "timestamp" in e for e in transitions)
    assert transitions[0]["outcome"] == "refused" and "mount_cache" in transitions[0]["error"]
    assert {e["rank"] for e in transitions[1:4]} == {0}  # contextvars reach the file
    requests = [e for e in events if e["event"] == "lifecycle.request"]
    assert all(set(REQUEST_KEYS) <= set(e) for e in requests)
    assert [e["outcome"] for e in requests] == ["ok", "ok", "refused"]
    assert [e["request_id"] for e in requests[:2]] == ["r0", "r1"]


def test_failures_and_two_modules_from_threads_verify_clean(inputs, cache_config, audit_file):
    def broken(_module: Any) -> None:
        raise RuntimeError("warm-up broke")

    def life(name: str) -> None:
        lc = ModuleLifecycle(tiny_flux(), name=name, policy=NO_COMPILE, backend="cpu",
                             cache_config=cache_config)
        lc.mount_cache()
        with pytest.raises(TransitionFailedError):
            lc.warm_up(broken)
        with pytest.raises(IllegalTransitionError):
            lc.mount_cache()
        lc.prepare(denoiser(inputs, 1))
        with pytest.raises(KeyError):
            with lc.request(num_inference_steps=2):
                raise KeyError("request broke")
        with lc.request(num_inference_steps=2):
            denoise(lc.module, inputs, 2)

    errors: list[BaseException] = []

    def guarded(name: str) -> None:
        try:
            life(name)
        except BaseException as exc:  # surfaced below: a thread's assert must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(f"dit{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    result = verify_file(audit_file)
    assert result.ok, str(result)
    assert (result.modules, result.transitions, result.requests) == (2, 8, 4)
    failed = [e for e in _lines(audit_file) if e.get("outcome") == "failed"]
    assert {e["event"] for e in failed} == {"lifecycle.transition", "lifecycle.request"}
    assert all(e["error_type"] == "RuntimeError" for e in failed if e["event"] == "lifecycle.transition")


def test_cache_refresh_after_warmup_is_audited_at_debug(flux, inputs, cache_config, audit_events):
    lc = ModuleLifecycle(flux, policy=NO_COMPILE, backend="cpu", cache_config=cache_config)
    lc.prepare(denoiser(inputs, 1), num_inference_steps=SERVING_STEPS)
    (event,) = audit_events.of(CACHE_REFRESH_EVENT)
    assert event["log_level"] == "debug"
    assert (event["reason"], event["num_inference_steps"], event["module_id"]) == (
        "after_warmup", SERVING_STEPS, lc.module_id,
    )


# ---------------------------------------------------------------------------- hand-made files
DEFAULT = {"cache_dit": True, "compile": True}


def _t(seq: int, trigger: str, source: str, dest: str, outcome: str = "ok", *,
       module_id: str = "m1", policy: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    event = {
        "event": "lifecycle.transition", "module": "dit", "module_id": module_id, "trigger": trigger,
        "source": source, "dest": dest, "outcome": outcome, "duration_ms": 1.0, "backend": "cpu",
        "policy": DEFAULT if policy is None else policy, "seq": seq,
    }
    if outcome != "ok":
        event["error"] = "SomeError: boom"
    event.update(extra)
    return event


def _r(request_id: str = "r1", outcome: str = "ok", *, module_id: str = "m1", **extra: Any) -> dict[str, Any]:
    event = {
        "event": "lifecycle.request", "module": "dit", "module_id": module_id, "request_id": request_id,
        "num_inference_steps": 8, "cached_steps": 2, "new_graphs": 0, "duration_ms": 3.0,
        "outcome": outcome, "state": "WarmedUp",
    }
    event.update(extra)
    return event


PREPARED = [
    _t(1, "mount_cache", "Loaded", "CacheMounted"),
    _t(2, "compile", "CacheMounted", "Compiled"),
    _t(3, "warm_up", "Compiled", "WarmedUp"),
]


def _write(tmp_path: Path, events: list[Any], tail: str = "") -> Path:
    path = tmp_path / "hand.jsonl"
    text = "".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in events)
    path.write_text(text + tail)
    return path


def test_hand_made_clean_file_with_host_events_and_blank_lines(tmp_path):
    events = [
        {"event": "host started", "level": "info"},
        *PREPARED,
        "",
        _r("r1"),
        _t(1, "mount_cache", "Loaded", "CacheMounted", module_id="m2"),  # another module
        _r("early", "refused", module_id="m3", state="Loaded"),  # refused outside WarmedUp: correct
        {"event": "lifecycle.recompile", "module": "dit", "module_id": "m1", "new_graphs": 1},
        {"event": "lifecycle.something_new", "module": "dit"},  # newer event kinds are tolerated
        _t(4, "refresh", "WarmedUp", "WarmedUp"),
        _t(5, "compile", "WarmedUp", "WarmedUp", "refused"),
        _t(6, "warm_up", "WarmedUp", "WarmedUp", "failed"),
        _t(7, "reset", "WarmedUp", "Loaded"),
    ]
    result = verify_file(_write(tmp_path, events))
    assert result.ok, str(result)
    assert (result.transitions, result.requests, result.modules, result.recompiles) == (8, 2, 2, 1)
    assert str(result).endswith("1 recompile event(s))")


@pytest.mark.parametrize(
    ("events", "tail", "line", "needles"),
    [
        pytest.param(  # the trap itself: compile before mount_cache, recorded as ok
            [_t(1, "compile", "Loaded", "Compiled")], "", 1,
            ["illegal transition", "compile from Loaded", "call mount_cache() first"], id="illegal",
        ),
        pytest.param(
            [*PREPARED[:1], _t(2, "compile", "CacheMounted", "WarmedUp")], "", 2,
            ["compile from CacheMounted leads to Compiled", "says WarmedUp"], id="wrong-dest",
        ),
        pytest.param(
            [_t(1, "compile", "Loaded", "Compiled", policy={"cache_dit": False, "compile": True}),
             _t(2, "mount_cache", "Compiled", "CacheMounted", policy={"cache_dit": False, "compile": True})],
            "", 2, ["illegal transition", "policy cache_dit=False,compile=True"], id="recorded-policy",
        ),
        pytest.param(
            [PREPARED[0], PREPARED[1], _t(4, "warm_up", "Compiled", "WarmedUp")], "", 3,
            ["seq gap", "expected 3", "got 4", "3..3 missing"], id="gap",
        ),
        pytest.param([PREPARED[1]], "", 1, ["starts at seq 2, not 1"], id="missing-start"),
        pytest.param(
            [PREPARED[0], PREPARED[1], _t(2, "warm_up", "Compiled", "WarmedUp")], "", 3,
            ["seq goes back", "expected 3 after line 2, got 2"], id="duplicate-seq",
        ),
        pytest.param(
            [PREPARED[0], _t(2, "warm_up", "Compiled", "WarmedUp")], "", 2,
            ["starts from Compiled", "was in CacheMounted after line 1"], id="source-mismatch",
        ),
        pytest.param(
            [PREPARED[0], _t(2, "compile", "CacheMounted", "Compiled", "failed")], "", 2,
            ["failed transition leaves the state unchanged", "CacheMounted -> Compiled"],
            id="failed-moved",
        ),
        pytest.param(
            [{k: v for k, v in PREPARED[0].items() if k != "seq"}], "", 1,
            ["missing key 'seq'", "lifecycle.transition"], id="missing-key",
        ),
        pytest.param(
            [{k: v for k, v in _t(1, "reset", "Loaded", "Loaded", "refused").items() if k != "error"}],
            "", 1, ["missing key 'error'", "refused lifecycle.transition"], id="missing-error",
        ),
        pytest.param([{"module": "dit"}], "", 1, ["missing key 'event'"], id="missing-event"),
        pytest.param(
            [*PREPARED[:2], _t(3, "warm_up", "Compiled", "Warm")], "", 3,
            ["unknown state 'Warm'", "'dest'", "Loaded, CacheMounted, Compiled, WarmedUp"],
            id="unknown-state",
        ),
        pytest.param(
            [_t(1, "teleport", "Loaded", "WarmedUp")], "", 1, ["unknown trigger 'teleport'"],
            id="unknown-trigger",
        ),
        pytest.param(
            [_t(1, "mount_cache", "Loaded", "CacheMounted", "maybe")], "", 1,
            ["unknown outcome 'maybe'"], id="unknown-outcome",
        ),
        pytest.param(
            [_t(1, "mount_cache", "Loaded", "CacheMounted", policy={"cache_dit": True, "fast": True})],
            "", 1, ["bad 'policy'", "unknown policy keys ['fast']"], id="bad-policy",
        ),
        pytest.param(
            [PREPARED[0], _t(2, "warm_up", "CacheMounted", "WarmedUp", policy={"cache_dit": True,
                                                                                  "compile": False})],
            "", 2, ["policy changed"], id="policy-changed",
        ),
        pytest.param(
            [_t("2", "mount_cache", "Loaded", "CacheMounted")], "", 1, ["'seq' must be an integer"],
            id="seq-not-int",
        ),
        pytest.param(
            [*PREPARED[:2], _r("r9", state="Compiled")], "", 3,
            ["request 'r9'", "ran (ok) in Compiled", "no request under policy", "only in WarmedUp"],
            id="request-outside-warmedup",
        ),
        pytest.param(
            [*PREPARED, _t(4, "reset", "WarmedUp", "Loaded"), _r("r2", "failed")], "", 5,
            ["request 'r2'", "ran (failed) in Loaded", "the transitions before it"],
            id="request-after-reset",
        ),
        pytest.param([_r("r1", module_id="ghost")], "", 1, ["module_id 'ghost'", "ran (ok) in Loaded"],
                     id="request-unknown-module"),
        pytest.param([*PREPARED, _r("r1", state="Hot")], "", 4, ["unknown state 'Hot'"],
                     id="request-unknown-state"),
        pytest.param([{k: v for k, v in _r().items() if k != "cached_steps"}], "", 1,
                     ["missing key 'cached_steps'", "lifecycle.request"], id="request-missing-key"),
        pytest.param([*PREPARED, "{not json"], "", 4, ["not valid JSON", "{not json"], id="non-json"),
        pytest.param([*PREPARED, "[1, 2]"], "", 4, ["a JSON list, not an object"], id="json-list"),
        pytest.param(  # a torn line in the middle: a crash, then another writer appended
            [PREPARED[0], '{"event": "lifecycle.trans', PREPARED[1]], "", 2,
            ["not valid JSON", "looks cut short", "JsonlSink ends it"],
            id="torn-in-middle",
        ),
    ],
)
def test_bad_files_fail_at_the_right_line(tmp_path, events, tail, line, needles):
    result = verify_file(_write(tmp_path, events, tail))
    assert not result.ok
    assert result.line == line, str(result)
    for needle in needles:
        assert needle in result.reason, (needle, result.reason)
    assert str(result).startswith(f"{tmp_path / 'hand.jsonl'}:{line}: ")
    assert not result.torn


def test_torn_last_line_is_reported_as_torn(tmp_path):
    path = _write(tmp_path, PREPARED, tail='{"event":"lifecycle.request","module":"di')
    result = verify_file(path)
    assert (result.ok, result.torn, result.line) == (False, True, 4)
    assert result.reason.startswith("torn last line")
    assert result.transitions == 3  # everything before it was replayed


def test_every_cut_of_a_real_audit_is_clean_or_torn(flux, inputs, cache_config, audit_file):
    """A crash can stop the writer at any byte: the verifier sees a clean prefix or a torn tail."""
    lc = ModuleLifecycle(flux, policy=NO_COMPILE, backend="cpu", cache_config=cache_config)
    lc.prepare(denoiser(inputs, 1))
    with lc.request(num_inference_steps=2):
        denoise(lc.module, inputs, 2)
    data = audit_file.read_bytes()
    boundaries = {index + 1 for index, byte in enumerate(data) if byte == ord("\n")}
    cut_file = audit_file.with_name("cut.jsonl")
    for cut in range(1, len(data)):
        cut_file.write_bytes(data[:cut])
        result = verify_file(cut_file)
        if cut in boundaries or cut + 1 in boundaries:  # only the newline missing: complete
            assert result.ok, (cut, str(result))
        else:
            assert result.torn and result.line == data[:cut].count(b"\n") + 1, (cut, str(result))


def test_unreadable_and_non_utf8_files(tmp_path):
    missing = verify_file(tmp_path / "nope.jsonl")
    assert (missing.ok, missing.line) == (False, 0)
    assert "cannot read the file" in missing.reason
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(PREPARED[0]).encode() + b"\n\xff\xfe\n")
    result = verify_file(path)
    assert (result.line, result.torn) == (2, False)
    assert "not UTF-8" in result.reason
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert verify_file(empty).ok and verify_file(empty).events == 0


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_keys = st.sampled_from([*TRANSITION_KEYS, *REQUEST_KEYS, "event", "error", "state"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    events=st.lists(
        st.builds(
            lambda base, drop, override: {
                **{k: v for k, v in base.items() if k not in drop}, **override
            },
            st.sampled_from([*PREPARED, _r(), _t(4, "reset", "WarmedUp", "Loaded")]),
            st.sets(_keys, max_size=2),
            st.dictionaries(_keys, _json_values, max_size=2),
        ),
        max_size=6,
    ),
    tail=st.binary(max_size=12),
)
def test_verifier_never_raises(tmp_path, events, tail):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in events) + tail)
    result = verify_file(path)  # any garbage gives a result, never a traceback
    assert result.ok or (result.line is not None and result.reason)


def test_read_events_yields_line_numbers(tmp_path):
    path = _write(tmp_path, [PREPARED[0], "", PREPARED[1]])
    assert [line for line, _ in read_events(path)] == [1, 3]


# ---------------------------------------------------------------------------- the sink
def test_concurrent_writers_produce_only_whole_lines(tmp_path, restore_structlog):
    path = tmp_path / "threads.jsonl"
    sink = configure_default(path, echo=False)
    log = structlog.get_logger("dit_lifecycle")
    big = "x" * 20_000  # larger than the file buffer: one event takes several write() calls
    threads_n, per_thread = 8, 150
    barrier = threading.Barrier(threads_n)

    def writer(index: int) -> None:
        barrier.wait()
        for n in range(per_thread):
            log.info("host.event", writer=index, n=n, payload=big if n % 10 == 0 else "y")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sink.close()
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    events = [json.loads(line) for line in raw.decode().splitlines()]  # each line whole JSON
    assert len(events) == threads_n * per_thread
    for index in range(threads_n):
        assert [e["n"] for e in events if e["writer"] == index] == list(range(per_thread))
    assert all(e["payload"] in (big, "y") for e in events)


def test_sink_that_cannot_open_fails_at_set_up(tmp_path, restore_structlog):
    before = structlog.get_config()
    for bad in (tmp_path / "no-such-dir" / "audit.jsonl", tmp_path):
        with pytest.raises(AuditSinkError, match="cannot open audit file"):
            configure_default(bad, echo=False)
        with pytest.raises(AuditSinkError):
            JsonlSink(bad)
    assert structlog.get_config() == before  # nothing half-configured


def test_closed_sink_refuses_to_lose_events(tmp_path):
    sink = JsonlSink(tmp_path / "a.jsonl", fsync=True)
    sink(None, "info", {"event": "one"})
    sink.close()
    assert sink.closed
    with pytest.raises(AuditSinkError, match="closed"):
        sink(None, "info", {"event": "two"})
    assert [e["event"] for e in _lines(tmp_path / "a.jsonl")] == ["one"]


def test_sink_passes_events_on_or_drops_them(tmp_path):
    passing = JsonlSink(tmp_path / "p.jsonl")
    assert passing(None, "warning", {"event": "e"}) == {"event": "e"}
    dropping = JsonlSink(tmp_path / "d.jsonl", drop=True)
    with pytest.raises(structlog.DropEvent):
        dropping(None, "info", {"event": "e", "obj": object()})  # not JSON-able: written as str
    assert _lines(tmp_path / "p.jsonl") == [{"event": "e", "level": "warning"}]
    assert _lines(tmp_path / "d.jsonl")[0]["obj"].startswith("<object object")
    passing.close()
    dropping.close()


def test_configure_default_echo_and_level(tmp_path, restore_structlog, capsys):
    import io

    stream = io.StringIO()
    sink = configure_default(tmp_path / "a.jsonl", stream=stream, level="debug")
    log = structlog.get_logger("dit_lifecycle")
    with structlog.contextvars.bound_contextvars(request_id="r-1"):
        log.debug("lifecycle.cache_refresh", module="dit")
    sink.close()
    (event,) = _lines(tmp_path / "a.jsonl")
    assert (event["request_id"], event["level"]) == ("r-1", "debug")
    assert event["event"] == "lifecycle.cache_refresh"
    assert event["timestamp"].endswith("Z")
    assert "lifecycle.cache_refresh" in stream.getvalue() and "r-1" in stream.getvalue()

    assert configure_default(None, echo=False) is None  # no file, nothing printed
    structlog.get_logger("x").info("silent")
    assert configure_default(tmp_path / "b.jsonl", echo=False, level="info") is not None
    structlog.get_logger("x").debug("filtered")
    structlog.get_logger("x").info("kept")
    assert [e["event"] for e in _lines(tmp_path / "b.jsonl")] == ["kept"]
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="unknown log level"):
        configure_default(None, level="loud")


def test_state_after_replay_matches_the_lifecycle(flux, inputs, cache_config, audit_file):
    """The replay and the lifecycle agree on where the module is."""
    from lifecycle.audit.verify import Replay

    lc = ModuleLifecycle(flux, policy=NO_COMPILE, backend="cpu", cache_config=cache_config)
    lc.prepare(denoiser(inputs, 1))
    lc.invalidate()
    replay = Replay()
    for line, event in read_events(audit_file):
        replay.feed(line, event)
    assert replay.modules[lc.module_id].state is lc.state is State.CACHE_MOUNTED
    assert replay.modules[lc.module_id].seq == len(lc.history)
    assert Trigger.WARM_UP in lc.allowed_triggers()


# ---------------------------------------------------------------------------- defect 9
@pytest.mark.parametrize("depth", [200, 5_000, 200_000])
@pytest.mark.parametrize("where", ["line", "policy", "request_id"])
def test_deeply_nested_json_is_a_one_line_reason(tmp_path, depth, where):
    """However deep, nesting gives a reason on the right line, never a RecursionError."""
    nested = "[" * depth + "]" * depth
    if where == "line":
        text = nested
    elif where == "policy":
        text = json.dumps(_t(2, "compile", "CacheMounted", "Compiled")).replace(
            json.dumps(DEFAULT), nested)
    else:
        text = json.dumps(_r()).replace('"r1"', nested)
    path = _write(tmp_path, [PREPARED[0], text, PREPARED[1]])
    result = verify_file(path)
    assert (result.ok, result.line) == (False, 2), str(result)
    assert "\n" not in result.reason and len(result.reason) < 400
    from lifecycle.audit.show import render_timeline

    assert f":2: {result.reason}" in render_timeline(path)  # show reads it too, and says why


def test_request_legality_is_read_from_the_table(tmp_path, monkeypatch):
    """The verifier asks ``states.destination`` with ``Trigger.REQUEST``; nothing hand-written."""
    from lifecycle.audit import verify as verify_module

    path = _write(tmp_path, [*PREPARED[:2], _r("r9", state="Compiled")])
    assert not verify_file(path).ok
    asked: list[tuple[State, Trigger]] = []
    real = verify_module.destination

    def lenient(policy: LifecyclePolicy, source: State, trigger: Trigger) -> State | None:
        asked.append((source, trigger))
        if trigger is Trigger.REQUEST:
            return source  # a table in which a request is legal anywhere
        return real(policy, source, trigger)

    monkeypatch.setattr(verify_module, "destination", lenient)
    assert verify_file(path).ok
    assert (State.COMPILED, Trigger.REQUEST) in asked


_PEAK = """
import os, resource, sys
from lifecycle.audit.show import write_timeline
from lifecycle.audit.verify import verify_file
if sys.argv[2] == "show":
    with open(os.devnull, "w") as out:
        result = write_timeline(sys.argv[1], out)
else:
    result = verify_file(sys.argv[1])
print(result.ok, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_kib(path: Path, what: str) -> tuple[bool, int]:
    """Verify (or show) ``path`` in a fresh interpreter; its verdict and peak RSS in KiB."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _PEAK, str(path), what], capture_output=True, text=True,
                         timeout=300, check=True)
    ok, peak = run.stdout.split()
    return ok == "True", int(peak)


@pytest.fixture(scope="module")
def big_audit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean 48 MB audit: one module prepared, then requests carrying a 3 kB host field."""
    big = tmp_path_factory.mktemp("big") / "big.jsonl"
    padding = "x" * 3000  # host fields on each event; the file is what it is, the reader must stream
    with big.open("w") as handle:
        for event in PREPARED:
            handle.write(json.dumps(event) + "\n")
        chunk = (json.dumps(_r("r", note=padding)) + "\n") * 1000
        for _ in range(48_000_000 // len(chunk)):
            handle.write(chunk)
    return big


@pytest.mark.parametrize("what", ["verify", "show"])
def test_a_big_audit_is_read_streaming_in_bounded_memory(tmp_path, big_audit, what):
    """A 48 MB audit verifies (and shows) with a peak memory far below its size."""
    big = big_audit
    size_kib = big.stat().st_size // 1024
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    ok, peak = _peak_rss_kib(big, what)
    ok_empty, baseline = _peak_rss_kib(empty, what)
    assert ok and ok_empty
    assert size_kib > 40_000
    assert peak - baseline < size_kib // 10, (peak, baseline, size_kib)


def test_lines_over_the_limit_are_refused_without_reading_them_whole(tmp_path, monkeypatch):
    from lifecycle.audit import verify as verify_module

    monkeypatch.setattr(verify_module, "MAX_LINE_BYTES", 1024)
    path = _write(tmp_path, [PREPARED[0], _t(2, "compile", "CacheMounted", "Compiled", note="y" * 2000)])
    result = verify_file(path)
    assert (result.ok, result.line) == (False, 2) and "line longer than" in result.reason


def _torn(tmp_path: Path) -> Path:
    """An audit whose writer crashed mid-line: one whole event, then half of the next."""
    path = tmp_path / "crashed.jsonl"
    path.write_text(json.dumps(PREPARED[0]) + "\n" + json.dumps(PREPARED[1])[:40])
    return path


def test_the_next_writer_after_a_crash_loses_nothing(tmp_path, restore_structlog):
    """A real lifecycle in the next 'process' appends to the torn file; every event survives."""
    from torch import nn

    from lifecycle.testing import NoopBackend

    path = _torn(tmp_path)
    assert verify_file(path).torn
    sink = configure_default(path, echo=False)
    assert sink is not None
    lc = ModuleLifecycle(nn.Linear(2, 2), name="next", policy=LifecyclePolicy(cache_dit=False),
                         backend=NoopBackend(), compile_options={})
    lc.prepare(lambda module: None)
    with lc.request(request_id="after-crash"):
        pass
    sink.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[2])["event"] == "lifecycle.audit_resumed"
    assert json.loads(lines[2])["torn_bytes"] == 40
    result = verify_file(path)
    assert result.ok, str(result)
    assert result.repaired == (2,) and "torn line(s) 2 from a crash" in str(result)
    assert (result.transitions, result.requests, result.modules) == (3, 1, 2)  # 1 before, 2 after
    events = [json.loads(line) for line in lines[3:]]
    assert [e.get("trigger", e.get("request_id")) for e in events] == ["compile", "warm_up", "after-crash"]


def test_lines_after_a_repaired_tear_are_still_checked(tmp_path):
    path = _torn(tmp_path)
    with JsonlSink(path) as sink:
        sink(None, "info", _t(1, "compile", "Loaded", "Compiled", module_id="m2"))  # the trap
    result = verify_file(path)
    assert (result.ok, result.line) == (False, 4) and "illegal transition" in result.reason


def test_a_torn_line_without_the_resume_marker_is_an_error(tmp_path):
    path = _torn(tmp_path)
    with path.open("a") as handle:  # another writer that does not end the torn line first
        handle.write("\n" + json.dumps(_t(1, "mount_cache", "Loaded", "CacheMounted", module_id="m2")) + "\n")
    result = verify_file(path)
    assert (result.ok, result.line, result.torn) == (False, 2, False)
    assert "looks cut short" in result.reason


def test_a_sink_on_a_clean_file_adds_nothing(tmp_path):
    path = _write(tmp_path, PREPARED)
    before = path.read_bytes()
    JsonlSink(path).close()
    assert path.read_bytes() == before
    empty = tmp_path / "new.jsonl"
    JsonlSink(empty).close()
    assert empty.read_bytes() == b""


def test_every_cut_then_a_new_writer_verifies_clean(flux, inputs, cache_config, audit_file):
    """Whatever byte a crash stops at, the next writer's events verify, and nothing is lost."""
    lc = ModuleLifecycle(flux, policy=NO_COMPILE, backend="cpu", cache_config=cache_config)
    lc.prepare(denoiser(inputs, 1))
    data = audit_file.read_bytes()
    cut_file = audit_file.with_name("cut.jsonl")
    after = _t(1, "mount_cache", "Loaded", "CacheMounted", module_id="next")
    for cut in range(1, len(data), 3):
        cut_file.write_bytes(data[:cut])
        with JsonlSink(cut_file) as sink:
            sink(None, "info", after)
        result = verify_file(cut_file)
        assert result.ok, (cut, str(result))
        assert json.loads(cut_file.read_bytes().splitlines()[-1]) == {**after, "level": "info"}


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_an_audit_sink_error():
    sink = JsonlSink("/dev/full")
    with pytest.raises(AuditSinkError, match="cannot write audit file /dev/full"):
        sink(None, "info", {"event": "lifecycle.transition"})
    sink.close()
