"""Package keys, manifests and files: what a package was built for, found without loading it."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._inductor import config as inductor_config

from adapters.aot.bounds import CallSpec
from adapters.aot.errors import Status
from adapters.aot.kinds import _check_device, _device_of, _digest, _qualname, block_kind, block_kinds
from adapters.errors import InvalidOptions

FORMAT_VERSION = 1
PACKAGE_SUFFIX = ".pt2"
MANIFEST_SUFFIX = ".json"
# Weights stay out of the package: every block binds its own tensors at load.
FIXED_INDUCTOR_OPTIONS: dict[str, Any] = {"aot_inductor.package_constants_in_so": False}


def _package_version(module_name: str) -> str | None:
    top = module_name.split(".", 1)[0]
    try:
        return metadata.version(top)
    except metadata.PackageNotFoundError:
        return None


def _code_digest(block: nn.Module) -> str:
    """The source of every class the block runs (submodules and attention processors), plus the
    versions of the packages that define them: helpers outside the classes change with those."""
    classes: dict[str, type] = {}
    for sub in block.modules():
        classes[_qualname(type(sub))] = type(sub)
        processor = getattr(sub, "processor", None)
        if processor is not None:
            classes[_qualname(type(processor))] = type(processor)
    parts = []
    for name in sorted(classes):
        try:
            source = inspect.getsource(classes[name])
        except (OSError, TypeError):
            source = ""
        parts.append([name, hashlib.sha256(source.encode()).hexdigest(),
                      _package_version(classes[name].__module__)])
    return _digest(parts)


def _cpu_flags() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return _digest(sorted(line.split(":", 1)[1].split()), 16)
    except OSError:
        pass
    return None


def device_description(device: torch.device) -> dict[str, Any]:
    """What compiled code depends on: the GPU model and its compute capability, or the CPU's vector
    ISA (code built for AVX-512 dies with SIGILL on a CPU without it)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {"type": "cuda", "name": props.name, "capability": [props.major, props.minor],
                "cuda": torch.version.cuda}
    if device.type == "cpu":
        # ATen's capability and the CPU's flags, not inductor's ISA pick: that compiles probe programs,
        # seconds that a restart on a fresh machine should not pay.
        return {"type": "cpu", "capability": torch.backends.cpu.get_cpu_capability(),
                "flags": _cpu_flags(), "machine": platform.machine()}
    _check_device(device)
    return {"type": device.type}


def host_fingerprint(device: torch.device) -> str:
    """Where a package check passed: this device, this torch, this Python, this OS."""
    return _digest([device_description(device), torch.__version__, sys.version_info[:2],
                    platform.system(), platform.machine(), platform.libc_ver()], 16)


