"""What one lifecycle's warm-ups and requests leave behind: the serving state.

The warm-up (``lifecycle._warmup``) returns a ``MemberWarmup`` and the request scope
(``lifecycle._serving``) hands a ``RequestResult`` back to its member; the lifecycle applies
either here, and only the lifecycle calls the writing methods below (a test scans for any other
caller). Reads take no lifecycle lock: the bucket book has its own, and the rest are single
values.

Parts:
- ``context``: the module's cache-dit context (``lifecycle._context``), the one writer of its own
  fields; the warm-up and the request scope drive it (steer, restore, fresh).
- ``book``: the buckets, their warm-ups, requests and misses (``lifecycle._buckets``).
- the counters: requests served, graphs compiled since the latest warm-up, the running request.
- the bucket graphs: whether the declared buckets share dynamic graphs (decided before the
  compile, never written into ``compile_options``) and the dims the latest warm-up made dynamic.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from adapters.calls import SharedDims
from lifecycle._buckets import BucketBook, BucketWarmup, ShapeMiss
from lifecycle._context import CacheContext


class MemberWarmup(NamedTuple):
    """What one warm-up did for one member."""

    buckets: tuple[BucketWarmup, ...]
    shared_dims: SharedDims
    covered: bool
    seconds: float
    # Fields for the member's warm_up transition event.
    fields: dict[str, Any]


class RequestResult(NamedTuple):
    """What one finished request leaves on its member."""

    new_graphs: int
    # Graphs count as recompiles only when the member compiles.
    compiles: bool
    miss: ShapeMiss | None
    # The warm bucket that served it and its seconds (a request that succeeded and missed none).
    served: tuple[str, float] | None


class ServingState:
    """One lifecycle's serving state (see the module docstring)."""

    __slots__ = (
        "_active", "_covered", "_recompiles", "_requests", "_shared_dims", "_shares_graphs",
        "_warmup_s", "book", "context",
    )

    def __init__(self, context: CacheContext) -> None:
        self.context = context
        self.book = BucketBook()
        self._requests = 0
        self._recompiles = 0
        self._active: Any = None  # the running request (serving's ActiveRequest)
        self._shares_graphs = False
        self._shared_dims: SharedDims = {}
        self._covered: bool | None = None
        self._warmup_s = 0.0

    # ------------------------------------------------------------------ reads
    @property
    def active(self) -> Any:
        """The request running now (one at a time per lifecycle), or None."""
        return self._active

    @property
    def requests(self) -> int:
        return self._requests

    @property
    def recompiles_since_warmup(self) -> int:
        return self._recompiles

    @property
    def shares_graphs(self) -> bool:
        return self._shares_graphs

    @property
    def shared_dims(self) -> SharedDims:
        return self._shared_dims

    @property
    def covered(self) -> bool | None:
        """Whether the latest warm-up reached cache-dit's cached-step branch (None: none yet)."""
        return self._covered

    @property
    def warmup_s(self) -> float:
        return self._warmup_s

    def stats(self) -> dict[str, Any]:
        """The buckets' statistics, with how the buckets share graphs."""
        shapes = self.book.stats()
        shapes["shared_graphs"] = self._shares_graphs
        shapes["shared_dims"] = {
            f"{name}[{dim}]": list(bounds) for (name, dim), bounds in self._shared_dims.items()
        }
        return shapes

    # ------------------------------------------------------------------ written by the lifecycle
    def decide_sharing(self, shares: bool) -> None:
        """Before the compile: whether the declared buckets share dynamic graphs."""
        self._shares_graphs = shares

    def declare(self, shapes: list[dict[str, Any]]) -> None:
        """Buckets a warm-up was asked to warm: the lifecycle's from now on (cold until warmed)."""
        self.book.declare(shapes)

    def apply_warmup(self, result: MemberWarmup) -> None:
        """A warm-up succeeded: its result becomes this lifecycle's."""
        self.book.apply_warmup(result.buckets)
        self._shared_dims = result.shared_dims
        self._covered = result.covered
        self._warmup_s += result.seconds
        self._recompiles = 0

    def invalidate(self) -> None:
        """Weights changed: every bucket must be warmed again."""
        self._covered = None
        self.book.cool()

    def forget(self) -> None:
        """reset(): nothing warmed, nothing steered, no graphs."""
        self._covered = None
        self.context.forget()
        self._recompiles = 0
        self.book.forget()
        self._shares_graphs = False
        self._shared_dims = {}

    def request_started(self, active: object) -> None:
        self._active = active

    def request_cancelled(self) -> None:
        self._active = None

    def request_ended(self, outcome: RequestResult) -> int:
        """A request ended; returns the recompiles since warm-up, counting its new graphs."""
        self._active = None
        self._requests += 1
        if outcome.new_graphs and outcome.compiles:
            self._recompiles += outcome.new_graphs
        if outcome.miss is not None:
            self.book.note_miss(outcome.miss)
        elif outcome.served is not None:
            self.book.note_request(*outcome.served)
        return self._recompiles


# The methods above that write: called by the lifecycle (lifecycle/_module.py) only.
WRITERS = frozenset({
    "decide_sharing", "declare", "apply_warmup", "invalidate", "forget",
    "request_started", "request_cancelled", "request_ended",
})

__all__ = ["WRITERS", "MemberWarmup", "RequestResult", "ServingState"]
