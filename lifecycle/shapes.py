"""Serving shapes: declared buckets as data, their warm-up, and what a request at a shape no
warm-up covered does (issue 15).

A *shape* is a mapping of the host's own call arguments, e.g. ``{"height": 1024, "width": 1024}``
or ``{"num_frames": 81, "height": 480, "width": 832}``: the lifecycle never interprets it, it
hands it back to the host's warm-up callable, ``run(target, shape)``, which makes one warm-up
call at that shape. Its canonical key is ``"height=1024,width=1024"`` (keys sorted).

How a request's shape is known:
- The host says it: ``lc.request(..., shape={"height": 512, "width": 512})``. A shape whose key
  is a warmed bucket is served; any other is a miss, decided *before the block runs*.
- The host says nothing: every call of the transformer inside the request is compared, before
  it runs and outside compiled code (``adapters.stance.guard_calls``), against the input
  signatures (tensor sizes and dtypes) recorded while warming up. A call at a signature no
  warm-up made is a miss, decided before that call runs.

What a miss does (``on_unwarmed``, per lifecycle, overridable per request):
- ``"eager"`` (the default): the request runs under ``torch.compiler.set_stance(
  "eager_on_recompile")``: whatever compiled code fits still runs, and wherever a recompile would
  be needed the frame runs eagerly; nothing compiles. Why the default: an inline compile at an
  unwarmed shape costs 148x to 282x a steady request (FINDINGS), an eager cache-dit request about
  1.5x to 2x; a server that must never stall should pay the small price and be told.
- ``"compile"``: today's behaviour: it compiles inline, audited as a recompile.
- ``"fail"``: ``UnwarmedShapeError`` before the transformer runs; the state stays WarmedUp and
  the request is audited as refused.
Every miss is a ``lifecycle.shape_miss`` audit event and counts in ``stats()``;
``missed_shapes()`` lists the shapes the host named, so ``warm_up(run, shapes=lc.missed_shapes())``
warms them when the server is idle.

Buckets that share graphs: ``compile_options={"dynamic_buckets": True}`` compiles with
``dynamic=True`` and duck shaping off while warm-up traces (two sizes equal at one bucket must
not become one symbol), probes the input signature of every declared bucket (stopping each
probe call before the transformer runs) and marks the dimensions that differ between buckets
dynamic with the buckets' bounds, so N buckets cost one compile.

A settled warm-up: after the buckets, ``warm_up`` makes one more call of each bucket in the
serving context (not the steered one), timed and audited as ``lifecycle.warmup_settle``, then
refreshes the context for the first real request.

Compiled or eager per bucket (``compile_options={"measure_paths": True}``): each bucket's call
is timed once compiled and once eager after it is warm; requests at a bucket where eager was
faster run eagerly. ``lifecycle.warmup_path`` says which and the timings that chose it.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any

from adapters import stance as st
from lifecycle import audit
from lifecycle.errors import InvalidConfigError, TransitionFailedError, UnwarmedShapeError
from lifecycle.record import emit_checked, warn_unwritten
from lifecycle.warmup import _call_warmup, _warn_uncovered

Shape = Mapping[str, Any]
POLICIES = ("eager", "compile", "fail")
DEFAULT_ON_UNWARMED = "eager"
# Lifecycle-level compile options (consumed here, never passed to torch.compile).
SHAPE_OPTION_KEYS = ("dynamic_buckets", "measure_paths")
# None: decided by the plan. Measured on the H200 (README "Serving shapes"): four buckets sharing
# one dynamic compile prepared in 49.8 s against 84.0 s for a static compile per bucket, with
# every bucket's steady request within 3 % of (or faster than) its static one; so a prepare that
# declares two or more buckets before compiling shares graphs unless the host sets ``dynamic``
# or ``dynamic_buckets`` itself.
DEFAULT_DYNAMIC_BUCKETS: bool | None = None
# The key of the implicit bucket a warm-up without declared shapes warms.
IMPLICIT_KEY = "*"
# What a lifecycle keeps of its served requests and misses: counts of all, the latest of each
# (the median a first-request ratio is taken over; the shapes missed_shapes() offers). A server
# keeps a lifecycle for months; memory must not grow with the requests it serves.
RECENT_REQUESTS = 256
RECENT_MISSES = 1024
WARMUP_SHAPE_EVENT = "lifecycle.warmup_shape"
SHAPE_MISS_EVENT = "lifecycle.shape_miss"
WARMUP_SETTLE_EVENT = "lifecycle.warmup_settle"
WARMUP_PATH_EVENT = "lifecycle.warmup_path"
_SCALARS = (int, float, str, bool)


# ---------------------------------------------------------------------------- shapes as data
def canonical_shape(shape: object, *, module: str | None = None) -> dict[str, Any]:
    """A shape as a plain dict with sorted str keys and hashable scalar (or tuple) values."""
    if not isinstance(shape, Mapping) or not shape:
        raise InvalidConfigError(
            f"{module or 'lifecycle'}: a shape is a non-empty mapping of the host's call arguments, "
            f"e.g. {{'height': 1024, 'width': 1024}}; got {shape!r}",
            module=module,
        )
    out: dict[str, Any] = {}
    for key in sorted(shape, key=str):
        value = shape[key]
        if not isinstance(key, str) or not key:
            raise InvalidConfigError(
                f"{module or 'lifecycle'}: shape keys must be non-empty str, got {key!r}", module=module
            )
        if isinstance(value, list):
            value = tuple(value)
        ok = isinstance(value, _SCALARS) or (
            isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value)
        )
        if not ok:
            raise InvalidConfigError(
                f"{module or 'lifecycle'}: shape value {key}={value!r} must be an int, float, str, bool "
                "or a tuple of them",
                module=module,
            )
        out[key] = value
    return out


def shape_key(shape: Shape) -> str:
    """The canonical key: ``"height=1024,width=1024"``."""
    canon = canonical_shape(shape)
    return ",".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in canon.items())


def key_or_none(shape: Any) -> str | None:
    """The canonical key of a valid shape, None otherwise (``begin_request`` refuses a bad one)."""
    if shape is None:
        return None
    try:
        return shape_key(shape)
    except InvalidConfigError:
        return None


def check_shapes(shapes: object, *, module: str | None = None) -> list[dict[str, Any]]:
    """Declared buckets: a non-empty list of shapes, de-duplicated, in the host's order."""
    if isinstance(shapes, Mapping) or not isinstance(shapes, Sequence) or isinstance(shapes, str):
        raise InvalidConfigError(
            f"{module or 'lifecycle'}: shapes must be a list of shape mappings, e.g. "
            f"[{{'height': 1024, 'width': 1024}}]; got {type(shapes).__name__}",
            module=module,
        )
    if not shapes:
        raise InvalidConfigError(
            f"{module or 'lifecycle'}: shapes is empty; declare at least one bucket", module=module
        )
    seen: dict[str, dict[str, Any]] = {}
    for shape in shapes:
        canon = canonical_shape(shape, module=module)
        seen.setdefault(shape_key(canon), canon)
    return list(seen.values())


