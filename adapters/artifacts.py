"""Reusable compile artifacts: what torch compiled, saved at WarmedUp and loaded before the next
start's compile, so a restart or a new replica skips inductor's code generation.

Mechanism: ``torch.compiler.save_cache_artifacts()`` packs what this process's compiles put in
inductor's caches (FX graphs with their Triton kernels, AOTAutograd entries, autotuning and
dynamic-shape profiles) into bytes; ``load_cache_artifacts()`` writes them back into the local
caches, where the next compile finds them. Dynamo still traces on every start (that part is not
cached); inductor's work is what is skipped. It needs inductor with its FX graph cache on (the
default); other backends (``aot_eager``, ``eager``) leave nothing to save, reported as "empty".

Validity: a file is keyed by what decides whether its graphs fit: module class, config and
parameter layout, dtype, device kind (GPU model and architecture), torch / triton / python /
cache-dit versions, compile options, cache config and policy. Its header holds the whole key
and a checksum of the payload. On load a file is:

- ``loaded``: key and checksum match, torch accepted it;
- ``missing``: none for this key and none for this module class;
- ``stale``: none for this key, but one for this module class with another key (the report names
  the fields that differ, e.g. ``torch``), or a file whose header key or format differs;
- ``corrupt``: unreadable header (not JSON, nested past the reader's depth, a size that is no
  byte count), wrong checksum or length, a link to nothing, or torch refused the payload.

Stale and corrupt files are reported and ignored: the compile runs cold, as if there were no
file. Never a wrong result: besides our key, inductor's own cache keys (graph, input metadata,
config, versions) decide every hit, so a loaded entry that does not fit is simply never used.
``save_cache_artifacts`` covers every compile of the process so far, so with several compiled
modules in one process each file holds them all (harmless, a little larger).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters import _torch_internals as internals
from adapters.errors import InvalidOptions

FORMAT = 1
MAGIC = b"dit-lifecycle compile artifacts\n"
SUFFIX = ".dlart"
# Statuses whose audit event is a warning: something was there and could not be used or written.
PROBLEM_STATUSES = frozenset({"stale", "corrupt", "failed", "unreachable", "denied"})


def _jsonable(value: Any) -> Any:
    """A JSON-stable rendering of option values, configs and enums (callables by name)."""
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)  # exact, and NaN-safe
    if isinstance(value, torch.dtype):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "__type__": type(value).__qualname__,
            **{f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)},
        }
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__qualname__)
        return f"{getattr(value, '__module__', '?')}.{name}"
    return repr(value)


def _public_config(config: Mapping[str, Any]) -> Any:
    """A diffusers config without its bookkeeping keys (``_use_default_values`` is a list whose
    order changes from process to process; ``_name_or_path`` is where it was loaded from)."""
    return _jsonable({k: v for k, v in config.items() if not str(k).startswith("_")})


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def device_kind(module: nn.Module) -> str:
    """Where the module's parameters live, as far as compiled kernels care (GPU model and arch)."""
    tensor: torch.Tensor | None = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{torch.cuda.get_device_name(device)}:sm_{major}{minor}"
    return device.type


def _dtype(module: nn.Module) -> str | None:
    counts: dict[str, int] = {}
    for tensor in module.parameters():
        counts[str(tensor.dtype)] = counts.get(str(tensor.dtype), 0) + tensor.numel()
    return max(counts, key=counts.__getitem__) if counts else None


