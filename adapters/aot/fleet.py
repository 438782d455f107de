"""Ahead-of-time packages through an artifact store shared by a fleet (``adapters.store``):
load them when some replica (or a CI job) built them, else build them once, under the key's
lease, while the other replicas wait; never load a package whose bytes or signed manifest do not
verify.

``obtain_packages`` returns what the compiler binds and what the audit records:

- ``loaded``: the store had every kind's package (verified by the store: size, SHA-256, and the
  manifest's signature when a key is set). A package never checked on this host is checked in a
  child process first; the pass is remembered in the node's cache (never in the store's manifest:
  it may be signed, or on a read-only volume).
- ``compiled``, store ``built``: this replica held the lease, built, checked and published.
- ``compiled``, store ``unreachable``/``timeout``/``missing``/``untrusted``: the store could not
  serve (no answer, another replica's build took longer than ``build_wait_s``, a read-only store
  without them, a refused package not rebuilt): built into a private folder, nothing published.
- None (fall back to just in time): the build itself failed, with the reason; or, when the
  caller will not wait (``wait=False``), ``busy``: another replica holds the lease (the caller
  serves just in time and watches the store, ``adapters.aot.watch``).

Every package is built and checked in a private folder and published only when complete (blobs
first, the manifest last, in one write), so no replica ever sees half a package.
"""

from __future__ import annotations

import hashlib
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from adapters.aot.bounds import CallSpec
from adapters.aot.build import build
from adapters.aot.capture import BlockCall
from adapters.aot.check import CheckJob, check_packages
from adapters.aot.errors import AotError
from adapters.aot.kinds import _device_of, block_kinds
from adapters.aot.store import (
    FORMAT_VERSION,
    LocalFiles,
    PackageInfo,
    _file_stem,
    host_fingerprint,
    package_key,
)
from adapters.store import NewPackage, Obtained, Package, PackageStore, StoreEvent, obtain

# The lease's timing (object stores): renewed every ttl/3 while building; a holder that stops
# renewing is taken over after ``LEASE_TTL_S`` (+ clock skew). Module values, so a test can
# shorten them in its own process.
LEASE_TTL_S = 30.0
CLOCK_SKEW_S = 5.0
POLL_S = 0.5
PACKAGE_FILE = "package"


class AotBuildRejected(AotError):
    """A build finished but some package failed its check: nothing is published."""


@dataclass
class FleetResult:
    """``outcome``: ``loaded``/``compiled`` (packages to bind) or the reason to fall back
    (``packages`` None); ``store``: what the store did (``Obtained.status``, or ``check failed``);
    ``fields``: the audit's ``aot_store*`` fields; ``events``: the store's events as dicts;
    ``found``: per kind, what the store held at first (``ok``, ``missing``, ``stale``: only other
    keys of this kind, ``corrupt``: refused as untrusted, ``unreachable``)."""

    outcome: str
    packages: dict[str, PackageInfo] | None
    store: str
    fields: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    found: dict[str, str] = field(default_factory=dict)


def stems_for(
    module: nn.Module, specs: Mapping[str, CallSpec], configs: Mapping[str, Any]
) -> dict[str, tuple[str, str]]:
    """Per block kind: (package key, store name)."""
    out: dict[str, tuple[str, str]] = {}
    for kind, blocks in block_kinds(module).items():
        key = package_key(blocks[0], configs=configs, spec=specs[kind])
        out[kind] = (key, _file_stem(kind, key))
    return out


def lease_key(stems: Mapping[str, tuple[str, str]]) -> str:
    """One lease for all the kinds one build makes."""
    names = sorted(stem for _, stem in stems.values())
    return "aot-" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:40]


def _usable(kind: str, key: str, spec: CallSpec, info: PackageInfo) -> str | None:
    """Why a verified package still must not be bound here (None when it may)."""
    meta = info.manifest
    if meta.get("format") != FORMAT_VERSION:
        return f"format {meta.get('format')!r}, this build reads {FORMAT_VERSION}"
    if meta.get("key") != key or meta.get("kind") != kind:
        return "manifest names another key"
    try:
        if info.spec != spec:
            return "built for other bounds"
    except (KeyError, TypeError, ValueError) as error:
        return f"manifest unreadable ({type(error).__name__})"
    if not zipfile.is_zipfile(info.path):
        return f"{kind}: not a package archive"
    return None