def check_policy(value: object, *, module: str | None = None) -> str:
    if value not in POLICIES:
        raise InvalidConfigError(
            f"{module or 'lifecycle'}: on_unwarmed must be one of {list(POLICIES)}, got {value!r}",
            module=module,
        )
    return str(value)


def split_options(
    options: Mapping[str, Any] | None, *, module: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the shape options, the rest for the backend). Refuses a non-bool shape option."""
    if options is not None and not isinstance(options, Mapping):
        # Not ours to judge further: the backend adapter refuses it with its own message.
        return ({"dynamic_buckets": False, "measure_paths": False, "host_dynamic": False}, options)
    options = dict(options or {})
    mine: dict[str, Any] = {
        "dynamic_buckets": DEFAULT_DYNAMIC_BUCKETS,
        "measure_paths": False,
        "host_dynamic": "dynamic" in options,
    }
    for key in SHAPE_OPTION_KEYS:
        if key in options:
            value = options.pop(key)
            if not isinstance(value, bool):
                raise InvalidConfigError(
                    f"{module or 'lifecycle'}: compile option {key} must be True or False, got {value!r}",
                    module=module,
                )
            mine[key] = value
    if mine["dynamic_buckets"] is True:
        # One compile for every bucket needs every frame symbolic, the frames after cache-dit's
        # graph breaks too (their inputs are fresh tensors no mark reaches): measured on the
        # tiny Flux, marks alone recompiled 7 of 8 graphs at the second bucket.
        if options.get("dynamic") is False:
            raise InvalidConfigError(
                f"{module or 'lifecycle'}: compile options dynamic_buckets=True and dynamic=False "
                "contradict each other; drop one of them",
                module=module,
            )
        options["dynamic"] = True
    return mine, options


# ---------------------------------------------------------------------------- the records
@dataclass
class BucketCoverage:
    """One bucket: what its warm-up did and how its requests went."""

    key: str
    shape: dict[str, Any] | None
    warmed: bool = False
    graphs: int = 0
    seconds: float = 0.0
    covered: bool | None = None
    runs: int = 0
    signatures: set[Any] = field(default_factory=set)
    path: str = "compiled"
    path_reason: str | None = None
    compiled_s: float | None = None
    eager_s: float | None = None
    # Served requests: how many, the first one's seconds and the latest ones' (bounded: a server
    # keeps a lifecycle for months, and every request would otherwise add a float).
    requests: int = 0
    first_request_s: float | None = None
    recent_s: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_REQUESTS))

    def note_request(self, seconds: float) -> None:
        self.requests += 1
        if self.first_request_s is None:
            self.first_request_s = seconds
        else:
            self.recent_s.append(seconds)

    def forget_requests(self) -> None:
        self.requests = 0
        self.first_request_s = None
        self.recent_s.clear()

    @property
    def first_request_ratio(self) -> float | None:
        """First request / median of the later ones (the latest ``RECENT_REQUESTS``), once at
        least two were served."""
        if self.first_request_s is None or not self.recent_s:
            return None
        return self.first_request_s / statistics.median(self.recent_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "shape": self.shape,
            "warmed": self.warmed,
            "graphs": self.graphs,
            "seconds": round(self.seconds, 6),
            "covered": self.covered,
            "runs": self.runs,
            "signatures": len(self.signatures),
            "path": self.path,
            "path_reason": self.path_reason,
            "compiled_s": self.compiled_s,
            "eager_s": self.eager_s,
            "requests": self.requests,
            "first_request_s": self.first_request_s,
            "first_request_ratio": self.first_request_ratio,
        }


@dataclass(frozen=True)
class ShapeMiss:
    """One request at a shape no warm-up covered."""

    request_id: str
    key: str | None
    shape: dict[str, Any] | None
    policy: str
    detected: str  # "shape" (the host named it) | "signature" (a call's input sizes)
    duration_ms: float = 0.0
    new_graphs: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "shape_key": self.key,
            "shape": self.shape,
            "policy": self.policy,
            "detected": self.detected,
            "duration_ms": round(self.duration_ms, 3),
            "new_graphs": self.new_graphs,
        }


class ShapeBook:
    """Per lifecycle: the declared buckets (the plan), their coverage, and the misses."""

    def __init__(self, on_unwarmed: str, options: Mapping[str, Any]) -> None:
        self.on_unwarmed = on_unwarmed
        # True, False, or None until a plan decides it (``choose_sharing``).
        self.dynamic_buckets: bool | None = options.get("dynamic_buckets", DEFAULT_DYNAMIC_BUCKETS)
        self.host_dynamic = bool(options.get("host_dynamic", False))
        self.measure_paths = bool(options.get("measure_paths", False))
        self.buckets: dict[str, BucketCoverage] = {}
        # The latest misses (bounded, like a bucket's request times); the counts are of all.
        self.misses: deque[ShapeMiss] = deque(maxlen=RECENT_MISSES)
        self.misses_by_policy: dict[str, int] = {}
        self.shared_dims: dict[Any, Any] = {}
        # signature -> bucket key, for requests that name no shape
        self.signatures: dict[Any, str] = {}

    # the plan
    @property
    def declared(self) -> list[BucketCoverage]:
        return [b for b in self.buckets.values() if b.key != IMPLICIT_KEY]

    def declare(self, shapes: list[dict[str, Any]]) -> list[BucketCoverage]:
        """Add buckets to the plan; returns every bucket of ``shapes``, in order."""
        out = []
        for shape in shapes:
            key = shape_key(shape)
            out.append(self.buckets.setdefault(key, BucketCoverage(key, dict(shape))))
        return out

    def implicit(self) -> BucketCoverage:
        bucket = self.buckets.get(IMPLICIT_KEY)
        if bucket is None:
            bucket = self.buckets[IMPLICIT_KEY] = BucketCoverage(IMPLICIT_KEY, None)
        return bucket

    def lookup(self, shape: Shape) -> BucketCoverage | None:
        bucket = self.buckets.get(shape_key(shape))
        return bucket if bucket is not None and bucket.warmed else None

    def bucket_of(self, signature: Any) -> BucketCoverage | None:
        key = self.signatures.get(signature)
        bucket = self.buckets.get(key) if key is not None else None
        return bucket if bucket is not None and bucket.warmed else None

    def has_declared(self) -> bool:
        """Whether any bucket was declared (the implicit one is not)."""
        return len(self.buckets) > (IMPLICIT_KEY in self.buckets)

    def all_warm(self) -> bool:
        """Every declared bucket warm (a plain warm-up's implicit bucket is the state's business)."""
        return all(b.warmed for key, b in self.buckets.items() if key != IMPLICIT_KEY)

    def note_warm(
        self,
        bucket: BucketCoverage,
        *,
        graphs: int,
        seconds: float,
        covered: bool,
        runs: int,
        signatures: set[Any],
    ) -> None:
        bucket.warmed = True
        bucket.graphs += graphs
        bucket.seconds += seconds
        bucket.covered = covered
        bucket.runs += runs
        bucket.signatures |= signatures
        for signature in signatures:
            self.signatures.setdefault(signature, bucket.key)

    def cool(self) -> None:
        """Weights changed (invalidate): every bucket must be warmed again; the plan stays."""
        for bucket in self.buckets.values():
            bucket.warmed = False
            bucket.forget_requests()
        self.signatures.clear()

    def forget(self) -> None:
        """reset(): back to Loaded, the plan is dropped (the next prepare declares it again)."""
        self.buckets.clear()
        self.signatures.clear()
        self.shared_dims = {}

    # misses
    def note_miss(self, miss: ShapeMiss) -> None:
        self.misses.append(miss)
        self.misses_by_policy[miss.policy] = self.misses_by_policy.get(miss.policy, 0) + 1

    def missed_shapes(self) -> list[dict[str, Any]]:
        """Shapes of misses the host named that no bucket covers now, de-duplicated, oldest first
        (of the latest ``RECENT_MISSES`` misses)."""
        out: dict[str, dict[str, Any]] = {}
        for miss in self.misses:
            if miss.shape is None or miss.key is None:
                continue
            bucket = self.buckets.get(miss.key)
            if bucket is None or not bucket.warmed:
                out.setdefault(miss.key, dict(miss.shape))
        return list(out.values())

    def coverage(self) -> list[dict[str, Any]]:
        return [b.as_dict() for b in self.buckets.values()]

    def stats(self) -> dict[str, Any]:
        return {
            "declared": len(self.declared),
            "warm": sum(1 for b in self.declared if b.warmed),
            "shape_misses": sum(self.misses_by_policy.values()),
            "shape_misses_by_policy": dict(self.misses_by_policy),
            "on_unwarmed": self.on_unwarmed,
            "dynamic_buckets": self.dynamic_buckets,
            "shared_dims": {
                f"{name}[{dim}]": list(bounds) for (name, dim), bounds in self.shared_dims.items()
            },
        }


# ---------------------------------------------------------------------------- warm-up
# A member is a ModuleLifecycle; typed Any here to keep this module free of a cycle with it.
Member = Any


class _Seen:
    """One member's input signatures during a warm-up bucket, and whether each one's cache
    context reached the cached-step branch. Called in front of each of the member's calls
    (``guard_calls``): records the call's signature, applies the shared dynamic dims, and starts
    a fresh cache context when the signature changes (a warm-up that calls two sizes would
    otherwise mix their cached residuals inside cache-dit: issue 20 item 5)."""

    __slots__ = ("check", "last", "member", "signatures", "steered")

    def __init__(self, member: Member, *, check: bool, steered: bool) -> None:
        self.member = member
        self.check = check  # ask the cache whether the steered context covered the branch
        self.steered = steered  # a fresh context is a steered one (warm-up) or a serving one
        self.signatures: dict[Any, bool] = {}
        self.last: Any = None

    def covered(self) -> bool:
        member = self.member
        return bool(member.cache.warmup_covered(member.module)) if self.check else True

    def close_segment(self) -> None:
        """The context that served ``last`` ends here: keep whether it was covered."""
        if self.last is not None:
            self.signatures[self.last] = self.signatures.get(self.last, False) or self.covered()

    def all_covered(self) -> bool:
        if not self.signatures:  # the module was never called: only the context can tell
            return self.covered()
        self.close_segment()
        return all(self.signatures.values())

    def warm(self) -> set[Any]:
        self.close_segment()
        return {sig for sig, ok in self.signatures.items() if ok}

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        member = self.member
        signature = st.input_signature(args, kwargs)
        if self.last is not None and signature != self.last:
            self.close_segment()
            if member.policy.cache_dit:
                if self.steered:
                    member.cache.refresh_for_warmup(member.module, member.cache_config)
                else:
                    member.cache.refresh(member.module, member.cache_config, member.serving_steps)
        self.last = signature
        self.signatures.setdefault(signature, False)
        st.mark_shared_dims(member.shapes.shared_dims, args, kwargs)


class _BucketRun:
    """``with _BucketRun(members, steer=...) as seen``: one bucket's calls of the warm-up
    callable. With ``steer``, every member's cache context is steered towards the cached-step
    branch, and leaving restores every serving context (the last steered first, all of them
    even when one restore raises). Every member's calls go through its ``_Seen`` while the block
    is open (duck shaping off when buckets share graphs). A class: every warm-up opens one."""

    __slots__ = ("_duck", "_guards", "_steered", "members", "steer")

    def __init__(self, members: Sequence[Member], *, steer: bool) -> None:
        self.members = members
        self.steer = steer
        self._steered: list[Member] = []
        self._guards: list[st.guard_calls] = []
        self._duck: AbstractContextManager[None] | None = None

    def __enter__(self) -> list[_Seen]:
        seen = []
        try:
            dynamic = False
            for member in self.members:
                check = False
                if self.steer:
                    check = member.steering.steer()
                    self._steered.append(member)
                tracker = _Seen(member, check=check, steered=self.steer)
                guard = st.guard_calls(member.module, tracker)
                guard.__enter__()
                self._guards.append(guard)
                seen.append(tracker)
                dynamic = dynamic or bool(member.shapes.dynamic_buckets)
            if dynamic:
                self._duck = st.no_duck_shape()
                self._duck.__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return seen

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._duck is not None:
            self._duck.__exit__(None, None, None)
            self._duck = None
        while self._guards:
            self._guards.pop().__exit__(None, None, None)
        first: BaseException | None = None
        while self._steered:
            try:
                self._steered.pop().steering.restore()
            except BaseException as error:  # restore the others, then raise the first
                first = first or error
        if first is not None:
            raise first


def _probe(
    members: Sequence[Member],
    call_at: Callable[[dict[str, Any] | None], object],
    buckets: list[BucketCoverage],
) -> None:
    """dynamic_buckets: each bucket's first call signature, then the dims that differ."""
    for member in members:
        book: ShapeBook = member.shapes
        if not (book.dynamic_buckets and member.policy.compile):
            continue
        signatures = []
        for bucket in book.declared:
            signature = st.probe_signature(member.module, partial(call_at, bucket.shape))
            if signature is not None:
                signatures.append(signature)
        book.shared_dims = st.shared_dims(signatures)
        audit.logger().debug(
            "lifecycle.shape_probe",
            **member.audit_fields(),
            buckets=len(book.declared),
            shared_dims={f"{n}[{d}]": list(b) for (n, d), b in book.shared_dims.items()},
        )
    # The probes ran host code (a pipeline may have moved a member's cache context).
    for member in members:
        if member.policy.cache_dit:
            member.cache.refresh(member.module, member.cache_config, member.serving_steps)


