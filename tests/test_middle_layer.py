"""The middle layer: its layout (no import cycles, one writer per field, a small public surface),
its configuration types, and the defects found by trying to break it."""

from __future__ import annotations

import ast
import asyncio
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SERVING_STEPS
from torch import nn

from adapters import CacheDitAdapter
from lifecycle import (
    CompilePlan,
    IllegalTransitionError,
    InvalidConfigError,
    ModuleLifecycle,
    PipelineLifecycle,
    ServingPolicy,
    State,
    TransitionFailedError,
)
from lifecycle._buckets import IMPLICIT_KEY, shape_key
from lifecycle.testing import NoopBackend, NoopCache
from lifecycle.testing.tiny import FluxShape, demo_cache_config, denoise, flux_inputs, tiny_flux

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("states", "lifecycle", "adapters")
QUICK = {"backend": "aot_eager", "dynamic": False}


# ---------------------------------------------------------------------------- layout
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every import of ours in ``path``: top level, in functions, under TYPE_CHECKING."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycles_among_the_packages():
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    known = {_module_name(p) for p in files}
    # A package's __init__ importing its own submodules is no cycle of design.
    graph = {
        name: {t for t in _imports(p, known) if not t.startswith(name + ".")}
        for p in files for name in [_module_name(p)]
    }
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in done:
                visit(nxt, [*stack, nxt], done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], done)
    assert cycles == []


def test_the_middle_layer_writes_only_its_own_fields():
    """Every attribute a middle-layer module assigns is an attribute of ``self``: objects return
    results and their owners apply them (exception chaining aside)."""
    offenders = []
    for path in sorted((ROOT / "lifecycle").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = list(node.targets)
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if (
                        isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
                        and not (isinstance(sub.value, ast.Name) and sub.value.id == "self")
                        and sub.attr != "__cause__"
                    ):
                        offenders.append(f"{path.name}:{sub.lineno}: {ast.unparse(sub)}")
    assert offenders == []


def _owned_fields() -> dict[str, str]:
    """Each private field a middle-layer class assigns to ``self``, and the file that does."""
    owners: dict[str, str] = {}
    for path in sorted((ROOT / "lifecycle").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for sub in ast.walk(target):
                        if (
                            isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
                            and isinstance(sub.value, ast.Name) and sub.value.id == "self"
                            and sub.attr.startswith("_") and not sub.attr.startswith("__")
                        ):
                            owners.setdefault(sub.attr, path.name)
    return owners


def test_each_private_field_has_one_writing_module():
    """A private field is assigned (``=``, ``+=``, annotated) in one file only: the one whose
    class owns it. A second module writing it fails here."""
    writers: dict[str, set[str]] = {}
    for path in sorted((ROOT / "lifecycle").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store):
                            writers.setdefault(sub.attr, set()).add(path.name)
    owners = _owned_fields()
    # The lifecycle's own fields and the serving state's, each with its owner.
    for field, owner in {
        "_runner": "_module.py", "_serving_state": "_module.py", "_config": "_module.py",
        "_context": "_module.py", "_compiling": "_module.py",
        "_compiles": "_compiling.py", "_compile_s": "_compiling.py", "_row": "_compiling.py",
        "_requests": "_serving_state.py", "_recompiles": "_serving_state.py", "_active": "_serving_state.py",
        "_shares_graphs": "_serving_state.py", "_shared_dims": "_serving_state.py",
        "_covered": "_serving_state.py", "_warmup_s": "_serving_state.py",
        "_seq": "_runner.py", "_history": "_runner.py",
    }.items():
        assert owners.get(field) == owner, field
    shared = {field: sorted(files) for field, files in writers.items() if field in owners and len(files) > 1}
    # Fields of unrelated classes that happen to share a name, each written by its own class.
    allowed = {"_lock", "_base", "_events", "_guards"}
    assert {k: v for k, v in shared.items() if k not in allowed} == {}


def test_only_the_lifecycle_applies_results_to_the_serving_state():
    """Warm-up and request code return results; the serving state's writing methods (and its
    bucket book's) are called from lifecycle/_module.py and serving_state.py only."""
    from lifecycle._serving_state import WRITERS

    book_writers = {"declare", "apply_warmup", "note_request", "cool", "forget", "note_miss"}
    found = []
    for path in sorted((ROOT / "lifecycle").glob("*.py")):
        if path.name in ("_module.py", "_serving_state.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                name = node.func.attr
                if (owner.endswith("_serving_state") and name in WRITERS) or (
                    owner.endswith(".book") and name in book_writers
                ):
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node.func)}")
    assert found == []


def test_only_the_internals_module_touches_torch_internals():
    attributes = {"_compiled_call_impl", "set_stance", "use_duck_shape", "mark_dynamic"}
    modules = {"torch._dynamo.utils", "torch.fx.experimental._config"}
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "_torch_internals.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in attributes:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
                elif isinstance(node, ast.ImportFrom) and node.module in modules:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module}")
                elif isinstance(node, ast.Import) and any(a.name in modules for a in node.names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: import")
    assert found == []


PUBLIC = {
    # what a serving engine calls
    "prepare", "aprepare", "warm_up", "request", "ready", "state", "refresh", "invalidate", "reset",
    "coverage", "missed_shapes", "history", "stats", "mount_cache", "compile",
    # configuration and identity, read-only
    "name", "policy", "compile_plan", "serving", "compile_options", "cache_config", "backend",
    "cache", "module", "module_id", "allowed_triggers", "can",
}


def test_the_public_surface_is_what_a_serving_engine_calls():
    names = {name for name in dir(ModuleLifecycle) if not name.startswith("_")}
    lc = ModuleLifecycle(nn.Linear(4, 4), backend=NoopBackend(), cache_adapter=NoopCache())
    names |= {name for name in vars(lc) if not name.startswith("_")}
    assert names == PUBLIC


# ---------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: CompilePlan(scope="whole"), "scope"),
        (lambda: CompilePlan(ahead_of_time="yes"), "ahead_of_time"),
        (lambda: CompilePlan(ahead_of_time=True), r"scope='blocks', ahead_of_time=True"),
        (lambda: ServingPolicy(on_unwarmed="retry"), "on_unwarmed"),
        (lambda: ServingPolicy(share_bucket_graphs=1), "share_bucket_graphs"),
        (lambda: ServingPolicy(measure_paths=None), "measure_paths"),
    ],
)
def test_bad_configuration_values_are_refused_at_construction(make, match):
    with pytest.raises(InvalidConfigError, match=match):
        make()