def inductor_configs(compile_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Inductor configs for AOT from ``torch.compile``-style options: ``mode`` expands as torch
    expands it (CUDA graphs dropped: an AOT package does not capture them), ``options`` are inductor
    configs; ``fullgraph``/``dynamic`` have no meaning here. Any backend but inductor is refused."""
    options = dict(compile_options or {})
    backend = options.pop("backend", "inductor")
    if backend != "inductor":
        raise InvalidOptions(
            f"ahead-of-time compile uses inductor; backend {backend!r} cannot build a package"
        )
    configs: dict[str, Any] = {}
    mode = options.pop("mode", None)
    if mode not in (None, "default"):
        import torch._inductor as inductor

        configs.update(inductor.list_mode_options(mode))
    extra = options.pop("options", None) or {}
    if not isinstance(extra, Mapping):
        raise InvalidOptions("compile option 'options' must be a mapping of inductor configs")
    configs.update(extra)
    for ignored in ("fullgraph", "dynamic", "regional"):
        options.pop(ignored, None)
    if options:
        raise InvalidOptions(f"compile options {sorted(options)} have no ahead-of-time meaning")
    configs.pop("triton.cudagraphs", None)
    if sys.platform.startswith("linux") and hasattr(inductor_config.aot_inductor, "custom_op_libs"):
        # One C++ runtime per process: the package's library is meant to use the shared libstdc++
        # that libtorch uses. On the lent H100 (torch 2.11+cu130, g++ 13.3) libraries came out
        # without it (libstdc++'s own code inside the .so), and the model's constructor died in
        # std::regex on the other copy's locale facets. Naming it among the libraries links the
        # shared one first; where it is linked anyway (here) nothing changes. Not yet seen working
        # there: the child-process check still decides.
        libs = list(configs.get("aot_inductor.custom_op_libs") or [])
        configs["aot_inductor.custom_op_libs"] = [*libs, *([] if "stdc++" in libs else ["stdc++"])]
    for name, value in FIXED_INDUCTOR_OPTIONS.items():
        if configs.get(name, value) != value:
            raise InvalidOptions(f"{name} must stay {value!r}: packages leave the weights out")
    return {**configs, **FIXED_INDUCTOR_OPTIONS}


def package_key(
    block: nn.Module, *, inductor_options: Mapping[str, Any] | None = None, plan_token: str = ""
) -> str:
    """The package's key: block kind, its code, torch, device, inductor options, format, plan token."""
    device = _device_of(block)
    _check_device(device)
    return _digest([
        FORMAT_VERSION, block_kind(block), _code_digest(block), torch.__version__,
        device_description(device), inductor_configs({"options": dict(inductor_options or {})}),
        plan_token,
    ])


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class PackageInfo:
    """A package on disk and its manifest (what it was built for, its digest, where it was checked)."""

    kind: str
    key: str
    path: Path
    manifest: Mapping[str, Any]

    @property
    def spec(self) -> CallSpec:
        return CallSpec.from_json(self.manifest["spec"])

    @property
    def sha256(self) -> str:
        return str(self.manifest["sha256"])

    @property
    def verified_on(self) -> str | None:
        value = self.manifest.get("verified_on")
        return None if value is None else str(value)

    @property
    def manifest_path(self) -> Path:
        return self.path.with_suffix(MANIFEST_SUFFIX)


@dataclass(frozen=True)
class PackageStatus:
    """What ``open_packages`` found for one kind: ``ok`` (usable; ``verified_here`` says whether its
    check passed on this host), ``missing``, ``stale`` (built for another key or bounds) or ``corrupt``
    (manifest unreadable, digest mismatch, not a package archive)."""

    kind: str
    status: Status
    key: str
    info: PackageInfo | None = None
    reason: str = ""
    verified_here: bool = False


def _file_stem(kind: str, key: str) -> str:
    return f"{kind}.{key[:20]}"


def _read_manifest(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("manifest is not a JSON object")
    return data


def _validate(info: PackageInfo) -> str | None:
    """Why the package on disk must not be loaded (None when it may)."""
    if info.manifest.get("format") != FORMAT_VERSION:
        return f"format {info.manifest.get('format')!r}, this build reads {FORMAT_VERSION}"
    if not info.path.is_file():
        return f"{info.path.name} is missing"
    if info.path.stat().st_size != info.manifest.get("bytes"):
        size, recorded = info.path.stat().st_size, info.manifest.get("bytes")
        return f"{info.path.name} has {size} bytes, its manifest says {recorded}"
    if _file_sha256(info.path) != info.sha256:
        return f"{info.path.name} does not match its SHA-256"
    if not zipfile.is_zipfile(info.path):
        return f"{info.path.name} is not a package archive"
    return None


def open_packages(
    module: nn.Module,
    package_dir: str | os.PathLike[str],
    *,
    inductor_options: Mapping[str, Any] | None = None,
    plan_token: str = "",
    specs: Mapping[str, CallSpec] | None = None,
) -> dict[str, PackageStatus]:
    """Find the packages for every block kind of ``module`` in ``package_dir`` without loading any.

    Reads the manifests and checks each package's size and SHA-256. ``specs`` (from ``plan_bounds``
    over this process's captured calls), when given, must equal what the package was built for,
    else ``stale``.
    """
    directory = Path(package_dir)
    here: dict[str, str] = {}
    found: dict[str, PackageStatus] = {}
    for kind, blocks in block_kinds(module).items():
        key = package_key(blocks[0], inductor_options=inductor_options, plan_token=plan_token)
        device = _device_of(blocks[0])
        if device.type not in here:
            here[device.type] = host_fingerprint(device)
        stem = _file_stem(kind, key)
        manifest_path = directory / f"{stem}{MANIFEST_SUFFIX}"
        if not manifest_path.exists():
            others = sorted(p.name for p in directory.glob(f"{kind}.*{MANIFEST_SUFFIX}"))
            if others:
                found[kind] = PackageStatus(
                    kind, "stale", key, reason=f"only packages for other keys: {others}"
                )
            else:
                found[kind] = PackageStatus(kind, "missing", key, reason=f"no {manifest_path.name}")
            continue
        try:
            manifest = _read_manifest(manifest_path)
            info = PackageInfo(kind, key, directory / f"{stem}{PACKAGE_SUFFIX}", manifest)
            problem = _validate(info)
            spec = info.spec
        except (OSError, ValueError, KeyError, TypeError) as error:
            found[kind] = PackageStatus(kind, "corrupt", key, reason=f"{type(error).__name__}: {error}")
            continue
        if problem is not None:
            found[kind] = PackageStatus(kind, "corrupt", key, info, problem)
        elif manifest.get("key") != key or manifest.get("kind") != kind:
            found[kind] = PackageStatus(kind, "stale", key, info, "manifest names another key")
        elif specs is not None and kind in specs and specs[kind] != spec:
            found[kind] = PackageStatus(kind, "stale", key, info, "built for other bounds")
        else:
            found[kind] = PackageStatus(kind, "ok", key, info,
                                        verified_here=info.verified_on == here[device.type])
    return found