def _emit(event: str, outcome: str, fields: dict[str, Any]) -> None:
    """An audit event; a lost write is a warning, never an error of the warm-up or request."""
    lost = emit_checked(event, outcome, fields)
    if lost is not None:
        warn_unwritten(event, str(fields.get("module")), lost)


def _undeclared_error(member: Member, sizes: int, warm: int) -> TransitionFailedError:
    """A plain warm-up called several input sizes and could not cover them all (issue 20 item 5):
    a typed error naming the fix, never a WarmedUp that serves those sizes by surprise."""
    return TransitionFailedError(
        f"{member.name}: the warm-up callable called the transformer at {sizes} input sizes in one "
        f"warm-up, and only {warm} of them reached cache-dit's cached-step branch (each size needs "
        "its own cache context). Declare the sizes as serving buckets: prepare(run, shapes=[...]) "
        "with run(target, shape) making one call at a shape; or warm up at one size.",
        module=member.name, state=member.state, trigger="warm_up",
    )


def choose_sharing(member: Member, planned: list[dict[str, Any]] | None) -> None:
    """Before a prepare walks: with ``dynamic_buckets`` left to the default, a plan of two or more
    buckets declared before the compile shares graphs (``dynamic=True``), unless the host set
    ``dynamic``. Once compiled, the choice is made (a later plan cannot change the graphs)."""
    book: ShapeBook = member.shapes
    if book.dynamic_buckets is not None or not member.policy.compile:
        return
    compiled = member.state.value in ("Compiled", "WarmedUp")
    if compiled or book.host_dynamic:
        book.dynamic_buckets = False
    elif planned is not None and len(planned) >= 2:
        book.dynamic_buckets = True
        member.compile_options["dynamic"] = True