def test_configuration_is_frozen_and_typed_arguments_are_checked():
    plan = CompilePlan(scope="blocks")
    with pytest.raises(AttributeError):
        plan.scope = "model"  # type: ignore[misc]
    with pytest.raises(InvalidConfigError, match="compile_plan must be a CompilePlan"):
        ModuleLifecycle(nn.Linear(4, 4), backend=NoopBackend(), cache_adapter=NoopCache(),
                        compile_plan={"scope": "blocks"})  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="serving must be a ServingPolicy"):
        ModuleLifecycle(nn.Linear(4, 4), backend=NoopBackend(), cache_adapter=NoopCache(),
                        serving="eager")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"fullgraph": "yes"}, "fullgraph must be True or False"),
        ({"dynamic": 1}, "dynamic must be None, True or False"),
        ({"mode": "fastest"}, "unknown compile mode"),
        ({"backend": "no-such-backend"}, "unknown torch.compile backend"),
        ({"measure_paths": True}, r"ServingPolicy\(measure_paths=True\)"),
        ({"dynamic_buckets": False}, r"ServingPolicy\(share_bucket_graphs=...\)"),
        ({"buckets": 2}, "torch.compile's own arguments only"),
    ],
)
def test_wrong_typed_torch_compile_arguments_are_refused_before_compiling(options, match):
    with pytest.raises(InvalidConfigError, match=match):
        ModuleLifecycle(tiny_flux(), backend="cpu", compile_options=options)


