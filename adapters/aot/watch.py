"""``PackageWatch``: while another replica builds this module's packages and this one serves
just in time, a daemon thread polls the store until they are published (verified by the store,
usable here, checked in a child process) or ``build_wait_s`` passes.

The thread writes only this object's own result (``outcome``, ``packages``, ``detail``), published
by ``done``; it never runs the module (the expected outputs of the check were computed by the
compile) and never binds anything: the compiler binds at a request boundary, when its lifecycle
asks. Events (``untrusted``, ``unreachable``, ``timeout``, ``switch_abandoned``) go to
``on_event`` as they happen. ``stop()`` ends it at its next poll (its result is then ignored).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from torch import nn

from adapters.aot.bounds import CallSpec
from adapters.aot.capture import BlockCall
from adapters.aot.fleet import check_fetched, package_info
from adapters.aot.store import PackageInfo
from adapters.store import PROBLEMS, PackageStore

Outcome = Literal["watching", "ready", "timeout", "abandoned", "stopped"]


class PackageWatch:
    """Watch ``store`` for the packages of ``stems`` (kind -> (package key, store name)).

    Args:
        blocks, calls, expected: per kind, the first block, a captured call and its eager outputs
            (for the child-process check of packages never checked on this host).
        deadline: ``time.monotonic()`` after which the wait ends (``timeout``).
        on_event: told each ``lifecycle.artifacts`` event, from the watch's thread.
    """

    def __init__(
        self,
        store: PackageStore,
        stems: Mapping[str, tuple[str, str]],
        specs: Mapping[str, CallSpec],
        *,
        key: str,
        blocks: Mapping[str, nn.Module],
        calls: Mapping[str, BlockCall],
        expected: Mapping[str, list[Any]],
        deadline: float,
        poll_s: float,
        on_event: Callable[[dict[str, Any]], None],
    ) -> None:
        self._store = store
        self._stems = dict(stems)
        self._specs = dict(specs)
        self._key = key
        self._blocks = dict(blocks)
        self._calls = dict(calls)
        self._expected = dict(expected)
        self._deadline = deadline
        self._poll_s = poll_s
        self._on_event = on_event
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._done = threading.Event()
        # Written by the watch's thread only, before ``done`` is set.
        self._outcome: Outcome = "watching"
        self._packages: dict[str, PackageInfo] = {}
        self._detail = ""
        self._seconds = 0.0
        self.fields: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name="dit-lifecycle-package-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the watch at its next poll; nothing it finds afterwards is used or audited."""
        self._stop.set()

    # ------------------------------------------------------------------ reads (any thread)
    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def outcome(self) -> Outcome:
        return self._outcome if self._done.is_set() else "watching"

    @property
    def packages(self) -> dict[str, PackageInfo]:
        """The packages to bind (``outcome == "ready"``)."""
        return dict(self._packages) if self._done.is_set() else {}

    @property
    def detail(self) -> str:
        return self._detail if self._done.is_set() else ""

    @property
    def seconds(self) -> float:
        """From the start of the watch to its end (or now)."""
        return self._seconds if self._done.is_set() else time.monotonic() - self._started

    def wait(self, timeout: float | None = None) -> bool:
        """Until the watch ends (tests, tools); whether it has."""
        return self._done.wait(timeout)

    def describe(self) -> dict[str, Any]:
        return {"status": self.outcome, "seconds": round(self.seconds, 3),
                **({"detail": self.detail} if self.detail else {})}

    # ------------------------------------------------------------------ the thread
    def _event(self, status: str, detail: str) -> None:
        if self._stop.is_set():
            return
        self._on_event({"action": "aot", "status": status, "key": self._key, "detail": detail,
                        "elapsed_s": round(time.monotonic() - self._started, 3),
                        "problem": status in PROBLEMS or status == "switch_abandoned"})

    def _finish(self, outcome: Outcome, detail: str = "") -> None:
        self._outcome = outcome
        self._detail = detail
        self._seconds = time.monotonic() - self._started
        self._done.set()

    def _run(self) -> None:
        try:
            self._watch()
        except Exception as error:  # never a crash of the host: the replica stays just in time
            detail = f"the watch failed ({type(error).__name__}: {error})"
            self._event("switch_abandoned", detail)
            self._finish("abandoned", detail)

    def _watch(self) -> None:
        reported: set[str] = set()
        unreachable = False
        while not self._stop.wait(self._poll_s):
            fetches = {kind: self._store.fetch(stem) for kind, (_, stem) in self._stems.items()}
            for kind, fetched in fetches.items():
                if fetched.status == "untrusted" and kind not in reported:
                    reported.add(kind)
                    self._event("untrusted", f"{kind}: {fetched.detail}")
            down = [f for f in fetches.values() if f.status in ("unreachable", "denied")]
            if down and not unreachable:  # once per outage: the next poll may find it again
                self._event("unreachable", down[0].detail)
            unreachable = bool(down)
            if all(f.status == "found" and f.package is not None for f in fetches.values()):
                packages = {
                    kind: package_info(kind, self._stems[kind][0], f.package)
                    for kind, f in fetches.items() if f.package is not None
                }
                problem = check_fetched(self._store, self._blocks, self._calls, self._specs, packages,
                                        self._stems, self.fields, self._expected)
                if problem is None:
                    self._packages = packages
                    self._finish("ready")
                    return
                self._event("untrusted", problem)
                detail = f"the published packages were refused: {problem}"
                self._event("switch_abandoned", detail)
                self._finish("abandoned", detail)
                return
            if time.monotonic() >= self._deadline:
                waited = time.monotonic() - self._started
                detail = f"no packages after {waited:.1f} s of waiting; serving just in time from now on"
                self._event("timeout", detail)
                self._finish("timeout", detail)
                return
        self._finish("stopped")


__all__ = ["PackageWatch"]
