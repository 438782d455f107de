"""The warm-up, whole: probe the buckets, steer each member's cache context towards the
cached-step branch, call the host's warm-up callable per bucket until every member covered it,
settle (or measure the compiled and eager paths), and return what happened as an immutable
``WarmupResult``. It writes nothing of a lifecycle: the lifecycle applies the result to itself,
and only when the whole warm-up succeeded.

One member is a ``ModuleLifecycle.warm_up``; several are a pipeline's joint warm-up (one
pipeline call reaches every member). Every trace holds the process's trace lock
(``adapters._torch_internals.tracing``): buckets that share graphs trace with duck shaping off,
which is process-wide, and no other warm-up may trace meanwhile.

A settled warm-up: after the buckets, each bucket is called once more in the serving context
(not the steered one), timed and audited as ``lifecycle.warmup_settle``: whatever the first
request would still pay (lazily loaded kernels, allocator growth) is paid here. Only a warm-up
that compiled graphs settles. With ``ServingPolicy(measure_paths=True)`` that call is timed
compiled and once more eager; requests at a bucket where eager was faster run eagerly.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from types import TracebackType
from typing import Any, NamedTuple

from adapters import _torch_internals as internals
from adapters.calls import (
    CallDecision,
    SharedDims,
    guard_calls,
    input_signature,
    probe_signature,
    shared_dims,
    with_shared_dims,
)
from lifecycle import audit
from lifecycle._buckets import IMPLICIT_KEY, BucketBook, BucketWarmup, shape_key
from lifecycle._errors import TransitionFailedError
from lifecycle._member import Member
from lifecycle._record import emit_checked, warn_unwritten
from lifecycle._serving_state import MemberWarmup

# The warm-up calls run at most this many rounds per bucket while cache-dit's context is
# steered towards its cached branch; a warm-up that makes one denoising step needs three.
MAX_WARMUP_RUNS = 4
WARMUP_SHAPE_EVENT = "lifecycle.warmup_shape"
WARMUP_SETTLE_EVENT = "lifecycle.warmup_settle"
WARMUP_PATH_EVENT = "lifecycle.warmup_path"
CallAt = Callable[[dict[str, Any] | None], object]
# The buckets one warm-up warms, in order: a declared shape, or None for the implicit bucket.
Buckets = list[dict[str, Any] | None]


class WarmupCoverageWarning(UserWarning):
    """Warm-up could not reach cache-dit's cached-step branch: the first real request may compile.

    Example::

        import warnings
        warnings.simplefilter("error", WarmupCoverageWarning)  # fail a deploy instead
    """


class WarmupResult(NamedTuple):
    """One warm-up's outcome, one entry per member (in the members' order)."""

    members: tuple[MemberWarmup, ...]
    graphs: int


def call_at_shape(run: Callable[..., object], target: object) -> CallAt:
    """The host's warm-up callable as the warm-up calls it: ``run(target, shape)`` at a
    declared bucket, ``run(target)`` at the implicit one (shape None)."""

    def call_at(shape: dict[str, Any] | None) -> object:
        return run(target) if shape is None else run(target, shape)

    return call_at


def buckets_to_warm(
    book: BucketBook, run: Callable[..., object], declared: list[dict[str, Any]] | None
) -> Buckets:
    """What a warm-up warms: the ``declared`` buckets it names; else, when buckets were declared
    before, the cold ones (all of them when none is: warm everything again, after
    ``invalidate``); else the implicit bucket (a plain warm-up)."""
    if declared is not None:
        return list(declared)
    if not book.any_declared:
        return [None]
    rows = book.rows()
    # Declared buckets first, the implicit one after them (the order they were added in).
    rows.sort(key=lambda row: row[0] is None)
    cold: Buckets = [shape for shape, warm in rows if not warm]
    buckets: Buckets = cold or [shape for shape, _ in rows]
    # A declared bucket is warmed with run(target, shape), the implicit one with run(target):
    # the implicit one is left out when run needs a shape. It stays cold and ``ready`` says so,
    # never a warm-up that fails on the callable's arity.
    if None in buckets and not _takes(run, 1):
        buckets = [shape for shape in buckets if shape is not None]
    return buckets or [None]


def _takes(run: Callable[..., object], count: int) -> bool:
    """Whether ``run`` can be called with ``count`` positional arguments (True when unknown)."""
    try:
        inspect.signature(run).bind(*range(count))
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): let the call decide
        return True
    return True


# ---------------------------------------------------------------------------- per-bucket calls
class _Seen:
    """One member's input signatures during a bucket, and whether each one's cache context
    reached the cached-step branch. Called in front of each of the member's calls: records the
    call's signature, marks the shared dims on aliases, and starts a fresh cache context when
    the signature changes (a warm-up that calls two sizes would otherwise mix their cached
    residuals inside cache-dit)."""

    __slots__ = ("check", "dims", "last", "member", "signatures", "steered")

    def __init__(self, member: Member, dims: SharedDims, *, check: bool, steered: bool) -> None:
        self.member = member
        self.dims = dims
        self.check = check  # ask the cache whether the steered context covered the branch
        self.steered = steered
        self.signatures: dict[Any, bool] = {}
        self.last: Any = None

    def covered(self) -> bool:
        return self.member._serving_state.context.covered() if self.check else True

    def close_segment(self) -> None:
        if self.last is not None:
            self.signatures[self.last] = self.signatures.get(self.last, False) or self.covered()

    def all_covered(self) -> bool:
        if not self.signatures:  # the module was never called: only the context can tell
            return self.covered()
        self.close_segment()
        return all(self.signatures.values())

    def warm(self) -> frozenset[Any]:
        self.close_segment()
        return frozenset(sig for sig, ok in self.signatures.items() if ok)

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallDecision | None:
        member = self.member
        signature = input_signature(args, kwargs)
        if self.last is not None and signature != self.last:
            self.close_segment()
            if member.policy.cache_dit:
                if self.steered:
                    member._serving_state.context.steer()
                else:
                    member._serving_state.context.fresh()
        self.last = signature
        self.signatures.setdefault(signature, False)
        if self.dims:
            args, kwargs = with_shared_dims(self.dims, args, kwargs)
            return CallDecision(args, kwargs)
        return None


class _BucketRun:
    """``with _BucketRun(members, dims, steer=...) as seen``: one bucket's calls. With ``steer``,
    every member's cache context is steered, and leaving restores every serving context (all of
    them even when one restore raises; then the first error is raised). A class: every bucket
    opens one."""

    __slots__ = ("_guards", "_steered", "dims", "members", "steer")

    def __init__(self, members: Sequence[Member], dims: Sequence[SharedDims], *, steer: bool) -> None:
        self.members = members
        self.dims = dims
        self.steer = steer
        self._steered: list[Member] = []
        self._guards: list[guard_calls] = []

    def __enter__(self) -> list[_Seen]:
        seen = []
        try:
            steer = self.steer
            for index, member in enumerate(self.members):
                check = False
                policy = member.policy
                if steer and policy.cache_dit:
                    # A warm-up is an earlier request: its context is replaced afterwards.
                    self._steered.append(member)
                    if policy.compile:
                        # Steering matters only with compile: graphs a warm-up misses would
                        # compile in the first request.
                        member._serving_state.context.steer()
                        check = True
                tracker = _Seen(member, self.dims[index], check=check, steered=steer)
                guard = guard_calls(member.module, tracker)
                guard.__enter__()
                self._guards.append(guard)
                seen.append(tracker)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return seen

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        while self._guards:
            self._guards.pop().__exit__(None, None, None)
        first: BaseException | None = None
        while self._steered:
            try:
                self._steered.pop()._serving_state.context.restore("after_warmup")
            except BaseException as error:  # restore the others, then raise the first
                first = first or error
        if first is not None:
            raise first


# ---------------------------------------------------------------------------- the algorithm
def run_warmup(
    members: Sequence[Member],
    call_at: CallAt,
    buckets: Sequence[dict[str, Any] | None],
    *,
    max_runs: int = MAX_WARMUP_RUNS,
) -> WarmupResult:
    """Warm ``members`` together at every bucket of ``buckets`` (None: the implicit bucket), then
    settle; return what happened. Raises whatever the warm-up callable raised (the caller's
    transition records it), with every serving context restored."""
    sharing = bound = False
    dims: list[SharedDims] = []
    per_bucket: list[list[BucketWarmup]] = []
    # Per member, the buckets whose block calls lay outside the compiled bounds: they stay cold.
    outside: list[list[str]] = [[] for _ in members]
    for member in members:
        if member._serving_state.shares_graphs:
            sharing = True
            dims.append(_probe(member, call_at, members))
        else:
            dims.append(member._serving_state.shared_dims)
        per_bucket.append([])
    # Members share one process: the first one's backend counts every graph compiled in it.
    graph_count = members[0].backend.graph_count
    started = time.perf_counter()
    total_runs = 0
    compiled = 0
    with internals.tracing(duck_shape=not sharing):
        for shape in buckets:
            key = IMPLICIT_KEY if shape is None else shape_key(shape)
            graphs_before = graph_count()
            misses_before = [member._compiler.misses(member.module) for member in members]
            bucket_started = time.perf_counter()
            runs = 0
            with _BucketRun(members, dims, steer=True) as seen:
                while True:
                    _call_warmup(call_at, shape)
                    runs += 1
                    done = [tracker.all_covered() for tracker in seen]
                    if runs >= max_runs or False not in done:
                        break
                warm = [tracker.warm() for tracker in seen]
                _sync(members)
            seconds = time.perf_counter() - bucket_started
            graphs = graph_count() - graphs_before
            compiled += graphs
            total_runs += runs
            for index, member in enumerate(members):
                ok = done[index]
                signatures = warm[index]
                missed_before, missed_now = misses_before[index], member._compiler.misses(member.module)
                if missed_before is not None and missed_now is not None and missed_now > missed_before:
                    # Block calls here lay outside what was compiled and ran eagerly: a request
                    # here would be refused (or run eagerly), so the bucket is not warm.
                    ok = False
                    outside[index].append(key)
                if not done[index] and key == IMPLICIT_KEY and len(seen[index].signatures) > 1:
                    raise _undeclared_error(member, len(seen[index].signatures), len(signatures))
                per_bucket[index].append(BucketWarmup(key, shape, graphs, seconds, ok, runs, signatures))
                if not done[index]:
                    _warn_uncovered(member, runs)
                if key != IMPLICIT_KEY:
                    _emit(WARMUP_SHAPE_EVENT, "ok" if ok else "refused", {
                        **member._audit_fields(), "shape": shape, "shape_key": key, "graphs": graphs,
                        "seconds": round(seconds, 6), "covered": ok, "warmup_runs": runs,
                        "signatures": len(signatures),
                        **({"outside_compiled_bounds": True} if key in outside[index] else {}),
                    })
        settle_runs = 0
        # Only a warm-up that compiled graphs settles: one that compiled nothing (again after
        # invalidate, every graph already built) left the first request nothing to pay.
        # Blocks bound to compiled packages compile no graph, but their first runs still cost: a
        # warm-up that ran them settles too.
        bound = any(member._compiler.misses(member.module) is not None for member in members)
        if (compiled or bound) and any(m.policy.compile for m in members):
            settle_started = time.perf_counter()
            if any(m.serving.measure_paths for m in members):
                per_bucket = _measure_paths(members, call_at, per_bucket, dims)
                settle_runs = 2 * len(buckets)
            else:
                for shape, first in zip(buckets, per_bucket[0], strict=True):
                    _settle(members, call_at, shape, first.key, dims)
                    settle_runs += 1
            settle_s = round(time.perf_counter() - settle_started, 6)
    elapsed = time.perf_counter() - started
    out = []
    declared = bool(buckets) and buckets[0] is not None
    for results, member_dims, cold in zip(per_bucket, dims, outside, strict=True):
        covered = True
        for result in results:
            covered = covered and result.covered
        fields: dict[str, Any] = {"warmup_runs": total_runs + settle_runs, "cached_branch_covered": covered}
        if cold:
            fields["outside_compiled_bounds"] = cold
            results = [result for result in results if result.key not in cold]
        if settle_runs:
            fields["settle_runs"] = settle_runs
            fields["settle_s"] = settle_s
        if declared:
            fields["buckets"] = [r.key for r in results]
        if len(members) > 1:
            fields["joint_warmup"] = [m.name for m in members]
        out.append(MemberWarmup(tuple(results), member_dims, covered, elapsed, fields))
    return WarmupResult(tuple(out), compiled)


def _probe(member: Member, call_at: CallAt, members: Sequence[Member]) -> SharedDims:
    """Buckets that share graphs: each declared bucket's first call signature, then the dims
    that differ between them (with their bounds). Nothing of any member runs or compiles."""
    if not (member._serving_state.shares_graphs and member.policy.compile):
        return member._serving_state.shared_dims
    declared = member._serving_state.book.declared_shapes()
    if len(declared) < 2:
        return member._serving_state.shared_dims
    modules = [m.module for m in members]
    signatures = []
    for shape in declared:
        signature = probe_signature(member.module, partial(call_at, shape), modules)
        if signature is not None:
            signatures.append(signature)
    dims = shared_dims(signatures)
    audit.logger().debug(
        "lifecycle.shape_probe",
        **member._audit_fields(),
        buckets=len(declared),
        shared_dims={f"{n}[{d}]": list(b) for (n, d), b in dims.items()},
    )
    # The probes ran host code (a pipeline may have moved a member's cache context).
    for other in members:
        other._serving_state.context.fresh()
    return dims


def _timed_call(
    members: Sequence[Member], call: Callable[[], object], dims: Sequence[SharedDims], *, eager: bool = False
) -> tuple[float, int]:
    """One call in the serving context (fresh before and after), timed, graphs counted; with
    ``eager``, on every member's eager path."""
    for member in members:
        member._serving_state.context.fresh()
    _sync(members)
    graphs_before = _graphs(members)
    started = time.perf_counter()
    with _BucketRun(members, dims, steer=False):
        if eager:
            with internals.eager_for(*(member.module for member in members)):
                call()
        else:
            call()
        _sync(members)
    seconds = time.perf_counter() - started
    graphs = _graphs(members) - graphs_before
    for member in members:
        member._serving_state.context.fresh()
    return seconds, graphs