def test_ahead_of_time_is_refused_by_a_backend_that_cannot():
    from adapters.errors import InvalidOptions
    from adapters.npu import NpuAdapter

    with pytest.raises(InvalidOptions, match="backend 'npu' does not compile ahead of time"):
        NpuAdapter().validate_plan(CompilePlan(scope="blocks", ahead_of_time=True), {})


@pytest.mark.slow
def test_compile_options_are_never_rewritten(audit_events):
    options = {"backend": "aot_eager"}
    lc = ModuleLifecycle(tiny_flux(), backend="cpu", cache_config=demo_cache_config(SERVING_STEPS),
                         compile_options=options)

    def run(module: nn.Module, shape: dict[str, int]) -> None:
        denoise(module, flux_inputs(FluxShape(image_tokens=shape["tokens"])), 2)

    lc.prepare(run, shapes=[{"tokens": 16}, {"tokens": 64}])
    assert options == {"backend": "aot_eager"} and dict(lc.compile_options) == options
    with pytest.raises(TypeError):
        lc.compile_options["dynamic"] = True  # type: ignore[index]
    compile_event = next(e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "compile")
    assert compile_event["shared_graphs"] is True  # what the lifecycle decided, audited


# ---------------------------------------------------------------------------- defects
def _noop(**kwargs: Any) -> ModuleLifecycle:
    kwargs.setdefault("backend", NoopBackend())
    kwargs.setdefault("cache_adapter", NoopCache())
    return ModuleLifecycle(kwargs.pop("module", None) or nn.Linear(4, 4), **kwargs)


class _CountingCommit:
    """A commit hook that records what it is asked (the local outcome is the outcome)."""

    def __init__(self, votes: bool) -> None:
        self.votes = votes
        self.asked: list[tuple[str, str | None]] = []

    def audit_fields(self) -> dict[str, Any]:
        return {}

    def agree(self, name: str, trigger: str, state: State, error: BaseException | None) -> dict[int, str]:
        self.asked.append((trigger, None if error is None else type(error).__name__))
        return {}

    def failure(self, name: str, trigger: Any, source: State, cause: BaseException, failed: Any) -> Any:
        return TransitionFailedError(f"{name}: {cause}", module=name, state=source, trigger=trigger)

    def committed_anyway(self, name: str, state: State, failed: Any) -> None:
        return None


@pytest.mark.parametrize("votes", [False, True])
def test_a_hook_that_does_not_vote_is_told_only_of_refusals_and_failures(votes):
    commit = _CountingCommit(votes)
    lc = _noop(commit=commit)
    lc.mount_cache()
    lc.reset()
    with pytest.raises(IllegalTransitionError):
        lc.compile()  # Loaded -> Compiled skips the cache: refused

    def failing(module: nn.Module) -> None:
        raise RuntimeError("warm-up broke")

    lc.mount_cache()
    lc.compile()
    with pytest.raises(TransitionFailedError):
        lc.warm_up(failing)
    successes = [("mount_cache", None), ("reset", None), ("mount_cache", None), ("compile", None)]
    told = [("compile", "IllegalTransitionError"), ("warm_up", "RuntimeError")]
    if votes:  # asked once per attempt, whatever the outcome
        assert commit.asked == successes[:2] + told[:1] + successes[2:] + told[1:]
    else:
        assert commit.asked == told
    assert lc.state is State.COMPILED and [r.outcome for r in lc.history][-2:] == ["ok", "failed"]


def test_ready_polled_while_another_thread_resets_and_prepares_never_raises():
    lc = _noop()
    shapes = [{"n": n} for n in range(1, 40)]
    stop = threading.Event()
    failures: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(30):
                lc.prepare(lambda module, shape: None, shapes=shapes)
                lc.reset()
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=churn)
    thread.start()
    polls = 0
    while not stop.is_set():
        lc.ready  # noqa: B018 - the probe itself is the test
        lc.coverage()
        lc.stats()
        lc.missed_shapes()
        lc.history  # noqa: B018
        polls += 1
    thread.join()
    assert not failures and polls > 0