def _sync(members: Sequence[Member]) -> None:
    for member in members:
        member.backend.synchronize()


def _graphs(members: Sequence[Member]) -> int:
    return int(members[0].backend.graph_count())


def call_at_shape(run: Callable[..., object], target: object) -> Callable[[dict[str, Any] | None], object]:
    """The host's warm-up callable as ``run_warmup`` calls it: ``run(target, shape)`` at a
    declared bucket, ``run(target)`` at the implicit one (no shapes declared: shape None)."""

    def call_at(shape: dict[str, Any] | None) -> object:
        return run(target) if shape is None else run(target, shape)

    return call_at


def run_warmup(
    members: Sequence[Member],
    call_at: Callable[[dict[str, Any] | None], object],
    shapes: list[dict[str, Any]] | None,
    extras: Sequence[dict[str, Any]],
    *,
    max_runs: int,
) -> None:
    """Warm ``members`` together: every bucket of ``shapes`` (``call_at(shape)``), or the
    implicit bucket (``call_at(None)``) when there are none; then settle.

    Each bucket runs in its own steered cache context until the cached-step branch is covered
    (at most ``max_runs`` calls); one ``lifecycle.warmup_shape`` event per declared bucket.
    ``extras`` holds each member's transition fields (same order), written here. Raises whatever
    the warm-up callable raised (the caller's transition records it)."""
    declared = members[0].shapes.has_declared()
    if shapes is not None:
        buckets_per_member = [m.shapes.declare(shapes) for m in members]
    elif declared:
        # A warm-up again (after invalidate) without shapes: the plan's buckets.
        buckets_per_member = [m.shapes.declared for m in members]
    else:
        buckets_per_member = [[m.shapes.implicit()] for m in members]
    plan = buckets_per_member[0]
    if shapes is not None or declared:
        _probe(members, call_at, plan)
    started = time.perf_counter()
    total_runs = 0
    compiled_graphs = 0
    for index, bucket in enumerate(plan):
        graphs_before = _graphs(members)
        bucket_started = time.perf_counter()
        runs = 0
        with _BucketRun(members, steer=True) as seen:
            while True:
                _call_warmup(call_at, bucket.shape)
                runs += 1
                done = [tracker.all_covered() for tracker in seen]
                if all(done) or runs >= max_runs:
                    break
            warm = [tracker.warm() for tracker in seen]
            _sync(members)
        seconds = time.perf_counter() - bucket_started
        graphs = _graphs(members) - graphs_before
        compiled_graphs += graphs
        total_runs += runs
        if not all(done):
            for member, ok, buckets, tracker, signatures in zip(
                members, done, buckets_per_member, seen, warm, strict=True
            ):
                if not ok and buckets[index].key == IMPLICIT_KEY and len(tracker.signatures) > 1:
                    raise _undeclared_error(member, len(tracker.signatures), len(signatures))
        for member, ok, buckets, signatures in zip(members, done, buckets_per_member, warm, strict=True):
            own = buckets[index]
            member.shapes.note_warm(
                own, graphs=graphs, seconds=seconds, covered=ok, runs=runs, signatures=signatures
            )
            if not ok:
                _warn_uncovered(member, runs)
            if own.key != IMPLICIT_KEY:
                _emit(
                    WARMUP_SHAPE_EVENT,
                    "ok" if ok else "refused",
                    {
                        **member.audit_fields(),
                        "shape": own.shape,
                        "shape_key": own.key,
                        "graphs": graphs,
                        "seconds": round(seconds, 6),
                        "covered": ok,
                        "warmup_runs": runs,
                        "signatures": len(own.signatures),
                    },
                )
    settle_runs = 0
    settle_s = 0.0
    # Settle (and measure paths) only after a warm-up that compiled graphs: a warm-up that
    # compiled nothing (again after invalidate, with every graph already built) left nothing
    # new for the first request to pay, and one call per bucket is a whole forward.
    if compiled_graphs and any(m.policy.compile for m in members):
        settle_started = time.perf_counter()
        if any(m.shapes.measure_paths for m in members):
            settle_runs = _measure_paths(members, call_at, buckets_per_member)
        else:
            for bucket in plan:
                _settle(members, call_at, bucket)
                settle_runs += 1
        settle_s = round(time.perf_counter() - settle_started, 6)
    elapsed = time.perf_counter() - started
    for member, buckets, extra in zip(members, buckets_per_member, extras, strict=True):
        member.steering.covered = all(b.covered for b in buckets)
        member.steering.warmup_s += elapsed
        member.serving.recompiles_since_warmup = 0
        if member.artifacts is not None:
            member.save_artifacts(extra)
        # Every call of the warm-up callable, the settling ones included.
        extra["warmup_runs"] = total_runs + settle_runs
        if settle_runs:  # only a warm-up that compiled graphs settles
            extra["settle_runs"] = settle_runs
            extra["settle_s"] = settle_s
        extra["cached_branch_covered"] = member.steering.covered
        if plan[0].key != IMPLICIT_KEY:
            extra["buckets"] = [b.key for b in plan]
        if len(members) > 1:
            extra["joint_warmup"] = [m.name for m in members]


