"""Build once per fleet: load the packages if the store has them, else build them under the
key's lease while the other replicas wait, then load what was published.

``obtain`` loops until it has an answer:

1. fetch every wanted key: all found -> ``loaded``. A store that does not answer ->
   ``unreachable`` (the caller builds locally). A package refused as ``untrusted`` is audited (an
   event) and treated as missing (rebuilt over), or returned as ``untrusted`` when the caller
   chose ``rebuild_untrusted=False``.
2. a read-only store -> ``missing``: nothing there, nothing may be built into it.
3. try the lease. Taken: fetch again (a builder may have just published), else ``build()``
   (the caller's work: it returns the packages' files), publish them, release -> ``built``.
   Not taken: a ``waiting`` event (once per holder), then poll again after ``poll_s``, until
   ``wait_s`` -> ``timeout``; or, when the caller will not wait (``wait=False``), ``busy`` at
   once (the caller serves otherwise and watches the store itself).

Never raises for what happens in the store; ``build()``'s exception is returned (``failed``,
``error``) after the lease is released.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.errors import InvalidOptions
from adapters.store.errors import StoreDenied, StoreError
from adapters.store.lease import Lease
from adapters.store.manifest import Manifest
from adapters.store.packages import PackageStore
from adapters.store.results import Fetched, Obtained, Package, Published, StoreEvent


@dataclass(frozen=True)
class NewPackage:
    """What a build made for one key: files on this node and metadata for its manifest."""

    key: str
    files: Mapping[str, Path]
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class _Run:
    keys: Sequence[str]
    started: float
    on_event: Callable[[StoreEvent], None] | None
    events: list[StoreEvent] = field(default_factory=list)
    waited_from: float | None = None

    def event(self, status: str, key: str, detail: str = "") -> None:
        event = StoreEvent(status, key, detail, time.monotonic() - self.started)
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def done(self, status: Any, **values: Any) -> Obtained:
        now = time.monotonic()
        waited = 0.0 if self.waited_from is None else now - self.waited_from
        return Obtained(status, events=tuple(self.events), waited_s=waited,
                        seconds=now - self.started, **values)


def obtain(
    store: PackageStore,
    keys: Sequence[str],
    build: Callable[[], Sequence[NewPackage]],
    *,
    lease_key: str,
    wait_s: float = 600.0,
    poll_s: float = 0.5,
    lease_ttl_s: float = 30.0,
    clock_skew_s: float = 5.0,
    rebuild_untrusted: bool = True,
    on_event: Callable[[StoreEvent], None] | None = None,
    wait: bool = True,
) -> Obtained:
    """Load ``keys`` from ``store``, building them (once in the fleet) when they are not there.

    Args:
        keys: the packages wanted (all of them, or it is not loaded).
        build: makes the packages when this replica holds the lease (it may raise).
        lease_key: one lease for everything ``build`` makes (e.g. a digest of ``keys``).
        wait_s: how long to wait for another replica's build (``build_wait_s``).
        poll_s: how often a waiting replica looks for the packages.
        lease_ttl_s, clock_skew_s: lease objects' expiry (object stores; see ``lease``).
        rebuild_untrusted: build over a refused package (True) or return ``untrusted``.
        on_event: called with each ``StoreEvent`` as it happens (``waiting``, ``untrusted``, ...).
        wait: False: another replica holding the lease is answered ``busy`` after the ``waiting``
            event, without waiting.
    """
    _check_times(wait_s=wait_s, poll_s=poll_s, lease_ttl_s=lease_ttl_s, clock_skew_s=clock_skew_s)
    run = _Run(list(keys), time.monotonic(), on_event)
    reported_untrusted: set[str] = set()
    last_holder: str | None = None
    lease: Lease | None = None
    while True:
        fetches = {key: store.fetch(key) for key in keys}
        if all(f.status == "found" for f in fetches.values()):
            return run.done("loaded", packages=_packages(fetches), fetches=fetches)
        for key, fetched in fetches.items():
            if fetched.status == "untrusted" and key not in reported_untrusted:
                reported_untrusted.add(key)
                run.event("untrusted", key, fetched.detail)
        unreachable = [f for f in fetches.values() if f.status in ("unreachable", "denied")]
        if unreachable:
            return run.done("unreachable", fetches=fetches, detail=unreachable[0].detail)
        if reported_untrusted and not rebuild_untrusted:
            return run.done("untrusted", fetches=fetches,
                            detail="; ".join(fetches[k].detail for k in sorted(reported_untrusted)))
        if store.read_only:
            return run.done("missing", fetches=fetches, detail="read-only store without these packages")
        if lease is None:  # one per call: it remembers what it saw of the holder between polls
            lease = store.lease(lease_key, ttl_s=lease_ttl_s, clock_skew_s=clock_skew_s)
        try:
            taken = lease.try_acquire()
        except StoreDenied as exc:
            return run.done("missing", fetches=fetches, detail=f"cannot take the build lease: {exc}")
        except StoreError as exc:
            return run.done("unreachable", fetches=fetches, detail=f"build lease: {exc}")
        if taken:
            return _build(run, store, lease, build, fetches)
        holder = lease.holder()
        who = holder.split(" until ", 1)[0]  # a renewal moves the expiry, not the holder
        if who != last_holder:
            last_holder = who
            run.event("waiting", lease_key, holder)
        if not wait:
            return run.done("busy", fetches=fetches, detail=holder)
        if run.waited_from is None:
            run.waited_from = time.monotonic()
        if time.monotonic() - run.started >= wait_s:
            return run.done("timeout", fetches=fetches,
                            detail=f"no packages after {wait_s:g} s of waiting ({holder})")
        time.sleep(min(poll_s, max(0.0, wait_s - (time.monotonic() - run.started))))


def _check_times(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0 or (value == 0 and name in ("poll_s", "lease_ttl_s")):
            raise InvalidOptions(f"{name} must be a finite number of seconds (> 0), got {value!r}")


def _packages(fetches: Mapping[str, Fetched]) -> dict[str, Package]:
    return {key: f.package for key, f in fetches.items() if f.package is not None}


def _build(
    run: _Run, store: PackageStore, lease: Any, build: Callable[[], Sequence[NewPackage]],
    fetches: dict[str, Fetched],
) -> Obtained:
    try:
        again = {key: store.fetch(key) for key in run.keys}
        if all(f.status == "found" for f in again.values()):
            return run.done("loaded", packages=_packages(again), fetches=again)
        if run.waited_from is not None:
            run.event("took_over", lease.key, "the previous holder's lease ended without packages")
        try:
            made = list(build())
        except Exception as exc:  # the caller's build: returned, for the caller to audit
            return run.done("failed", fetches=fetches, detail=f"build failed: {type(exc).__name__}",
                            error=exc)
        publishes: dict[str, Published] = {}
        packages: dict[str, Package] = {}
        for new in made:
            published = store.publish(new.key, new.files, new.meta)
            publishes[new.key] = published
            manifest = published.manifest or Manifest(new.key, {}, dict(new.meta))
            packages[new.key] = Package(new.key, manifest, dict(new.files))
            if published.status != "published":
                run.event(published.status, new.key, f"not published: {published.detail}")
        if lease.lost:
            run.event("lease_lost", lease.key, "another replica took the lease over during the build")
        missing = [key for key in run.keys if key not in packages]
        detail = f"the build made no package for {missing}" if missing else ""
        return run.done("built" if not missing else "failed", packages=packages, fetches=fetches,
                        publishes=publishes, detail=detail)
    finally:
        lease.release()


__all__ = ["NewPackage", "obtain"]