def test_a_rewarm_that_skips_a_bucket_served_before_is_not_ready():
    lc = _noop()
    run = lambda module: None  # noqa: E731
    run2 = lambda module, shape: None  # noqa: E731
    lc.prepare(run)  # the implicit bucket: whatever run(module) calls
    lc.warm_up(run2, shapes=[{"n": 2}])
    assert lc.ready
    lc.invalidate()
    lc.prepare(run2)  # warms the declared bucket again, not the one served from the start
    assert lc.state is State.WARMED_UP
    assert not lc.ready
    assert {c["key"]: c["warmed"] for c in lc.coverage()} == {IMPLICIT_KEY: False, shape_key({"n": 2}): True}
    lc.warm_up(run)  # the fix: warm it again
    assert lc.ready


@pytest.mark.slow
def test_a_warmup_whose_settle_call_fails_leaves_the_new_bucket_cold(flux, inputs, audit_events):
    cache_config = demo_cache_config(SERVING_STEPS)
    small = {"tokens": 16}

    def at(shape: dict[str, int]) -> Any:
        return flux_inputs(FluxShape(image_tokens=shape["tokens"]))

    # A dry run counts the calls a successful warm-up of the bucket makes (its settle is the last).
    dry = ModuleLifecycle(tiny_flux(), backend="cpu", cache_config=cache_config, compile_options=QUICK)
    dry.prepare(lambda module: denoise(module, inputs, 2), num_inference_steps=SERVING_STEPS)
    calls: list[int] = []
    dry.warm_up(lambda module, shape: (calls.append(1), denoise(module, at(shape), 2)), shapes=[small])
    total = len(calls)
    event = [e for e in audit_events.of("lifecycle.transition") if e["trigger"] == "warm_up"][-1]
    assert event["settle_runs"] == 1 and event["warmup_runs"] == total
    torch._dynamo.reset()  # the real run compiles (and so settles) like the dry one

    lc = ModuleLifecycle(flux, backend="cpu", cache_config=cache_config, compile_options=QUICK)
    lc.prepare(lambda module: denoise(module, inputs, 2), num_inference_steps=SERVING_STEPS)
    made: list[int] = []

    def fails_on_settle(module: nn.Module, shape: dict[str, int]) -> None:
        made.append(1)
        if len(made) == total:
            raise RuntimeError("out of memory on the settle call")
        denoise(module, at(shape), 2)

    with pytest.raises(TransitionFailedError, match="settle call"):
        lc.warm_up(fails_on_settle, shapes=[small])
    assert lc.state is State.WARMED_UP
    assert not lc.ready
    assert {c["key"]: c["warmed"] for c in lc.coverage()}[shape_key(small)] is False


class _RestoreFails(CacheDitAdapter):
    """cache-dit's adapter whose context rebuild fails once armed (after a warm-up's calls)."""

    armed = False

    def refresh(self, module: nn.Module, config: Any, num_inference_steps: int | None = None) -> None:
        import cache_dit

        if not self.armed:
            super().refresh(module, config, num_inference_steps)
            return
        original = cache_dit.refresh_context

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("refresh_context failed")

        cache_dit.refresh_context = broken
        try:
            super().refresh(module, config, num_inference_steps)
        finally:
            cache_dit.refresh_context = original


def test_after_a_failed_restore_the_live_cache_config_is_the_lifecycles(flux, inputs, audit_events):
    cache = _RestoreFails()
    config = demo_cache_config(SERVING_STEPS)
    lc = ModuleLifecycle(flux, backend="cpu", cache_config=config, compile_options=QUICK, cache_adapter=cache)
    lc.prepare(lambda module: denoise(module, inputs, 2), num_inference_steps=SERVING_STEPS)

    def warm_then_break(module: nn.Module) -> None:
        denoise(module, inputs, 2)
        cache.armed = True  # the restore after this warm-up fails

    with pytest.raises(TransitionFailedError, match="refresh_context failed"):
        lc.warm_up(warm_then_break)
    live = lc.cache.summary(lc.module).config
    assert live["residual_diff_threshold"] == config.residual_diff_threshold != 1.0e9
    assert not lc.ready
    cache.armed = False
    lc.refresh()
    assert lc.ready