def _settle(
    members: Sequence[Member], call_at: CallAt, shape: dict[str, Any] | None, key: str,
    dims: Sequence[SharedDims],
) -> None:
    seconds, graphs = _timed_call(members, lambda: call_at(shape), dims)
    if key == IMPLICIT_KEY:
        return
    for member in members:
        _emit(WARMUP_SETTLE_EVENT, "ok", {
            **member._audit_fields(), "shape_key": key, "seconds": round(seconds, 6), "graphs": graphs,
        })


def _measure_paths(
    members: Sequence[Member], call_at: CallAt, per_bucket: list[list[BucketWarmup]],
    dims: Sequence[SharedDims],
) -> list[list[BucketWarmup]]:
    """Each bucket's call timed compiled (it doubles as the settle call) and eager; the faster
    path serves that bucket. Returns the bucket results with their paths."""
    out: list[list[BucketWarmup]] = [[] for _ in members]
    for index, first in enumerate(per_bucket[0]):
        call = partial(call_at, first.shape)
        compiled_s, graphs = _timed_call(members, call, dims)
        eager_s, _ = _timed_call(members, call, dims, eager=True)
        path = "eager" if eager_s < compiled_s else "compiled"
        reason = (
            f"one warm-up call took {compiled_s:.4f} s compiled and {eager_s:.4f} s eager; {path} is faster"
        )
        for member, results, target in zip(members, per_bucket, out, strict=True):
            own = results[index]
            target.append(own._replace(path=path, path_reason=reason, compiled_s=compiled_s, eager_s=eager_s))
            _emit(WARMUP_PATH_EVENT, "ok", {
                **member._audit_fields(), "shape_key": own.key, "path": path, "reason": reason,
                "compiled_s": round(compiled_s, 6), "eager_s": round(eager_s, 6), "graphs": graphs,
            })
    return out