def _timed_call(
    members: Sequence[Member], call: Callable[[], object], *, eager: bool = False
) -> tuple[float, int]:
    """One call in the serving context (fresh before and after), timed, graphs counted."""
    for member in members:
        if member.policy.cache_dit:
            member.cache.refresh(member.module, member.cache_config, member.serving_steps)
    _sync(members)
    graphs_before = _graphs(members)
    started = time.perf_counter()
    with _BucketRun(members, steer=False), maybe(st.stance("force_eager") if eager else None):
        call()
        _sync(members)
    seconds = time.perf_counter() - started
    graphs = _graphs(members) - graphs_before
    for member in members:
        if member.policy.cache_dit:
            member.cache.refresh(member.module, member.cache_config, member.serving_steps)
    return seconds, graphs


def _settle(
    members: Sequence[Member], call_at: Callable[[dict[str, Any] | None], object], bucket: BucketCoverage
) -> None:
    """One more call of a bucket in the serving context: whatever the first request would
    still pay after warm-up (lazily loaded kernels, allocator growth, first launches outside the
    steered context) is paid here, at the cost of one warm-up call per bucket. Its cost is on
    the warm_up transition event (``settle_runs``, ``settle_s``); a declared bucket also gets a
    ``lifecycle.warmup_settle`` event of its own."""
    seconds, graphs = _timed_call(members, lambda: call_at(bucket.shape))
    if bucket.key == IMPLICIT_KEY:
        return
    for member in members:
        _emit(
            WARMUP_SETTLE_EVENT,
            "ok",
            {
                **member.audit_fields(),
                "shape_key": bucket.key,
                "seconds": round(seconds, 6),
                "graphs": graphs,
            },
        )