def test_reads_from_another_task_during_a_request_never_need_its_lock(audit_events):
    lc = _noop()
    lc.prepare(lambda module, shape: None, shapes=[{"n": 1}])

    async def main() -> list[Any]:
        inside = asyncio.Event()
        release = asyncio.Event()

        async def serve() -> None:
            with lc.request():
                inside.set()
                await release.wait()

        task = asyncio.create_task(serve())
        await inside.wait()
        seen = [lc.coverage(), lc.history, lc.stats(), lc.missed_shapes(), lc.ready]
        with pytest.raises(IllegalTransitionError, match="another asyncio task"):
            lc.refresh()  # a trigger still needs the lock: refused, never a deadlock
        release.set()
        await task
        return seen

    coverage, history, stats, missed, ready = asyncio.run(main())
    assert coverage[0]["warmed"] and history and stats["state"] == "WarmedUp" and missed == [] and ready


def test_aprepare_takes_shapes_for_module_and_pipeline():
    lc = _noop()
    asyncio.run(lc.aprepare(lambda module, shape: None, shapes=[{"n": 1}, {"n": 2}]))
    assert [c["key"] for c in lc.coverage()] == ["n=1", "n=2"]
    plc = PipelineLifecycle({"a": _noop(), "b": _noop()})
    asyncio.run(plc.aprepare(lambda modules, shape: None, shapes=[{"n": 3}]))
    assert {name: [c["key"] for c in rows] for name, rows in plc.coverage().items()} == {
        "a": ["n=3"], "b": ["n=3"]}
    assert plc.ready


def test_a_pipelines_refusal_of_bad_shapes_is_audited(audit_events):
    plc = PipelineLifecycle({"a": _noop(), "b": _noop()})
    with pytest.raises(InvalidConfigError):
        plc.prepare(lambda modules, shape: None, shapes={"n": 1})  # a mapping, not a list
    plc.prepare(lambda modules: None)
    with pytest.raises(InvalidConfigError):
        plc.warm_up(lambda modules, shape: None, shapes=[])
    refused = [e for e in audit_events.of("lifecycle.transition") if e["outcome"] == "refused"]
    assert [e["trigger"] for e in refused] == ["warm_up", "warm_up"]
    assert all("shapes" in e["error"] for e in refused)


def test_a_miss_found_by_input_sizes_records_the_sizes(flux, inputs, audit_events):
    lc = ModuleLifecycle(
        flux, backend="cpu", cache_config=demo_cache_config(SERVING_STEPS), compile_options=QUICK
    )
    lc.prepare(lambda module: denoise(module, inputs, 2), num_inference_steps=SERVING_STEPS)
    cold = flux_inputs(replace(FluxShape(), image_tokens=16))
    with lc.request(num_inference_steps=2) as req:
        denoise(lc.module, cold, 2)
    assert req.outcome == "ok"
    (miss,) = audit_events.of("lifecycle.shape_miss")
    assert miss["detected"] == "signature" and miss["shape"] is None
    assert miss["input_sizes"]["hidden_states"] == [1, 16, 16]
    assert lc.stats()["shapes"]["missed_sizes"] == [miss["input_sizes"]]
    assert torch.isfinite(denoise(lc.module, inputs, 1)).all()


def test_the_public_surface_is_the_package_audit_ops_and_testing():
    """Internal modules carry a leading underscore, as structlog's do: a host imports
    ``lifecycle``, ``lifecycle.audit``, ``lifecycle.ops`` and ``lifecycle.testing``, nothing else."""
    public = {"__init__.py", "__main__.py", "py.typed", "audit", "ops", "testing", "__pycache__"}
    exposed = sorted(p.name for p in (ROOT / "lifecycle").iterdir()
                     if not p.name.startswith("_") or p.name in public)
    assert set(exposed) - public == set()
    import lifecycle

    # Every public name still resolves through the lazy map after the move.
    assert all(getattr(lifecycle, name) is not None for name in lifecycle.__all__)