# ---------------------------------------------------------------------------- helpers
def _call_warmup(call_at: CallAt, shape: dict[str, Any] | None) -> None:
    try:
        call_at(shape)
    except RuntimeError as exc:
        if _is_shape_mismatch(exc):
            raise TransitionFailedError(
                "the warm-up ran the transformer at more than one input shape in one cache "
                f"context ({exc}): cache-dit compared a cached residual of one shape with another. "
                "Warm each shape in its own context: declare them with "
                "prepare(run, shapes=[...]), or warm up at one shape per warm_up(run)"
            ) from exc
        raise


def _is_shape_mismatch(exc: BaseException) -> bool:
    """A size mismatch raised inside cache-dit's cached blocks."""
    if "must match the size of tensor" not in str(exc):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if "cache_dit" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _undeclared_error(member: Member, sizes: int, warm: int) -> TransitionFailedError:
    """A plain warm-up called several input sizes and could not cover them all: a typed error
    naming the fix, never a WarmedUp that serves those sizes by surprise."""
    return TransitionFailedError(
        f"{member.name}: the warm-up callable called the transformer at {sizes} input sizes in one "
        f"warm-up, and only {warm} of them reached cache-dit's cached-step branch (each size needs "
        "its own cache context). Declare the sizes as serving buckets: prepare(run, shapes=[...]) "
        "with run(target, shape) making one call at a shape; or warm up at one size.",
        module=member.name, state=member.state, trigger="warm_up",
    )


