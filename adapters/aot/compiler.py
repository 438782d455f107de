"""``AotBlocksCompiler``: one lifecycle's ahead-of-time blocks, as a ``Compiler``. Load the
packages a start before built, or build them, then bind every block to its package; fall back to
compiling the blocks just in time when no package can be trusted. Reports only; the lifecycle
audits them.

The order (``compile``):

1. capture each block kind's calls from the examples (one eager call per declared bucket;
   cache-dit is mounted, so the blocks are called as its wrappers call them). Without examples
   the compile is deferred: the lifecycle passes the warm-up's calls before warming;
2. plan the bounds once: dims that differ between the buckets are dynamic within their range;
3. look for packages of this key (kind, code, torch, device, inductor configs, bounds) in the
   store (never loaded yet): all there and checked on this host -> bind them (``loaded``); there
   but never checked here -> check them in a child process first (a check that cannot be recorded,
   on a read-only volume, is reported and the packages still load);
4. otherwise build every kind (export, AOTInductor, a child-process check) -> bind (``compiled``);
5. anything that fails (a build, a check, a store that cannot be read or written) -> the blocks
   are compiled just in time instead (``fallback``), with the reason in the report: never a crash,
   never a package that was not checked. After a fallback the compiler checks no call itself
   (``misses`` is None), so the lifecycle's own shape checks and ``on_unwarmed`` apply;
6. another replica holds the build lease and the lifecycle serves meanwhile
   (``while_building="serve_jit"``): the blocks are compiled just in time (``jit_while_building``)
   and a ``PackageWatch`` thread polls the store. ``switch`` (the lifecycle calls it at a request
   boundary, no request running) binds the packages once the watch found and checked them.

The store's events (``waiting``, ``untrusted``, ...) go to the ``listen`` sink as they happen.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar, Token
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from adapters import _torch_internals as internals
from adapters.aot import fleet
from adapters.aot import runtime as runtime
from adapters.aot.bounds import CallSpec, plan_bounds
from adapters.aot.build import build
from adapters.aot.capture import BlockCall, _eager, capture_calls
from adapters.aot.check import record_check, verify_packages
from adapters.aot.errors import AotError
from adapters.aot.fleet import FleetResult, obtain_packages
from adapters.aot.kinds import block_kinds
from adapters.aot.store import LocalFiles, PackageFiles, PackageInfo, inductor_configs, open_packages
from adapters.aot.watch import PackageWatch
from adapters.compiler import Compiler, CompileReport, EventSink, Example, OutsideBounds
from adapters.store import PROBLEMS, PackageStore, StoreEvent, open_store

SUBDIRECTORY = "aot"
# The outcome of a compile that serves just in time while another replica builds the packages.
JIT_WHILE_BUILDING = "jit_while_building"
# The compilers whose block calls outside the packages' bounds are refused rather than run
# eagerly, for the request running in this thread or task (set by the lifecycle's request scope).
_REFUSING: ContextVar[frozenset[int]] = ContextVar("dit_lifecycle_refusing_outside", default=frozenset())


class _Refusing:
    """``with compiler.refusing(True)``: this compiler's out-of-bounds calls raise, in this
    thread or task only."""

    __slots__ = ("_ident", "_token")

    def __init__(self, ident: int) -> None:
        self._ident = ident
        self._token: Token[frozenset[int]] | None = None

    def __enter__(self) -> None:
        self._token = _REFUSING.set(_REFUSING.get() | {self._ident})

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _REFUSING.reset(self._token)
            self._token = None


class _NotRefusing:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _on_miss(ident: int, block: nn.Module, reason: str) -> None:
    if ident in _REFUSING.get():
        raise OutsideBounds(f"{type(block).__name__}: {reason}")


def _bounds(spec: CallSpec) -> dict[str, Any]:
    dynamic = {
        tensor.path: {str(dim): list(tensor.sizes[dim]) for dim in tensor.dynamic_dims}  # type: ignore[arg-type]
        for tensor in spec.tensors if tensor.dynamic_dims
    }
    return dynamic or {"static": True}


class AotBlocksCompiler:
    """Ahead-of-time blocks, packages in ``directory``/aot (kept across restarts) or a private
    temporary directory (removed by ``close``, by ``restore``, and when the compiler is dropped).

    Args:
        options: torch.compile's validated arguments; translated here into inductor configs
            (``mode`` expanded, ``options`` kept), anything without an ahead-of-time meaning
            refused (``InvalidOptions``) at construction.
        reproducible: build with inductor's deterministic mode (part of the package key).
        directory: the artifact store (an opened ``PackageStore``, or a local path opened as
            one): packages in its ``aot`` folder, loaded when there, else built once per fleet
            under its lease (``adapters.aot.fleet``); None: a private temporary directory.
        fallback: the just-in-time blocks compiler used when no package can serve.
        files: how the private directory reads and writes (``LocalFiles``).
        build_wait_s: how long to wait for another replica's build of the same packages.
        while_building: ``"wait"`` for that build inside ``compile``, or ``"serve_jit"``: compile
            the blocks just in time meanwhile and watch the store (``switch`` binds them).
    """

    name = "aot_blocks"

    def __init__(
        self,
        *,
        options: Mapping[str, Any],
        reproducible: bool,
        directory: str | os.PathLike[str] | PackageStore | None,
        fallback: Compiler,
        files: Callable[[Path], PackageFiles] = LocalFiles,
        build_wait_s: float = 600.0,
        while_building: str = "wait",
    ) -> None:
        internals.check_aot()
        self._configs = inductor_configs(options, reproducible=reproducible)
        self._reproducible = reproducible
        if directory is not None and not isinstance(directory, PackageStore):
            directory = open_store(directory)
        self._store = None if directory is None else directory.child(SUBDIRECTORY)
        self._wait_s = build_wait_s
        self._serve_while_building = while_building == "serve_jit"
        self._sink: EventSink | None = None
        self._watch: PackageWatch | None = None
        self._root: Path | None = None
        self._events: list[dict[str, Any]] = []
        self._store_fields: dict[str, Any] = {}
        self._files_for = files
        self._fallback = fallback
        self._temporary: Path | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._binding: runtime.AotBinding | None = None
        self._fell_back = False
        self._pending = False
        self._fields: dict[str, Any] | None = None
        self._options: dict[str, Any] = {}

    # ------------------------------------------------------------------ configuration
    @property
    def inductor_configs(self) -> dict[str, Any]:
        """The inductor configs every package is built with (a copy)."""
        return dict(self._configs)

    @property
    def store(self) -> PackageStore | None:
        """The artifact store's ``aot`` folder (None: packages stay in a private directory)."""
        return self._store

    @property
    def directory(self) -> Path:
        """This process's private directory (packages without a store, builds in progress; made
        on first use, removed by ``close``)."""
        if self._root is not None:
            return self._root
        if self._temporary is None:
            self._temporary = Path(tempfile.mkdtemp(prefix="dit-lifecycle-aot-"))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._temporary), True)
        return self._temporary

    # ------------------------------------------------------------------ the Compiler protocol
    @property
    def pending(self) -> bool:
        return self._pending

    def listen(self, sink: EventSink | None) -> None:
        self._sink = sink

    def compile(
        self, module: nn.Module, examples: Sequence[Example] | None, options: Mapping[str, Any]
    ) -> CompileReport:
        self._stop_watch()
        if examples is None:
            self._pending = True
            fields = {"ahead_of_time": "deferred"}
            return CompileReport(self.name, fields, dict(fields), deferred=True)
        self._pending = False
        self._options = dict(options)
        self._events = []
        self._store_fields = {}
        started = time.perf_counter()
        bounds: dict[str, Any] = {}
        statuses: dict[str, str] = {}
        ran = False
        try:
            with torch.no_grad():
                ran = True
                calls = capture_calls(module, examples)
            specs = {kind: plan_bounds(kind_calls) for kind, kind_calls in calls.items()}
            bounds = {kind: _bounds(spec) for kind, spec in specs.items()}
            outcome, packages = self._load_or_build(module, calls, specs, statuses)
            if outcome == "busy":
                return self._serve_jit(module, calls, specs, options, started, bounds, statuses)
            if packages is None:
                return self._fall_back(module, options, started, bounds, statuses, outcome)
            # By id, not a bound method: the blocks' call slots must not keep this compiler alive.
            self._binding = runtime.bind(module, packages, on_miss=partial(_on_miss, id(self)))
        except Exception as error:  # never a crash: every failure falls back, with its reason
            return self._fall_back(
                module, options, started, bounds, statuses, f"{type(error).__name__}: {error}", ran
            )
        fields = self._report(outcome, packages, bounds, statuses, started, self._binding.blocks)
        return CompileReport(self.name, fields, {"ahead_of_time": outcome}, ran_examples=True,
                             events=tuple(self._events))

    def rebind(self, module: nn.Module) -> dict[str, Any]:
        if self._binding is None:
            return self._fallback.rebind(module) if self._fell_back else {}
        try:
            rebound = runtime.rebind(self._binding)
        except AotError as error:
            # A weight changed shape, or a block's plain attributes changed: these packages no
            # longer compute this module. Just in time from here on, never the old values.
            problem = f"{type(error).__name__}: {error}"
            runtime.unbind(self._binding)
            self._binding = None
            self._fallback.compile(module, None, self._options)
            self._fell_back = True
            fields = {"ahead_of_time": "fallback", "aot_problem": problem}
            self._fields = {**(self._fields or {}), **fields}
            return fields
        copied = sorted(self._binding.stats.copied)
        out: dict[str, Any] = {}
        if rebound:
            out["aot_rebound_blocks"] = rebound
        if copied:
            out["aot_copied_weights"] = copied
        return out

    def misses(self, module: nn.Module) -> int | None:
        if self._binding is None:
            return None
        return sum(self._binding.stats.misses.values())

    def refusing(self, refuse: bool) -> _Refusing | _NotRefusing:
        return _Refusing(id(self)) if refuse and self._binding is not None else _NotRefusing()

    def describe(self) -> dict[str, Any]:
        where: object = self._store.location.url if self._store is not None else self._temporary
        serving = self.name if self._binding is not None else self._fallback.name if self._fell_back else None
        watch = self._watch
        return {
            "name": self.name,
            "serving": serving,  # which compiler's code the blocks run now (None: not compiled)
            "inductor_configs": dict(self._configs),
            "package_directory": None if where is None else str(where),
            **(self._fields or {}),
            **({"while_building": watch.describe()} if watch is not None else {}),
            "binding": self._binding.summary() if self._binding is not None else None,
        }

    def restore(self, module: nn.Module) -> None:
        self._stop_watch()
        if self._binding is not None:
            runtime.unbind(self._binding)
            self._binding = None
        if self._fell_back:
            self._fallback.restore(module)
            self._fell_back = False
        self._pending = False
        self._fields = None

    def close(self) -> None:
        self._stop_watch()
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._temporary = None

    def bound_blocks(self) -> list[nn.Module]:
        """The blocks that run a package now."""
        return list(self._binding.calls) if self._binding is not None else []

    # ------------------------------------------------------------------ internals
    def _load_or_build(
        self, module: nn.Module, calls: Mapping[str, Any], specs: dict[str, CallSpec],
        statuses: dict[str, str],
    ) -> tuple[str, dict[str, PackageInfo] | None]:
        """(outcome, packages to bind); packages None: fall back, the outcome is the reason."""
        if self._store is not None:
            return self._through_store(module, calls, specs, statuses)
        files = self._files_for(self.directory)
        try:
            files.ensure()
        except OSError as error:
            return f"the package directory cannot be used ({type(error).__name__}: {error})", None
        found = open_packages(module, files, specs=specs, configs=self._configs)
        statuses.update({kind: str(status.status) for kind, status in found.items()})
        if all(status.status == "ok" and status.info is not None for status in found.values()):
            packages = {kind: status.info for kind, status in found.items() if status.info is not None}
            unchecked = {kind: info for kind, info in packages.items() if not found[kind].verified_here}
            if not unchecked:
                return "loaded", packages
            first = {kind: calls[kind][0] for kind in unchecked}
            checks = verify_packages(module, unchecked, calls=first, record=False)
            failed = {kind: check for kind, check in checks.items() if not check.ok}
            if not failed:
                kinds = block_kinds(module)
                for kind, check in checks.items():
                    try:
                        record_check(files, unchecked[kind], kinds[kind][0], check)
                    except OSError as error:  # a read-only volume: this start still loads
                        statuses[kind] = f"ok (checked here, not recorded: {type(error).__name__})"
                return "loaded", packages
            statuses.update({kind: f"check {check.outcome}" for kind, check in failed.items()})
        built = build(module, calls, files, configs=self._configs, specs=specs)
        if not built.complete:
            rejected = "; ".join(
                f"{kind}: check {check.outcome} {check.detail}".strip()
                for kind, check in built.rejected.items()
            )
            return rejected or "incomplete build", None
        return "compiled", built.packages

    def _through_store(
        self, module: nn.Module, calls: Mapping[str, Any], specs: dict[str, CallSpec],
        statuses: dict[str, str],
    ) -> tuple[str, dict[str, PackageInfo] | None]:
        assert self._store is not None
        sink = self._sink
        told = 0

        def live(event: StoreEvent) -> None:  # the store's events, audited as they happen
            nonlocal told
            told += 1
            if sink is not None:
                sink({"action": "aot", **event.as_dict(), "problem": event.status in PROBLEMS})

        result: FleetResult = obtain_packages(
            self._store, module, calls, specs, self._configs, scratch=self.directory, wait_s=self._wait_s,
            on_event=live if sink is not None else None, wait=not self._serve_while_building,
        )
        statuses.update(result.found)
        self._store_fields = {"aot_store_url": self._store.location.url, **result.fields}
        # Those not told live (all of them without a sink, or found after the store's answer).
        events = [{"action": "aot", **event, "problem": event["status"] in PROBLEMS}
                  for event in result.events[told:]]
        if result.store == "busy":
            self._events = events
            return "busy", None
        summary = "compiled" if result.store == "built" else result.store
        detail = str(result.fields.get("aot_store_detail", ""))
        if result.store not in ("loaded", "built") and result.packages is not None:
            detail = f"built on this replica, not shared ({detail})" if detail else "built on this replica"
        events.append({"action": "aot", "status": summary, "key": "", "detail": detail,
                       "elapsed_s": result.fields.get("aot_waited_s", 0.0),
                       "problem": summary in PROBLEMS or summary == "missing"})
        self._events = events
        return result.outcome, result.packages

    def _serve_jit(
        self, module: nn.Module, calls: Mapping[str, Sequence[BlockCall]], specs: dict[str, CallSpec],
        options: Mapping[str, Any], started: float, bounds: dict[str, Any], statuses: dict[str, str],
    ) -> CompileReport:
        """Another replica builds: the blocks just in time now, the packages watched for."""
        assert self._store is not None
        stems = fleet.stems_for(module, specs, self._configs)
        key = fleet.lease_key(stems)
        holder = str(self._store_fields.get("aot_store_detail", ""))
        blocks = {kind: members[0] for kind, members in block_kinds(module).items()}
        first = {kind: calls[kind][0] for kind in blocks}
        with torch.no_grad():  # the check's reference outputs, computed here: the watch runs no block
            expected = {kind: list(pytree.tree_leaves(_eager(blocks[kind], (), first[kind].kwargs)))
                        for kind in blocks}
        self._fallback.compile(module, None, options)
        self._fell_back = True
        events = self._events
        self._events = []  # the watch's events go to the sink only (or to the switch's report)
        self._watch = PackageWatch(
            self._store, stems, specs, key=key, blocks=blocks, calls=first, expected=expected,
            deadline=time.monotonic() - (time.perf_counter() - started) + self._wait_s,
            poll_s=fleet.POLL_S, on_event=self._sink or self._events.append,
        )
        self._watch.start()
        detail = (f"another replica is building these packages ({holder}); serving just-in-time "
                  f"blocks, switched to the packages at a request boundary once published "
                  f"(watching up to {self._wait_s:g} s)")
        events.append({"action": "aot", "status": "serving_jit", "key": key, "detail": detail,
                       "elapsed_s": round(time.perf_counter() - started, 3), "problem": False})
        fields = self._report(JIT_WHILE_BUILDING, {}, bounds, statuses, started, 0)
        return CompileReport(self.name, fields, {"ahead_of_time": JIT_WHILE_BUILDING}, ran_examples=True,
                             events=tuple(events))

    def switch(self, module: nn.Module) -> CompileReport | None:
        watch = self._watch
        if watch is None or not watch.done:
            return None
        self._watch = None
        events = tuple(self._events)  # what the watch told without a sink
        self._events = []
        fields: dict[str, Any] = {"aot_switch": watch.outcome, "aot_watch_s": round(watch.seconds, 3)}
        if watch.outcome != "ready":  # timeout, refused: the watch audited why; just in time stays
            fields.update(ahead_of_time="fallback", aot_problem=watch.detail)
            self._fields = {**(self._fields or {}), **fields}
            return CompileReport(self.name, fields, {"ahead_of_time": "fallback"}, events=events)
        packages = watch.packages
        try:
            self._fallback.restore(module)
            self._fell_back = False
            binding = runtime.bind(module, packages, on_miss=partial(_on_miss, id(self)))
        except Exception as error:  # the blocks stay just in time, never half bound
            problem = f"{type(error).__name__}: {error}"
            self._fallback.compile(module, None, self._options)
            self._fell_back = True
            fields.update(ahead_of_time="fallback", aot_switch="switch_abandoned", aot_problem=problem)
            self._fields = {**(self._fields or {}), **fields}
            abandoned = {"action": "aot", "status": "switch_abandoned", "key": "", "problem": True,
                         "detail": f"binding the published packages failed: {problem}",
                         "elapsed_s": round(watch.seconds, 3)}
            return CompileReport(self.name, fields, {"ahead_of_time": "fallback"},
                                 events=(*events, abandoned))
        self._binding = binding
        fields.update(
            ahead_of_time="loaded", aot_blocks=binding.blocks, **watch.fields,
            aot_packages={kind: str(info.manifest.get("package", info.path.name))
                          for kind, info in packages.items()},
        )
        # Built whole, then published: ``describe`` may read it from another thread.
        self._fields = {key: value for key, value in {**(self._fields or {}), **fields}.items()
                        if key != "aot_problem"}
        switched = {"action": "aot", "status": "switched", "key": "", "problem": False,
                    "elapsed_s": round(watch.seconds, 3),
                    "detail": f"{binding.blocks} blocks switched from just-in-time code to the packages "
                              "another replica published, at a request boundary"}
        return CompileReport(self.name, fields, {"ahead_of_time": "loaded"}, events=(*events, switched))

    @property
    def package_watch(self) -> PackageWatch | None:
        """The watch for another replica's packages, while one runs or until ``switch`` took it."""
        return self._watch

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def _report(
        self, outcome: str, packages: Mapping[str, PackageInfo], bounds: dict[str, Any],
        statuses: dict[str, str], started: float, blocks: int, problem: str | None = None,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "ahead_of_time": outcome,
            "aot_packages": {kind: str(info.manifest.get("package", info.path.name))
                             for kind, info in packages.items()},
            "aot_bounds": bounds,
            "aot_found": statuses,
            "aot_seconds": round(time.perf_counter() - started, 3),
            "aot_blocks": blocks,
            "aot_deterministic": self._reproducible,
            **self._store_fields,
            **({"aot_problem": problem} if problem else {}),
        }
        self._fields = fields
        return fields

    def _fall_back(
        self, module: nn.Module, options: Mapping[str, Any], started: float, bounds: dict[str, Any],
        statuses: dict[str, str], problem: str, ran: bool = True,
    ) -> CompileReport:
        self._stop_watch()
        if self._binding is not None:
            runtime.unbind(self._binding)
            self._binding = None
        self._fallback.compile(module, None, options)
        self._fell_back = True
        fields = self._report("fallback", {}, bounds, statuses, started, 0, problem)
        return CompileReport(self.name, fields, {"ahead_of_time": "fallback"}, ran_examples=ran,
                             events=tuple(self._events))


__all__ = ["SUBDIRECTORY", "AotBlocksCompiler"]