def _check_mark(device_fingerprint: str) -> str:
    return f"checked-{device_fingerprint}"


def obtain_packages(
    store: PackageStore,
    module: nn.Module,
    calls: Mapping[str, Sequence[BlockCall]],
    specs: Mapping[str, CallSpec],
    configs: Mapping[str, Any],
    *,
    scratch: Path,
    wait_s: float,
    on_event: Callable[[StoreEvent], None] | None = None,
    wait: bool = True,
) -> FleetResult:
    """Load this module's packages from ``store`` or build them once in the fleet (module
    docstring). ``scratch`` is a private folder the caller keeps while the packages are bound;
    ``on_event`` hears the store's events as they happen (they are in the result too)."""
    stems = stems_for(module, specs, configs)
    kind_of = {stem: kind for kind, (_, stem) in stems.items()}

    def make() -> list[NewPackage]:
        folder = scratch / f"build-{uuid.uuid4().hex[:8]}"
        built = build(module, calls, LocalFiles(folder), configs=configs, specs=specs)
        if not built.complete:
            rejected = "; ".join(f"{kind}: check {check.outcome} {check.detail}".strip()
                                 for kind, check in built.rejected.items())
            raise AotBuildRejected(rejected or "incomplete build")
        return [NewPackage(stems[kind][1], {PACKAGE_FILE: info.path}, dict(info.manifest))
                for kind, info in built.packages.items()]

    obtained = obtain(
        store, sorted(kind_of), make, lease_key=lease_key(stems), wait_s=wait_s, poll_s=POLL_S,
        lease_ttl_s=LEASE_TTL_S, clock_skew_s=CLOCK_SKEW_S, on_event=on_event, wait=wait,
    )
    fields = _fields(obtained)
    events = [event.as_dict() for event in obtained.events]
    found = _found(store, stems, obtained)
    result = _settle(store, module, calls, specs, configs, scratch, stems, obtained, fields, events)
    result.found = found
    if result.store == "untrusted" and obtained.status == "loaded":
        result.found = {kind: "check failed" for kind in found}
    return result


_FOUND = {"found": "ok", "missing": "missing", "untrusted": "corrupt", "unreachable": "unreachable",
          "denied": "unreachable"}


def _found(store: PackageStore, stems: Mapping[str, tuple[str, str]], obtained: Obtained) -> dict[str, str]:
    untrusted = {event.key for event in obtained.events if event.status == "untrusted"}
    keys: tuple[str, ...] | None = None
    found: dict[str, str] = {}
    for kind, (_, stem) in stems.items():
        fetched = obtained.fetches.get(stem)
        status = "corrupt" if stem in untrusted else _FOUND.get(fetched.status, fetched.status) \
            if fetched is not None else "missing"
        if status == "missing":
            keys = store.keys() if keys is None else keys
            # Another key of this kind (this start's own publish is not one).
            if any(other.startswith(f"{kind}.") and other != stem for other in keys or ()):
                status = "stale"
        found[kind] = status
    return found


def _settle(
    store: PackageStore, module: nn.Module, calls: Mapping[str, Sequence[BlockCall]],
    specs: Mapping[str, CallSpec], configs: Mapping[str, Any], scratch: Path,
    stems: Mapping[str, tuple[str, str]], obtained: Obtained, fields: dict[str, Any],
    events: list[dict[str, Any]],
) -> FleetResult:
    kind_of = {stem: kind for kind, (_, stem) in stems.items()}
    if obtained.status == "busy":
        return FleetResult("busy", None, "busy", fields, events)
    if obtained.status in ("loaded", "built"):
        packages = {
            kind_of[stem]: package_info(kind_of[stem], stems[kind_of[stem]][0], package)
            for stem, package in obtained.packages.items()
        }
        if obtained.status == "built":
            return FleetResult("compiled", packages, "built", fields, events)
        problem = _check_loaded(store, module, calls, specs, packages, stems, fields)
        if problem is None:
            return FleetResult("loaded", packages, "loaded", fields, events)
        fields["aot_store_detail"] = problem
        events.append({"status": "untrusted", "key": lease_key(stems), "detail": problem,
                       "elapsed_s": round(obtained.seconds, 3)})
        store_status = "untrusted"
    elif obtained.status == "failed":
        error = obtained.error
        reason = f"{type(error).__name__}: {error}" if error is not None else obtained.detail
        return FleetResult(reason, None, "failed", fields, events)
    else:
        store_status = obtained.status
    # The store could not serve: this replica builds for itself, publishes nothing.
    built = build(module, calls, LocalFiles(scratch / f"local-{uuid.uuid4().hex[:8]}"),
                  configs=configs, specs=specs)
    if not built.complete:
        rejected = "; ".join(f"{kind}: check {check.outcome} {check.detail}".strip()
                             for kind, check in built.rejected.items())
        return FleetResult(rejected or "incomplete build", None, store_status, fields, events)
    return FleetResult("compiled", built.packages, store_status, fields, events)


