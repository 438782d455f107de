"""Package keys, manifests and files: what a package was built for, found without loading it.

File I/O goes through ``PackageFiles`` (read bytes, write atomically, list, exists, a local path
for the native loader), so another store (a shared volume with leases, an object store) can stand
in for ``LocalFiles`` without touching the build or the lookup."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from adapters import _torch_internals as internals
from adapters.aot.bounds import CallSpec
from adapters.aot.errors import Status
from adapters.aot.kinds import _check_device, _device_of, _digest, _qualname, block_kind, block_kinds
from adapters.errors import InvalidOptions
from adapters.reproducible import INDUCTOR_SETTINGS

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


def inductor_configs(
    compile_options: Mapping[str, Any] | None = None, *, reproducible: bool = False
) -> dict[str, Any]:
    """Inductor configs for AOT from ``torch.compile``-style options: ``mode`` expands as torch
    expands it (CUDA graphs dropped: an AOT package does not capture them), ``options`` are inductor
    configs; ``fullgraph``/``dynamic`` have no meaning here; ``reproducible`` adds inductor's
    deterministic mode. Any backend but inductor, and any other option, is refused."""
    options = dict(compile_options or {})
    backend = options.pop("backend", "inductor")
    if backend != "inductor":
        raise InvalidOptions(
            f"ahead-of-time compile uses inductor; backend {backend!r} cannot build a package"
        )
    configs: dict[str, Any] = {}
    mode = options.pop("mode", None)
    if mode not in (None, "default"):
        configs.update(internals.inductor_mode_options(str(mode)))
    extra = options.pop("options", None) or {}
    if not isinstance(extra, Mapping):
        raise InvalidOptions("compile option 'options' must be a mapping of inductor configs")
    configs.update(extra)
    for ignored in ("fullgraph", "dynamic", "regional"):
        options.pop(ignored, None)
    if options.get("disable") is False:
        options.pop("disable")
    known = {key: value for key, value in options.items() if value is not None}
    if known:
        raise InvalidOptions(
            f"compile options {sorted(known)} have no ahead-of-time meaning: drop them, or use "
            "CompilePlan(scope='blocks') (just in time)"
        )
    configs.pop("triton.cudagraphs", None)
    if sys.platform.startswith("linux") and internals.inductor_has_config("aot_inductor.custom_op_libs"):
        # One C++ runtime per process: the package's library is meant to use the shared libstdc++
        # that libtorch uses; libraries built without it have died in std::regex on the other
        # copy's locale facets. Naming it links the shared one first; the child-process check
        # still decides.
        libs = list(configs.get("aot_inductor.custom_op_libs") or [])
        configs["aot_inductor.custom_op_libs"] = [*libs, *([] if "stdc++" in libs else ["stdc++"])]
    for name, value in FIXED_INDUCTOR_OPTIONS.items():
        if configs.get(name, value) != value:
            raise InvalidOptions(
                f"compile option options[{name!r}] must stay {value!r}: ahead-of-time packages leave "
                "the weights out (every block binds its own); drop it"
            )
    if reproducible:
        for name, value in INDUCTOR_SETTINGS.items():
            if configs.get(name, value) != value:
                raise InvalidOptions(
                    f"compile options contradict the plan: reproducible=True sets inductor {name}="
                    f"{value!r}, but options[{name!r}] is {configs[name]!r}; drop one"
                )
        configs.update(INDUCTOR_SETTINGS)
    return {**configs, **FIXED_INDUCTOR_OPTIONS}


def spec_digest(spec: CallSpec) -> str:
    """The bounds a package was built for, as part of its key."""
    return _digest(spec.to_json(), 16)


def attention_backends() -> dict[str, bool]:
    """Which scaled-dot-product attention backends torch may choose now: its process-wide flags
    (what ``torch.nn.attention.sdpa_kernel`` sets). Export bakes the op it chose into the package,
    so packages exported under other flags are other packages."""
    flags: Any = torch.backends.cuda  # its getters carry no annotations
    return {"flash": bool(flags.flash_sdp_enabled()), "efficient": bool(flags.mem_efficient_sdp_enabled()),
            "math": bool(flags.math_sdp_enabled()), "cudnn": bool(flags.cudnn_sdp_enabled())}


def package_key(
    block: nn.Module,
    *,
    inductor_options: Mapping[str, Any] | None = None,
    plan_token: str = "",
    configs: Mapping[str, Any] | None = None,
    spec: CallSpec | None = None,
) -> str:
    """The package's key: block kind (its weights layout and the plain attributes its forward may
    read), its code, torch, device, inductor configs (``configs`` as ``inductor_configs`` made
    them, else from ``inductor_options``), the attention backends allowed, format, the bounds
    (``spec``) and a plan token."""
    device = _device_of(block)
    _check_device(device)
    if configs is None:
        configs = inductor_configs({"options": dict(inductor_options or {})})
    return _digest([
        FORMAT_VERSION, block_kind(block), _code_digest(block), torch.__version__,
        device_description(device), json.loads(json.dumps(dict(configs), sort_keys=True, default=repr)),
        None if spec is None else spec_digest(spec), plan_token, attention_backends(),
    ])


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- files
class PackageFiles(Protocol):
    """Where packages and manifests live, by name: the only file I/O of a store."""

    def read_bytes(self, name: str) -> bytes: ...

    def write_atomic(self, name: str, data: bytes | Path) -> None:
        """Replace ``name`` with ``data`` (bytes, or a file to copy) all at once."""
        ...

    def list(self, pattern: str) -> list[str]: ...

    def exists(self, name: str) -> bool: ...

    def local_path(self, name: str) -> Path:
        """A local file holding ``name`` (the native loader opens files only)."""
        ...

    def ensure(self) -> None:
        """Make the store usable (a directory created); raises ``OSError`` when it cannot be."""
        ...


class LocalFiles:
    """Packages in one local directory. Writes go to a uniquely named staging file beside the
    target and are renamed over it, so a reader never sees half a file and two writers (two
    containers sharing a volume, each PID 1) never share a staging file."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def ensure(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.directory.is_dir():
            raise NotADirectoryError(f"{self.directory} is not a directory")

    def read_bytes(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def write_atomic(self, name: str, data: bytes | Path) -> None:
        staging = self.directory / f".{name}.{uuid.uuid4().hex}.partial"
        try:
            if isinstance(data, Path):
                shutil.copyfile(data, staging)
            else:
                staging.write_bytes(data)
            os.replace(staging, self.directory / name)
        finally:
            staging.unlink(missing_ok=True)

    def list(self, pattern: str) -> list[str]:
        return sorted(path.name for path in self.directory.glob(pattern))

    def exists(self, name: str) -> bool:
        return (self.directory / name).exists()

    def local_path(self, name: str) -> Path:
        return self.directory / name


def scratch_directory() -> Path:
    """A private local directory to build in (the caller removes it)."""
    return Path(tempfile.mkdtemp(prefix="dit-lifecycle-aot-build-"))


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
    def manifest_name(self) -> str:
        return self.path.with_suffix(MANIFEST_SUFFIX).name

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


def _parse_manifest(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
    except RecursionError as error:  # a manifest nested deeper than the parser goes
        raise ValueError("manifest is nested too deeply") from error
    if not isinstance(parsed, dict):
        raise ValueError("manifest is not a JSON object")
    return parsed


def write_manifest(files: PackageFiles, name: str, manifest: Mapping[str, Any]) -> None:
    """The manifest, written atomically (last: a package without one is never read)."""
    files.write_atomic(name, json.dumps(dict(manifest), indent=1).encode())


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


def _any_spec(files: PackageFiles, kind: str) -> tuple[CallSpec | None, str]:
    """The bounds of the first readable manifest of ``kind``, or None and why none was read
    (an empty reason: there is no manifest of this kind)."""
    try:
        names = files.list(f"{kind}.*{MANIFEST_SUFFIX}")
    except OSError as error:
        return None, f"{type(error).__name__}: {error}"
    problem = ""
    for name in names:
        try:
            return CallSpec.from_json(_parse_manifest(files.read_bytes(name))["spec"]), ""
        except (OSError, ValueError, KeyError, TypeError) as error:
            problem = f"{name}: {type(error).__name__}: {error}"
    return None, problem


def open_packages(
    module: nn.Module,
    package_dir: str | os.PathLike[str] | PackageFiles,
    *,
    inductor_options: Mapping[str, Any] | None = None,
    plan_token: str = "",
    specs: Mapping[str, CallSpec] | None = None,
    configs: Mapping[str, Any] | None = None,
) -> dict[str, PackageStatus]:
    """Find the packages for every block kind of ``module`` without loading any.

    Reads the manifests and checks each package's size and SHA-256. Without ``specs``, a kind's
    packages are found whatever bounds they were built for. ``specs`` (from ``plan_bounds``
    over this process's captured calls) are part of the key: packages for other bounds are
    ``stale`` (and kept: another deployment's bounds never overwrite these).
    """
    files = package_dir if isinstance(package_dir, LocalFiles) or not isinstance(
        package_dir, (str, os.PathLike)) else LocalFiles(package_dir)
    here: dict[str, str] = {}
    found: dict[str, PackageStatus] = {}
    for kind, blocks in block_kinds(module).items():
        spec = None if specs is None else specs.get(kind)
        unreadable = ""
        if spec is None:
            # No bounds given: the packages of this kind for whichever bounds they were built.
            spec, unreadable = _any_spec(files, kind)
        key = package_key(blocks[0], inductor_options=inductor_options, plan_token=plan_token,
                          configs=configs, spec=spec)
        if unreadable:
            found[kind] = PackageStatus(kind, "corrupt", key, reason=unreadable)
            continue
        device = _device_of(blocks[0])
        if device.type not in here:
            here[device.type] = host_fingerprint(device)
        stem = _file_stem(kind, key)
        manifest_name = f"{stem}{MANIFEST_SUFFIX}"
        try:
            if not files.exists(manifest_name):
                others = files.list(f"{kind}.*{MANIFEST_SUFFIX}")
                if others:
                    found[kind] = PackageStatus(
                        kind, "stale", key, reason=f"only packages for other keys or bounds: {others}"
                    )
                else:
                    found[kind] = PackageStatus(kind, "missing", key, reason=f"no {manifest_name}")
                continue
            manifest = _parse_manifest(files.read_bytes(manifest_name))
            info = PackageInfo(kind, key, files.local_path(f"{stem}{PACKAGE_SUFFIX}"), manifest)
            problem = _validate(info)
            built_for = info.spec
        except (OSError, ValueError, KeyError, TypeError) as error:
            found[kind] = PackageStatus(kind, "corrupt", key, reason=f"{type(error).__name__}: {error}")
            continue
        if problem is not None:
            found[kind] = PackageStatus(kind, "corrupt", key, info, problem)
        elif manifest.get("key") != key or manifest.get("kind") != kind:
            found[kind] = PackageStatus(kind, "stale", key, info, "manifest names another key")
        elif spec is not None and spec != built_for:
            found[kind] = PackageStatus(kind, "stale", key, info, "built for other bounds")
        else:
            found[kind] = PackageStatus(kind, "ok", key, info,
                                        verified_here=info.verified_on == here[device.type])
    return found
