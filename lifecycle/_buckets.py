"""Serving buckets as data: shapes, their keys, what each bucket's warm-up did and how its
requests went, and the requests that missed every bucket. No torch, no lifecycle.

A *shape* is a mapping of the host's own call arguments, e.g. ``{"height": 1024, "width": 1024}``
or ``{"num_frames": 81, "height": 480, "width": 832}``: the lifecycle never interprets it, it
hands it back to the host's warm-up callable, ``run(target, shape)``, which makes one warm-up
call at that shape. Its canonical key is ``"height=1024,width=1024"`` (keys sorted). A warm-up
without declared shapes warms the *implicit* bucket (key ``"*"``): whatever sizes ``run(target)``
calls the transformer at.

``BucketBook`` is one lifecycle's record. Its lock is its own (held for microseconds), so reads
(coverage, misses, stats, readiness) never wait for a request or a compile, and always see a
consistent snapshot.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from lifecycle._errors import InvalidConfigError

Shape = Mapping[str, Any]
# The key of the implicit bucket a warm-up without declared shapes warms.
IMPLICIT_KEY = "*"
# What a lifecycle keeps of its served requests and misses: counts of all, the latest of each
# (the median a first-request ratio is taken over; the shapes missed_shapes() offers). A server
# keeps a lifecycle for months; memory must not grow with the requests it serves.
RECENT_REQUESTS = 256
RECENT_MISSES = 1024
_SCALARS = (int, float, str, bool)


# ---------------------------------------------------------------------------- shapes
def canonical_shape(shape: object, *, module: str | None = None) -> dict[str, Any]:
    """A shape as a plain dict with sorted str keys and hashable scalar (or tuple) values."""
    who = module or "lifecycle"
    if not isinstance(shape, Mapping) or not shape:
        raise InvalidConfigError(
            f"{who}: a shape is a non-empty mapping of the host's call arguments, "
            f"e.g. {{'height': 1024, 'width': 1024}}; got {shape!r}",
            module=module,
        )
    out: dict[str, Any] = {}
    for key in sorted(shape, key=str):
        value = shape[key]
        if not isinstance(key, str) or not key:
            raise InvalidConfigError(f"{who}: shape keys must be non-empty str, got {key!r}", module=module)
        if isinstance(value, list):
            value = tuple(value)
        ok = isinstance(value, _SCALARS) or (
            isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value)
        )
        if not ok:
            raise InvalidConfigError(
                f"{who}: shape value {key}={value!r} must be an int, float, str, bool or a tuple of them",
                module=module,
            )
        out[key] = value
    return out


def shape_key(shape: Shape) -> str:
    """The canonical key: ``"height=1024,width=1024"``."""
    canon = canonical_shape(shape)
    return ",".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in canon.items())


def key_or_none(shape: Any) -> str | None:
    """The canonical key of a valid shape, None otherwise."""
    if shape is None:
        return None
    try:
        return shape_key(shape)
    except InvalidConfigError:
        return None


def check_shapes(shapes: object, *, module: str | None = None) -> list[dict[str, Any]]:
    """Declared buckets: a non-empty list of shapes, de-duplicated, in the host's order."""
    who = module or "lifecycle"
    if isinstance(shapes, Mapping) or not isinstance(shapes, Sequence) or isinstance(shapes, str):
        raise InvalidConfigError(
            f"{who}: shapes must be a list of shape mappings, e.g. "
            f"[{{'height': 1024, 'width': 1024}}]; got {type(shapes).__name__}",
            module=module,
        )
    if not shapes:
        raise InvalidConfigError(f"{who}: shapes is empty; declare at least one bucket", module=module)
    seen: dict[str, dict[str, Any]] = {}
    for shape in shapes:
        canon = canonical_shape(shape, module=module)
        seen.setdefault(shape_key(canon), canon)
    return list(seen.values())


# ---------------------------------------------------------------------------- the records
class BucketWarmup(NamedTuple):
    """What one warm-up did at one bucket (part of a warm-up's result; a NamedTuple, as one is
    made per bucket and warm-up)."""

    key: str
    shape: dict[str, Any] | None
    graphs: int
    seconds: float
    covered: bool
    runs: int
    signatures: frozenset[Any]
    path: str = "compiled"
    path_reason: str | None = None
    compiled_s: float | None = None
    eager_s: float | None = None


