"""One lifecycle's serving counters and its running request: data, written by its own methods."""

from __future__ import annotations

from typing import Any


class ServingCounters:
    """Requests served, graphs compiled since the latest warm-up, and the request running now
    (one at a time per lifecycle; held as ``object`` so this module needs no serving types)."""

    __slots__ = ("active", "recompiles_since_warmup", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.recompiles_since_warmup = 0
        self.active: Any = None

    def begin(self, active: object) -> None:
        self.active = active

    def end(self, new_graphs: int, *, compiles: bool) -> int:
        """A request ended; returns the recompiles since warm-up, counting its new graphs."""
        self.active = None
        self.requests += 1
        if new_graphs and compiles:
            self.recompiles_since_warmup += new_graphs
        return self.recompiles_since_warmup

    def cancel(self) -> None:
        self.active = None

    def warmed(self) -> None:
        """A warm-up succeeded: nothing compiled after it yet."""
        self.recompiles_since_warmup = 0


__all__ = ["ServingCounters"]