def _measure_paths(
    members: Sequence[Member],
    call_at: Callable[[dict[str, Any] | None], object],
    buckets_per_member: list[list[BucketCoverage]],
) -> int:
    """Each bucket's call timed compiled (it doubles as the settle call) and eager; the faster
    path serves that bucket. Returns the calls made."""
    for index, bucket in enumerate(buckets_per_member[0]):
        call = partial(call_at, bucket.shape)
        compiled_s, graphs = _timed_call(members, call)
        eager_s, _ = _timed_call(members, call, eager=True)
        path = "eager" if eager_s < compiled_s else "compiled"
        reason = (
            f"one warm-up call took {compiled_s:.4f} s compiled and {eager_s:.4f} s eager; {path} is faster"
        )
        for member, buckets in zip(members, buckets_per_member, strict=True):
            own = buckets[index]
            own.path, own.path_reason, own.compiled_s, own.eager_s = path, reason, compiled_s, eager_s
            _emit(
                WARMUP_PATH_EVENT,
                "ok",
                {
                    **member.audit_fields(),
                    "shape_key": own.key,
                    "path": path,
                    "reason": reason,
                    "compiled_s": round(compiled_s, 6),
                    "eager_s": round(eager_s, 6),
                    "graphs": graphs,
                },
            )
    return 2 * len(buckets_per_member[0])