@dataclass(slots=True)
class BucketCoverage:
    """One bucket: what its warm-ups did and how its requests went (written by ``BucketBook``)."""

    key: str
    shape: dict[str, Any] | None
    warmed: bool = False
    graphs: int = 0
    seconds: float = 0.0
    covered: bool | None = None
    runs: int = 0
    signatures: frozenset[Any] = frozenset()
    path: str = "compiled"
    path_reason: str | None = None
    compiled_s: float | None = None
    eager_s: float | None = None
    requests: int = 0
    first_request_s: float | None = None
    # Made at the second request: a record is built on every warm-up after a reset.
    recent_s: deque[float] | None = None

    def note_warm(self, result: BucketWarmup) -> None:
        self.warmed = True
        self.graphs += result.graphs
        self.seconds += result.seconds
        self.covered = result.covered
        self.runs += result.runs
        self.signatures = self.signatures | result.signatures
        self.path, self.path_reason = result.path, result.path_reason
        self.compiled_s, self.eager_s = result.compiled_s, result.eager_s

    def note_request(self, seconds: float) -> None:
        self.requests += 1
        if self.first_request_s is None:
            self.first_request_s = seconds
        elif self.recent_s is None:
            self.recent_s = deque((seconds,), maxlen=RECENT_REQUESTS)
        else:
            self.recent_s.append(seconds)

    def cool(self) -> None:
        """Weights changed: warm again; the requests served before say nothing of the new weights."""
        self.warmed = False
        self.requests = 0
        self.first_request_s = None
        self.recent_s = None

    @property
    def first_request_ratio(self) -> float | None:
        """First request / median of the later ones (the latest ``RECENT_REQUESTS``), once at
        least two were served."""
        if self.first_request_s is None or self.recent_s is None:
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
    # The transformer call's input sizes (argument -> sizes), when the miss was found by them:
    # what an operator needs to tell which size to warm.
    input_sizes: dict[str, list[int]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "shape_key": self.key,
            "shape": self.shape,
            "policy": self.policy,
            "detected": self.detected,
            "duration_ms": round(self.duration_ms, 3),
            "new_graphs": self.new_graphs,
            "input_sizes": self.input_sizes,
        }