def _layout_digest(module: nn.Module) -> str:
    """Parameter and buffer names, shapes and dtypes (not values): the graphs depend on these.

    Sorted by name: cache-dit's per-call block patching re-registers the transformer's block
    lists, which moves them to the end of ``_modules`` and so reorders ``named_parameters()``.
    """
    digest = hashlib.sha256()
    entries = sorted(
        f"{name}:{tuple(tensor.shape)}:{tensor.dtype};"
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]
    )
    for entry in entries:
        digest.update(entry.encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class ArtifactKey:
    """Everything that decides whether saved graphs fit this compile."""

    label: str
    fields: Mapping[str, Any]

    @property
    def digest(self) -> str:
        text = json.dumps(self.fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def filename(self) -> str:
        return f"{self.label}-{self.digest[:24]}{SUFFIX}"


def build_key(
    module: nn.Module,
    *,
    compile_options: Mapping[str, Any],
    cache_config: Any = None,
    cache_version: str | None = None,
    policy: Mapping[str, Any] | None = None,
) -> ArtifactKey:
    config = getattr(module, "config", None)
    package = type(module).__module__.partition(".")[0]
    fields = {
        "format": FORMAT,
        "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "module_package": f"{package} {_version(package)}",
        "module_config": _public_config(config) if isinstance(config, Mapping) else None,
        "layout": _layout_digest(module),
        "dtype": _dtype(module),
        "device": device_kind(module),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "cache_dit": cache_version,
        "compile_options": _jsonable(dict(compile_options)),
        "cache_config": _jsonable(cache_config),
        "policy": _jsonable(policy),
    }
    return ArtifactKey(type(module).__name__, fields)


@dataclass(frozen=True)
class ArtifactReport:
    """One load or save, as the audit records it."""

    action: str  # "load" | "save"
    status: str  # load: loaded|missing|stale|corrupt|failed; save: saved|empty|failed
    path: str | None = None
    detail: str = ""
    size_bytes: int = 0
    differing_fields: tuple[str, ...] = field(default_factory=tuple)

    @property
    def problem(self) -> bool:
        return self.status in PROBLEM_STATUSES

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "status": self.status,
            "path": self.path,
            "detail": self.detail,
            "size_bytes": self.size_bytes,
            "differing_fields": list(self.differing_fields),
        }


def artifact_file(key: ArtifactKey, payload: bytes) -> bytes:
    """A file's bytes: magic, a JSON header (the whole key, the payload's size and SHA-256), payload."""
    header = {
        "format": FORMAT,
        "key": dict(key.fields),
        "digest": key.digest,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


class _Unreadable(Exception):
    """A file that is not a well-formed artifact file (reported as corrupt)."""


def _cut(value: object, limit: int = 60) -> str:
    """``value`` for a report's detail, at most ``limit`` characters (headers hold anything)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _read_file(path: Path) -> tuple[dict[str, Any], bytes]:
    """Header and verified payload of an artifact file; ``_Unreadable`` if it is not one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _Unreadable(f"cannot read: {exc}") from exc
    if not data.startswith(MAGIC):
        raise _Unreadable("not a dit-lifecycle artifact file (bad magic)")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise _Unreadable("truncated header")
    try:
        header = json.loads(data[len(MAGIC):end])
        expected_size = header["payload_bytes"]
        expected_sha = str(header["payload_sha256"])
        if isinstance(expected_size, bool) or not isinstance(expected_size, int) or expected_size < 0:
            raise TypeError(f"payload_bytes is not a byte count: {_cut(expected_size)}")
        if not isinstance(header["key"], dict):
            raise TypeError("key is not an object")
    # A header is anyone's bytes: JSON nested past the reader's depth is a RecursionError.
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise _Unreadable(f"unreadable header ({type(exc).__name__}: {_cut(exc)})") from exc
    payload = data[end + 1:]
    if len(payload) != expected_size:
        raise _Unreadable(
            f"payload is {len(payload)} bytes, header says {_cut(expected_size)} (truncated?)"
        )
    if hashlib.sha256(payload).hexdigest() != expected_sha:
        raise _Unreadable("payload checksum mismatch")
    return header, payload


def _differing(mine: Mapping[str, Any], theirs: Mapping[str, Any], prefix: str = "") -> tuple[str, ...]:
    """Names of the fields that differ; nested objects (configs) name their inner fields."""
    names: list[str] = []
    for k in sorted(set(mine) | set(theirs)):
        a, b = mine.get(k), theirs.get(k)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping) and not prefix:
            names.extend(_differing(a, b, f"{k}.") or (k,))
        else:
            names.append(f"{prefix}{k}")
    return tuple(names)


class ArtifactStore:
    """A directory of artifact files, one per key. Loads and saves never raise: they report."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        # Path("") is the working directory: an unset environment variable would scatter
        # artifacts wherever the process happens to start.
        if os.fspath(directory) == "":
            raise InvalidOptions(
                "the compile-artifact directory is an empty path (an unset environment variable?); "
                "pass a directory path (artifact_dir=...), or None to keep no compile artifacts"
            )
        self.directory = Path(directory)

    def path_for(self, key: ArtifactKey) -> Path:
        return self.directory / key.filename

    # ------------------------------------------------------------------ bytes on disk
    def write(self, key: ArtifactKey, payload: bytes) -> ArtifactReport:
        """Write ``payload`` under ``key`` atomically (a reader never sees half a file)."""
        path = self.path_for(key)
        blob = artifact_file(key, payload)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=SUFFIX)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(blob)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            return ArtifactReport("save", "failed", str(path), f"cannot write: {exc}")
        return ArtifactReport("save", "saved", str(path), "", len(payload))

    def read(self, key: ArtifactKey) -> tuple[ArtifactReport, bytes | None]:
        """Find and verify the file for ``key`` (no torch involved)."""
        path = self.path_for(key)
        try:
            present, linked = path.exists(), path.is_symlink()
        except OSError as exc:
            return ArtifactReport("load", "corrupt", str(path), f"cannot look at it: {exc}"), None
        if not present:
            if linked:  # a link whose target is gone (or a loop): there, but unreadable
                return ArtifactReport("load", "corrupt", str(path), "a link to nothing readable"), None
            return self._absent(key), None
        try:
            header, payload = _read_file(path)
        except _Unreadable as exc:
            return ArtifactReport("load", "corrupt", str(path), str(exc)), None
        if header.get("format") != FORMAT or header["key"] != dict(key.fields):
            fields = _differing(key.fields, header["key"])
            return ArtifactReport(
                "load", "stale", str(path), f"saved for another configuration ({', '.join(fields)})",
                differing_fields=fields,
            ), None
        return ArtifactReport("load", "loaded", str(path), "", len(payload)), payload

    def _absent(self, key: ArtifactKey) -> ArtifactReport:
        """No file for this key: stale if one exists for the same class with another key."""
        for other in self._others(key.label):
            try:
                header, _ = _read_file(other)
            except _Unreadable:
                continue
            fields = _differing(key.fields, header["key"])
            return ArtifactReport(
                "load", "stale", str(other),
                f"only artifacts for another configuration ({', '.join(fields)}); compiling cold",
                differing_fields=fields,
            )
        return ArtifactReport("load", "missing", None, "no artifacts for this configuration yet")

    def _others(self, label: str) -> list[Path]:
        """This module class's files, newest first. One that cannot be looked at (a link to
        nothing, a file removed meanwhile) is left out, like an unreadable one."""
        dated: list[tuple[float, Path]] = []
        try:
            if not self.directory.is_dir():
                return []
            for path in self.directory.glob(f"{label}-*{SUFFIX}"):
                try:
                    dated.append((path.stat().st_mtime, path))
                except OSError:
                    continue
        except OSError:
            return []
        return [path for _, path in sorted(dated, reverse=True)]

    # ------------------------------------------------------------------ torch's caches
    def load(self, key: ArtifactKey) -> ArtifactReport:
        """Put the saved artifacts for ``key`` into torch's caches, before compiling."""
        report, payload = self.read(key)
        if payload is None:
            return report
        try:
            info = torch.compiler.load_cache_artifacts(payload)
        except Exception as exc:  # torch's deserialisers raise many types; none may crash us
            return dataclasses.replace(
                report, status="corrupt", detail=f"torch refused it ({type(exc).__name__}: {exc})"
            )
        if info is None:
            return dataclasses.replace(
                report, status="corrupt", detail="torch could not deserialise it"
            )
        return dataclasses.replace(report, detail=_describe(info))

    def save(self, key: ArtifactKey) -> ArtifactReport:
        """Save what this process compiled so far under ``key``."""
        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception as exc:
            return ArtifactReport("save", "failed", None, f"torch could not pack them ({exc})")
        if saved is None or not saved[0]:
            return ArtifactReport(
                "save", "empty", None,
                "nothing to save: only inductor with its FX graph cache on leaves artifacts",
            )
        payload, info = saved
        report = self.write(key, payload)
        return dataclasses.replace(report, detail=report.detail or _describe(info))


def _describe(info: Any) -> str:
    artifacts = getattr(info, "artifacts", None) or {}
    return ", ".join(f"{kind}: {len(entries)}" for kind, entries in sorted(artifacts.items()))


def inductor_cache_misses() -> int:
    """Graphs inductor compiled from scratch in this process (its FX graph cache's misses)."""
    return internals.fxgraph_cache_misses()