# ---------------------------------------------------------------------------- serving
@dataclass
class RequestShape:
    """What one request knows about its shape while it runs."""

    policy: str
    key: str | None = None
    shape: dict[str, Any] | None = None
    bucket: BucketCoverage | None = None
    miss: str | None = None  # None | "shape" | "signature"


def begin_request(
    member: Member, shape: Shape | None, on_unwarmed: str | None, request_id: str
) -> RequestShape:
    """Before the request's block runs: the policy, and a miss decided from a named shape.

    Raises ``UnwarmedShapeError`` (nothing ran) for a named, unwarmed shape under ``"fail"``,
    after recording the miss; the caller audits the refused request."""
    book: ShapeBook = member.shapes
    policy = check_policy(on_unwarmed, module=member.name) if on_unwarmed is not None else book.on_unwarmed
    info = RequestShape(policy)
    if shape is not None:
        info.shape = canonical_shape(shape, module=member.name)
        info.key = shape_key(info.shape)
        info.bucket = book.lookup(info.shape)
        if info.bucket is None and member.policy.compile:
            info.miss = "shape"
            if policy == "fail":
                error = unwarmed_error(member, info, request_id)
                end_request(member, info, request_id, 0.0, 0, error)
                raise error
    return info


def unwarmed_error(member: Member, info: RequestShape, request_id: str) -> UnwarmedShapeError:
    warmed = [b.key for b in member.shapes.buckets.values() if b.warmed]
    what = f"shape {info.key!r}" if info.key is not None else "input sizes no warm-up call made"
    fix = (
        f"warm_up(run, shapes=[{info.shape!r}])"
        if info.shape is not None
        else "pass shape= to request() and warm it with warm_up(run, shapes=lc.missed_shapes())"
    )
    error = UnwarmedShapeError(
        f"{member.name}: request {request_id!r} at {what} is not warmed up (warmed buckets: "
        f"{warmed or 'none'}) and on_unwarmed='fail'; nothing ran and the state stays WarmedUp. "
        f"Declare it and warm it first: {fix}, or serve it with on_unwarmed='eager'.",
        module=member.name,
        state=member.state,
        trigger="request",
    )
    error.shape_key = info.key  # type: ignore[attr-defined]
    return error


