"""Build: export each block kind once, AOTInductor-compile it without its weights, check it,
and save it with its manifest."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.aot.bounds import CallSpec, _dynamic_shapes, _guard_from_export, plan_bounds
from adapters.aot.capture import BlockCall
from adapters.aot.check import CheckJob, CheckResult, check_packages
from adapters.aot.errors import AotBuildFailed, AotUnsupported
from adapters.aot.kinds import _check_device, _constants, _device_of, _qualname, block_kinds
from adapters.aot.store import (
    FORMAT_VERSION,
    MANIFEST_SUFFIX,
    PACKAGE_SUFFIX,
    PackageInfo,
    _file_sha256,
    _file_stem,
    device_description,
    host_fingerprint,
    inductor_configs,
    package_key,
)


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


def build(
    module: nn.Module,
    calls: Mapping[str, Sequence[BlockCall]],
    package_dir: str | os.PathLike[str],
    *,
    inductor_options: Mapping[str, Any] | None = None,
    plan_token: str = "",
    verify: bool = True,
    verify_timeout_s: float = 600.0,
) -> AotBuild:
    """Export each block kind once (``calls`` from ``capture_calls``; bounds from ``plan_bounds``),
    AOT-compile it into ``package_dir`` without its weights, check it in a child process
    (``verify``), and save the manifest. A package whose check fails is deleted and reported in
    ``AotBuild.rejected``: nothing unchecked is left where a restart would load it.

    Raises ``AotBuildFailed`` (export or compile), ``AotUnsupported`` (device, signature, bounds).
    """
    directory = Path(package_dir)
    directory.mkdir(parents=True, exist_ok=True)
    configs = inductor_configs({"options": dict(inductor_options or {})})
    result = AotBuild()
    staged: list[tuple[str, Path, dict[str, Any], nn.Module, BlockCall]] = []
    kinds = block_kinds(module)
    for kind, blocks in kinds.items():
        kind_calls = calls.get(kind) or []
        if not kind_calls:
            raise AotUnsupported(f"{kind}: no captured call (no run reached these blocks)")
        block = blocks[0]
        device = _device_of(block)
        _check_device(device)
        spec = plan_bounds(kind_calls)
        result.specs[kind] = spec
        key = package_key(block, inductor_options=inductor_options, plan_token=plan_token)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        ep = _export(kind, block, kind_calls[0], spec)
        timings["export_s"] = time.perf_counter() - started
        guard = _guard_from_export(kind, ep)
        stem = _file_stem(kind, key)
        staging = directory / f".{stem}.{os.getpid()}.building{PACKAGE_SUFFIX}"
        started = time.perf_counter()
        try:
            torch._inductor.aoti_compile_and_package(
                ep, package_path=str(staging), inductor_configs=dict(configs)
            )
        except Exception as error:
            staging.unlink(missing_ok=True)
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
            "inductor_options": json.loads(json.dumps(configs, default=repr)),
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
                staging.unlink(missing_ok=True)
                continue
            manifest["verified_on"] = host_fingerprint(_device_of(block))
            manifest["check"] = check.to_json()
        final = directory / str(manifest["package"])
        os.replace(staging, final)
        manifest_path = final.with_suffix(MANIFEST_SUFFIX)
        partial = manifest_path.with_name(f".{manifest_path.name}.{os.getpid()}")
        partial.write_text(json.dumps(manifest, indent=1))
        os.replace(partial, manifest_path)  # the manifest last: a package without one is never read
        result.packages[kind] = PackageInfo(kind, str(manifest["key"]), final, manifest)
    return result