class BucketBook:
    """One lifecycle's buckets (which it serves, and their coverage) and misses.

    Every field is written by this class's methods alone, under its own lock; readers get
    copies. ``all_warm`` and ``any_declared`` are plain attributes recomputed on every change,
    so a readiness probe reads one value and never iterates a dict another thread is changing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, BucketCoverage] = {}
        self._misses: deque[ShapeMiss] = deque(maxlen=RECENT_MISSES)
        self._misses_by_policy: dict[str, int] = {}
        # signature -> bucket key, for requests that name no shape
        self._signatures: dict[Any, str] = {}
        self.all_warm = True
        # Whether any bucket was declared (a warm-up that names none re-warms them then).
        self.any_declared = False

    def _recount(self) -> None:
        # Every bucket warm, the implicit one too once it is one of them: a
        # warm-up again after invalidate that skips a bucket served before leaves it cold.
        warm = True
        declared = False
        for bucket in self._buckets.values():
            warm = warm and bucket.warmed
            declared = declared or bucket.shape is not None
        self.all_warm = warm
        self.any_declared = declared

    # the buckets
    def declare(self, shapes: Iterable[dict[str, Any] | None]) -> list[str]:
        """Add buckets (None: the implicit one); returns their keys, in order."""
        keys = []
        with self._lock:
            for shape in shapes:
                key = IMPLICIT_KEY if shape is None else shape_key(shape)
                if key not in self._buckets:
                    self._buckets[key] = BucketCoverage(key, None if shape is None else dict(shape))
                keys.append(key)
            self._recount()
        return keys

    def rows(self) -> list[tuple[dict[str, Any] | None, bool]]:
        """The buckets as (shape, warm) pairs in order (None: the implicit bucket); one look under
        the lock (a warm-up again reads it)."""
        with self._lock:
            return [(b.shape, b.warmed) for b in self._buckets.values()]

    def declared_shapes(self) -> list[dict[str, Any]]:
        """The declared buckets' shapes (the implicit one is not declared), in order."""
        with self._lock:
            return [dict(b.shape) for b in self._buckets.values() if b.shape is not None]

    def has_implicit(self) -> bool:
        with self._lock:
            return IMPLICIT_KEY in self._buckets

    def is_implicit_warm(self) -> bool:
        with self._lock:
            bucket = self._buckets.get(IMPLICIT_KEY)
            return bucket is not None and bucket.warmed

    def is_warm(self, shape: Shape) -> bool:
        with self._lock:
            bucket = self._buckets.get(shape_key(shape))
            return bucket is not None and bucket.warmed

    def lookup(self, key: str) -> BucketCoverage | None:
        """The warm bucket of ``key`` (the object itself: only this book writes it)."""
        bucket = self._buckets.get(key)
        return bucket if bucket is not None and bucket.warmed else None

    def bucket_of(self, signature: Any) -> BucketCoverage | None:
        key = self._signatures.get(signature)
        return self.lookup(key) if key is not None else None

    def knows_signatures(self) -> bool:
        return bool(self._signatures)

    def warmed_keys(self) -> list[str]:
        with self._lock:
            return [b.key for b in self._buckets.values() if b.warmed]

    # results applied
    def apply_warmup(self, results: Sequence[BucketWarmup]) -> None:
        """A warm-up that succeeded: its buckets are warm."""
        with self._lock:
            for result in results:
                bucket = self._buckets.get(result.key)
                if bucket is None:  # built only when new: a record holds a deque and a set
                    bucket = self._buckets[result.key] = BucketCoverage(result.key, result.shape)
                bucket.note_warm(result)
                for signature in result.signatures:
                    self._signatures.setdefault(signature, result.key)
            self._recount()

    def note_request(self, key: str, seconds: float) -> None:
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is not None:
                bucket.note_request(seconds)

    def cool(self) -> None:
        """Weights changed (invalidate): every bucket must be warmed again; the buckets stay."""
        with self._lock:
            for bucket in self._buckets.values():
                bucket.cool()
            self._signatures.clear()
            self._recount()

    def forget(self) -> None:
        """reset(): back to Loaded, the buckets are dropped (the next prepare declares it again)."""
        with self._lock:
            self._buckets.clear()
            self._signatures.clear()
            self.all_warm = True
            self.any_declared = False

    # misses
    def note_miss(self, miss: ShapeMiss) -> None:
        with self._lock:
            self._misses.append(miss)
            self._misses_by_policy[miss.policy] = self._misses_by_policy.get(miss.policy, 0) + 1

    def missed_shapes(self) -> list[dict[str, Any]]:
        """Shapes of misses the host named that no bucket covers now, de-duplicated, oldest first
        (of the latest ``RECENT_MISSES`` misses)."""
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for miss in self._misses:
                if miss.shape is None or miss.key is None:
                    continue
                bucket = self._buckets.get(miss.key)
                if bucket is None or not bucket.warmed:
                    out.setdefault(miss.key, dict(miss.shape))
        return list(out.values())

    def missed_sizes(self) -> list[dict[str, list[int]]]:
        """Input sizes of misses found by their sizes (no shape named), de-duplicated."""
        out: dict[str, dict[str, list[int]]] = {}
        with self._lock:
            for miss in self._misses:
                if miss.input_sizes is not None:
                    out.setdefault(repr(sorted(miss.input_sizes.items())), miss.input_sizes)
        return list(out.values())

    # reads
    def coverage(self) -> list[dict[str, Any]]:
        with self._lock:
            return [b.as_dict() for b in self._buckets.values()]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            declared = [b for b in self._buckets.values() if b.shape is not None]
            misses = dict(self._misses_by_policy)
        return {
            "declared": len(declared),
            "warm": sum(1 for b in declared if b.warmed),
            "shape_misses": sum(misses.values()),
            "shape_misses_by_policy": misses,
            "missed_sizes": self.missed_sizes(),
        }


__all__ = [
    "IMPLICIT_KEY",
    "RECENT_MISSES",
    "RECENT_REQUESTS",
    "BucketBook",
    "BucketCoverage",
    "BucketWarmup",
    "Shape",
    "ShapeMiss",
    "canonical_shape",
    "check_shapes",
    "key_or_none",
    "shape_key",
]