class ServingGuard:
    """``with ServingGuard(member, info, request_id)``: around a request's block, the stance for
    a named miss, and the call guard that detects a miss by input signature (and applies the
    shared dynamic dims, and a measured eager path). A class: every request opens one."""

    __slots__ = ("_guard", "_stance", "info", "member", "request_id")

    def __init__(self, member: Member, info: RequestShape, request_id: str) -> None:
        self.member = member
        self.info = info
        self.request_id = request_id
        self._guard: st.guard_calls | None = None
        self._stance: AbstractContextManager[None] | None = None

    def _before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> AbstractContextManager[Any] | None:
        book: ShapeBook = self.member.shapes
        info = self.info
        st.mark_shared_dims(book.shared_dims, args, kwargs)
        if info.key is not None:
            if info.bucket is not None and info.bucket.path == "eager":
                return st.stance("force_eager")
            return None  # a named shape: decided at the start of the request
        if not book.signatures:
            return None  # warm-up never called the module: nothing to compare with
        signature = st.input_signature(args, kwargs)
        bucket = book.bucket_of(signature)
        if bucket is not None:
            if info.bucket is None:
                info.bucket = bucket
            return st.stance("force_eager") if bucket.path == "eager" else None
        if info.miss is None:
            info.miss = "signature"
        if info.policy == "fail":
            raise unwarmed_error(self.member, info, self.request_id)
        return st.stance("eager_on_recompile") if info.policy == "eager" else None

    def __enter__(self) -> None:
        if not self.member.policy.compile:
            return
        info = self.info
        if info.miss == "shape" and info.policy == "eager":
            self._stance = st.stance("eager_on_recompile")
            self._stance.__enter__()
        guard = st.guard_calls(self.member.module, self._before)
        try:
            guard.__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self._guard = guard

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._guard is not None:
            self._guard.__exit__(exc_type, exc, tb)
            self._guard = None
        if self._stance is not None:
            stance, self._stance = self._stance, None
            stance.__exit__(exc_type, exc, tb)


def end_request(
    member: Member,
    info: RequestShape,
    request_id: str,
    duration_ms: float,
    new_graphs: int,
    error: BaseException | None,
) -> None:
    """After the block: the miss event (and the served bucket's timing)."""
    book: ShapeBook = member.shapes
    if info.miss is not None:
        miss = ShapeMiss(request_id, info.key, info.shape, info.policy, info.miss, duration_ms, new_graphs)
        book.note_miss(miss)
        outcome = "refused" if isinstance(error, UnwarmedShapeError) else "ok" if error is None else "failed"
        _emit(
            SHAPE_MISS_EVENT,
            "refused" if outcome != "failed" else "failed",
            {
                **member.audit_fields(),
                **miss.as_dict(),
                "outcome": outcome,
            },
        )
    elif info.bucket is not None and error is None:
        info.bucket.note_request(duration_ms / 1000.0)


def is_refusal(error: BaseException | None) -> bool:
    """A request that ended in UnwarmedShapeError was refused, not failed."""
    return isinstance(error, UnwarmedShapeError)


def maybe(context: AbstractContextManager[Any] | None) -> AbstractContextManager[Any]:
    return context if context is not None else nullcontext()
