"""Build: export each block kind once, AOTInductor-compile it without its weights, check it,
and save it with its manifest."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters import _torch_internals as internals
from adapters.aot.bounds import CallSpec, _dynamic_shapes, _guard_from_export, plan_bounds
from adapters.aot.capture import BlockCall
from adapters.aot.check import CheckJob, CheckResult, check_packages
from adapters.aot.errors import AotBuildFailed, AotUnsupported
from adapters.aot.kinds import _check_device, _constants, _device_of, _qualname, block_kinds
from adapters.aot.store import (
    FORMAT_VERSION,
    MANIFEST_SUFFIX,
    PACKAGE_SUFFIX,
    LocalFiles,
    PackageFiles,
    PackageInfo,
    _file_sha256,
    _file_stem,
    device_description,
    host_fingerprint,
    inductor_configs,
    package_key,
    scratch_directory,
    write_manifest,
)

# torch.export and AOTInductor keep process-wide state while they run (dynamo's and inductor's
# configs patched for the duration, fake-tensor modes): two at once in one process fail both and
# can leave torch.compile broken for the rest of it. One build at a time, process-wide.
BUILD_LOCK = threading.Lock()


@dataclass
class AotBuild:
    """What ``build`` did: the packages saved (checked, unless ``verify=False``), the checks, and
    the seconds spent per kind (export, compile, check)."""

    packages: dict[str, PackageInfo] = field(default_factory=dict)
    checks: dict[str, CheckResult] = field(default_factory=dict)
    specs: dict[str, CallSpec] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def rejected(self) -> dict[str, CheckResult]:
        return {kind: check for kind, check in self.checks.items() if not check.ok}

    @property
    def complete(self) -> bool:
        return not self.rejected and set(self.packages) == set(self.specs)


def _export(kind: str, block: nn.Module, call: BlockCall, spec: CallSpec) -> Any:
    try:
        with torch.no_grad():
            return torch.export.export(
                block, args=(), kwargs=call.kwargs, dynamic_shapes=_dynamic_shapes(call, spec), strict=False
            )
    except Exception as error:
        raise AotBuildFailed(kind, f"torch.export failed: {type(error).__name__}: {error}") from error


def _files(package_dir: str | os.PathLike[str] | PackageFiles) -> PackageFiles:
    if isinstance(package_dir, (str, os.PathLike)):
        return LocalFiles(package_dir)
    return package_dir


def build(
    module: nn.Module,
    calls: Mapping[str, Sequence[BlockCall]],
    package_dir: str | os.PathLike[str] | PackageFiles,
    *,
    inductor_options: Mapping[str, Any] | None = None,
    plan_token: str = "",
    configs: Mapping[str, Any] | None = None,
    specs: Mapping[str, CallSpec] | None = None,
    verify: bool = True,
    verify_timeout_s: float = 600.0,
) -> AotBuild:
    """Export each block kind once (``calls`` from ``capture_calls``; bounds from ``plan_bounds``,
    or ``specs`` when already planned), AOT-compile it without its weights (``configs`` from
    ``inductor_configs``, else ``inductor_options``), check it in a child process (``verify``),
    and save package and manifest. A package whose check fails is never saved and is reported in
    ``AotBuild.rejected``: nothing unchecked is left where a restart would load it. Packages are
    built in a private scratch directory; one build at a time per process (``BUILD_LOCK``).

    Raises ``AotBuildFailed`` (export or compile), ``AotUnsupported`` (device, signature, bounds),
    ``OSError`` (the store cannot be written).
    """
    files = _files(package_dir)
    files.ensure()
    final_configs = dict(configs) if configs is not None else inductor_configs(
        {"options": dict(inductor_options or {})})
    result = AotBuild()
    staged: list[tuple[str, Path, dict[str, Any], nn.Module, BlockCall]] = []
    kinds = block_kinds(module)
    scratch = scratch_directory()
    try:
        with BUILD_LOCK:
            for kind, blocks in kinds.items():
                kind_calls = calls.get(kind) or []
                if not kind_calls:
                    raise AotUnsupported(f"{kind}: no captured call (no run reached these blocks)")
                block = blocks[0]
                device = _device_of(block)
                _check_device(device)
                spec = specs[kind] if specs is not None and kind in specs else plan_bounds(kind_calls)
                result.specs[kind] = spec
                key = package_key(block, plan_token=plan_token, configs=final_configs, spec=spec)
                timings: dict[str, float] = {}
                started = time.perf_counter()
                ep = _export(kind, block, kind_calls[0], spec)
                timings["export_s"] = time.perf_counter() - started
                guard = _guard_from_export(kind, ep)
                stem = _file_stem(kind, key)
                staging = scratch / f"{stem}{PACKAGE_SUFFIX}"
                started = time.perf_counter()
                try:
                    internals.aoti_compile_and_package(ep, str(staging), final_configs)
                except Exception as error:
                    message = f"AOTInductor compile failed: {type(error).__name__}: {error}"
                    raise AotBuildFailed(kind, message) from error
                timings["compile_s"] = time.perf_counter() - started
                del ep
                constants = {name: [list(t.shape), str(t.dtype)] for name, t in _constants(block).items()}
                manifest = {
                    "format": FORMAT_VERSION,
                    "kind": kind,
                    "key": key,
                    "block_class": _qualname(type(block)),
                    "package": f"{stem}{PACKAGE_SUFFIX}",
                    "bytes": staging.stat().st_size,
                    "sha256": _file_sha256(staging),
                    "torch": torch.__version__,
                    "device": device_description(device),
                    "inductor_options": json.loads(json.dumps(final_configs, default=repr)),
                    "plan_token": plan_token,
                    "spec": spec.to_json(),
                    "guard": guard.to_json(),
                    "constants": constants,
                    "built_s": {name: round(value, 3) for name, value in timings.items()},
                    "verified_on": None,
                    "check": None,
                }
                result.seconds[kind] = timings
                staged.append((kind, staging, manifest, block, kind_calls[0]))
        if verify:
            started = time.perf_counter()
            checks = check_packages(
                [CheckJob(kind, staging, block, call) for kind, staging, _, block, call in staged],
                timeout_s=verify_timeout_s,
            )
            check_s = time.perf_counter() - started
            result.checks.update(checks)
        for kind, staging, manifest, block, _call in staged:
            if verify:
                check = result.checks[kind]
                result.seconds[kind]["check_s"] = check_s
                if not check.ok:
                    continue
                manifest["verified_on"] = host_fingerprint(_device_of(block))
                manifest["check"] = check.to_json()
            name = str(manifest["package"])
            files.write_atomic(name, staging)
            write_manifest(files, Path(name).with_suffix(MANIFEST_SUFFIX).name, manifest)
            result.packages[kind] = PackageInfo(kind, str(manifest["key"]), files.local_path(name), manifest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result
