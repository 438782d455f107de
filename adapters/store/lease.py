"""A build lease per key: while one replica builds, the others wait for what it publishes.

- A local folder or shared volume: an OS file lock (``filelock``'s flock-based lock, never its
  "soft" fallback, which a killed process would leave behind) on ``leases/<key>.lock``. The kernel
  (or the NFS server, after its lease period) drops the lock when the holder dies, so the next
  replica takes over at once.
- An object store: lease objects ``leases/<key>/<generation>.json`` holding the owner and an
  expiry. Taking the lease is an exclusive create (``If-None-Match: *``) of the generation after
  the newest one, so of replicas racing for it exactly one wins; the newest generation is the
  lease. The holder renews its object from a thread (every ``ttl_s / 3``) and marks it released
  when done. A generation is taken over only when the newest one is released, past its expiry
  (plus ``clock_skew_s``), or seen unchanged for ``ttl_s`` by the waiter's own clock (a holder that
  stopped renewing, whatever the clocks say). Older generations are deleted by the next holder;
  the newest is never deleted, so "the newest" never moves back.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from adapters.store.errors import ObjectMissing, StoreDenied, StoreError, StoreUnavailable
from adapters.store.objects import Objects

LEASES = "leases"
_GENERATION_DIGITS = 12


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease(Protocol):
    key: str
    owner: str

    def try_acquire(self) -> bool:
        """Take the lease if it is free (never blocks); raises the store's errors."""
        ...

    def holder(self) -> str:
        """Who holds it, as far as this replica can tell (for the ``waiting`` event)."""
        ...

    @property
    def lost(self) -> bool:
        """True once another replica took over while this one held it."""
        ...

    def release(self) -> None:
        """Give it back (best effort; never raises)."""
        ...


class FileLease:
    """An OS file lock on a local or shared folder."""

    def __init__(self, root: Path, key: str) -> None:
        from filelock import UnixFileLock

        self.key = key
        self.owner = owner_id()
        self.path = root / LEASES / f"{key}.lock"
        self._lock = UnixFileLock(str(self.path), thread_local=False)

    def try_acquire(self) -> bool:
        from filelock import Timeout

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(blocking=False)
        except Timeout:
            return False
        except PermissionError as exc:
            raise StoreDenied(f"{self.path}: {exc}") from exc
        except OSError as exc:
            if exc.errno in (30,):  # EROFS
                raise StoreDenied(f"{self.path}: {exc}") from exc
            raise StoreUnavailable(f"{self.path}: {type(exc).__name__}: {exc}") from exc
        return True

    def holder(self) -> str:
        return f"another process holds {self.path}"

    @property
    def lost(self) -> bool:
        return False

    def release(self) -> None:
        try:
            self._lock.release()
        except Exception:  # the lock goes with the process anyway
            pass


class ObjectLease:
    """Generation objects on an object store (see the module docstring)."""

    def __init__(
        self, objects: Objects, key: str, *, ttl_s: float, clock_skew_s: float = 5.0,
        clock: Any = time.time,
    ) -> None:
        self.key = key
        self.owner = owner_id()
        self.objects = objects
        self.ttl_s = ttl_s
        self.clock_skew_s = clock_skew_s
        self._clock = clock
        self.folder = f"{LEASES}/{key}"
        self.generation: int | None = None
        self._renewals = 0
        self._seen: tuple[str, float] | None = None  # (object text, monotonic time first seen)
        self._holder = "unknown"
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.renew_errors = 0

    def _name(self, generation: int) -> str:
        return f"{self.folder}/{generation:0{_GENERATION_DIGITS}d}.json"

    def _generations(self) -> list[int]:
        found = []
        for name in self.objects.list(self.folder):
            stem, _, suffix = name.partition(".")
            if suffix == "json" and stem.isdigit():
                found.append(int(stem))
        return sorted(found)

    def _document(self, released: bool = False) -> bytes:
        return json.dumps({
            "key": self.key, "owner": self.owner, "generation": self.generation,
            "expires_at": self._clock() + self.ttl_s, "ttl_s": self.ttl_s,
            "renewals": self._renewals, "released": released,
        }, sort_keys=True).encode()

    def _free(self, text: bytes) -> bool:
        """Whether the newest generation (its object's bytes) may be taken over."""
        try:
            document = json.loads(text)
            released = bool(document.get("released"))
            expires_at = float(document["expires_at"])
            self._holder = f"{document.get('owner')} until {expires_at:.1f}"
        except (ValueError, KeyError, TypeError):
            return True  # not a lease object: nobody can renew it
        if released or self._clock() > expires_at + self.clock_skew_s:
            return True
        snapshot = text.decode(errors="replace")
        now = time.monotonic()
        if self._seen is None or self._seen[0] != snapshot:
            self._seen = (snapshot, now)
            return False
        return now - self._seen[1] > self.ttl_s

    def try_acquire(self) -> bool:
        generations = self._generations()
        target = 0
        if generations:
            newest = generations[-1]
            try:
                text = self.objects.read(self._name(newest), 1 << 16)
            except ObjectMissing:
                text = b""  # deleted by an operator: free
            if text and not self._free(text):
                return False
            target = newest + 1
        self.generation = target
        self._renewals = 0
        if not self.objects.create(self._name(target), self._document()):
            self.generation = None
            return False
        self._seen = None
        for old in generations:
            try:
                self.objects.delete(self._name(old))
            except StoreError:
                pass
        self._stop.clear()
        self._lost.clear()
        self._thread = threading.Thread(
            target=self._renew, name=f"dit-lifecycle-lease-{self.key[:24]}", daemon=True
        )
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if self._generations()[-1:] != [self.generation]:
                    self._lost.set()  # someone took over (or removed ours): stop claiming it
                    return
                self._renewals += 1
                assert self.generation is not None
                self.objects.publish_bytes(self._name(self.generation), self._document())
            except StoreError:
                self.renew_errors += 1  # keep trying; if it expires meanwhile, another takes over

    def holder(self) -> str:
        return self._holder

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.generation is None:
            return
        try:
            if not self.lost:
                self.objects.publish_bytes(self._name(self.generation), self._document(released=True))
        except StoreError:
            pass  # it expires by itself
        self.generation = None


__all__ = ["LEASES", "FileLease", "Lease", "ObjectLease", "owner_id"]