def package_info(kind: str, key: str, package: Package) -> PackageInfo:
    """A verified store package as the compiler binds it."""
    return PackageInfo(kind, key, Path(package.files[PACKAGE_FILE]), dict(package.meta))


def _check_loaded(
    store: PackageStore, module: nn.Module, calls: Mapping[str, Sequence[BlockCall]],
    specs: Mapping[str, CallSpec], packages: dict[str, PackageInfo],
    stems: Mapping[str, tuple[str, str]], fields: dict[str, Any],
) -> str | None:
    blocks = {kind: blocks[0] for kind, blocks in block_kinds(module).items()}
    return check_fetched(store, blocks, {kind: calls[kind][0] for kind in packages}, specs, packages,
                         stems, fields)


def check_fetched(
    store: PackageStore, blocks: Mapping[str, nn.Module], calls: Mapping[str, BlockCall],
    specs: Mapping[str, CallSpec], packages: dict[str, PackageInfo],
    stems: Mapping[str, tuple[str, str]], fields: dict[str, Any],
    expected: Mapping[str, list[Any]] | None = None,
) -> str | None:
    """Bound-ready packages, or why not: usable here, and checked on this host (in a child
    process, once per node: the pass is marked in the node's cache). ``blocks``/``calls``: each
    kind's first block and a captured call of it; ``expected``: that call's eager outputs when
    the caller computed them already (then no block runs here)."""
    for kind, info in packages.items():
        problem = _usable(kind, stems[kind][0], specs[kind], info)
        if problem is not None:
            return f"{kind}: {problem}"
    unchecked: dict[str, PackageInfo] = {}
    for kind, info in packages.items():
        here = host_fingerprint(_device_of(blocks[kind]))
        if info.verified_on != here and not store.cache.marked(info.sha256, _check_mark(here)):
            unchecked[kind] = info
    if not unchecked:
        fields["aot_checked_here"] = False
        return None
    checks = check_packages([
        CheckJob(kind, info.path, blocks[kind], calls[kind], expected=(expected or {}).get(kind))
        for kind, info in unchecked.items()
    ])
    failed = {kind: check for kind, check in checks.items() if not check.ok}
    if failed:
        return "; ".join(f"{kind}: check {check.outcome} {check.detail}".strip()
                         for kind, check in failed.items())
    for kind, info in unchecked.items():
        try:
            store.cache.mark(info.sha256, _check_mark(host_fingerprint(_device_of(blocks[kind]))))
        except OSError:  # a node cache that cannot be written: checked again next start
            fields["aot_check_recorded"] = False
    fields["aot_checked_here"] = sorted(unchecked)
    return None


def _fields(obtained: Obtained) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "aot_store": obtained.status,
        "aot_store_events": [event.status for event in obtained.events],
        "aot_waited_s": round(obtained.waited_s, 3),
    }
    if obtained.detail:
        fields["aot_store_detail"] = obtained.detail
    if obtained.publishes:
        fields["aot_published"] = {key: p.status for key, p in obtained.publishes.items()}
    fetched = sum(f.fetched_bytes for f in obtained.fetches.values())
    if fetched:
        fields["aot_fetched_bytes"] = fetched
    return fields


__all__ = [
    "CLOCK_SKEW_S", "LEASE_TTL_S", "POLL_S", "AotBuildRejected", "FleetResult", "check_fetched",
    "lease_key", "obtain_packages", "package_info", "stems_for",
]