def _warn_uncovered(member: Member, runs: int) -> None:
    message = (
        f"{member.name}: warm-up did not reach cache-dit's cached-step branch after {runs} "
        "run(s) of the warm-up callable; the first real request may compile new graphs. "
        "Make the warm-up call the transformer at least once per run, with the shapes of "
        "real requests."
    )
    warnings.warn(message, WarmupCoverageWarning, stacklevel=6)
    _emit(audit.WARMUP_COVERAGE_EVENT, "refused",
          {**member._audit_fields(), "covered": False, "warmup_runs": runs, "message": message})


def _emit(event: str, outcome: str, fields: dict[str, Any]) -> None:
    """An audit event; a lost write is a warning, never an error of the warm-up or request."""
    lost = emit_checked(event, outcome, fields)
    if lost is not None:
        warn_unwritten(event, str(fields.get("module")), lost)


def _sync(members: Sequence[Member]) -> None:
    for member in members:
        member.backend.synchronize()


def _graphs(members: Sequence[Member]) -> int:
    return int(members[0].backend.graph_count())


__all__ = [
    "MAX_WARMUP_RUNS",
    "Buckets",
    "CallAt",
    "MemberWarmup",
    "WarmupCoverageWarning",
    "WarmupResult",
    "buckets_to_warm",
    "call_at_shape",
    "run_warmup",
]
