"""Ahead-of-time compiled blocks ("regional AOT"): export each kind of repeated block once, compile
it with AOTInductor into a weight-free package, and run every block of that kind through it with the
block's own weights. No dynamo and no inductor run at load time: a restart loads packages.

How it fits under cache-dit (read from cache-dit 1.5.3's source, checked by tests/test_aot.py):

- cache-dit's ``CachedBlocks`` wrappers keep the original block objects and call them as
  ``block(hidden_states, encoder_hidden_states, *args, **kwargs)``. ``nn.Module.__call__`` runs
  ``_compiled_call_impl`` when it is set (that is the slot ``block.compile()`` fills), so binding
  puts the AOT call there: every call through a wrapper, Fn, middle or Bn, runs the package, the
  wrappers' per-step decision stays eager, and clearing the slot restores eager exactly. The slot
  skips the block's own forward hooks, so a block with hooks is refused rather than run without them.
- Blocks are grouped by *kind*: class plus the names, shapes and dtypes of their weights and the
  classes of their submodules and attention processors (a class whose last block has other weights,
  as SD3's ``context_pre_only`` block, is two kinds). One export per kind; flags that change the
  forward without changing any weight are not seen.
- The example inputs are captured from real calls (a forward pre-hook on every block, the first call
  of each kind per run kept), so the export sees the signature cache-dit's wrappers use. Arguments
  are normalised against the forward's signature, so positional and keyword calls are one call.
- Dimensions that differ between the captured runs (one run per declared size) are exported dynamic
  within [smallest, largest] with ``Dim.AUTO``, which lets export infer relations (Flux: the rotary
  length is image tokens + text tokens); with one run everything is static.
- Packages leave the weights out (``aot_inductor.package_constants_in_so=False``): a few MB per kind
  instead of hundreds. One loaded package holds one set of constants, so each block gets its own load
  (the first costs about a second, later ones milliseconds) and ``load_constants(...,
  user_managed=True)`` binds the block's tensors without a copy. An in-place weight change is
  therefore seen at once; a tensor *replaced* (``p.data = ...``, a new Parameter, a LoRA fuse) is
  noticed at the block's next call, by identity and data pointer, and re-bound before it runs.
- Every call is checked against what the package was compiled for (argument structure, non-tensor
  values, dtypes, device, and the exported symbolic sizes, relations included); anything else runs
  the block eagerly and counts a miss, optionally reported to ``on_miss``. Never a wrong result.
- Loading native code can kill a process (a segmentation fault on the lent H100 with torch 2.11, for
  every package built with its default ``CXX``, a g++ that links libstdc++ statically; packages
  built with the distribution's g++ load there). ``check_packages`` therefore loads and runs
  packages in a child process first (``adapters/aot_check.py``); ``build`` saves only packages
  that passed, and the manifest records on which host they passed, so a restart on that host can
  skip the check.
- Package files are named by a key over the block kind's code and weights layout, torch version,
  device (and CPU vector ISA), inductor options, format version and the caller's plan token (the
  declared bounds); a manifest beside each records a SHA-256 of the package. A package for another
  key is ``stale``, one that fails its digest or manifest is ``corrupt``; neither is ever loaded.
- NPU is not supported: AOTInductor builds CPU and CUDA code only.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import weakref
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch._inductor import config as inductor_config
from torch.utils import _pytree as pytree

from adapters import _torch_internals as internals
from adapters.errors import AdapterError, InvalidOptions
from adapters.regional import repeated_blocks

FORMAT_VERSION = 1
SUPPORTED_DEVICES = ("cpu", "cuda")
PACKAGE_SUFFIX = ".pt2"
MANIFEST_SUFFIX = ".json"
# Weights stay out of the package: every block binds its own tensors at load.
FIXED_INDUCTOR_OPTIONS: dict[str, Any] = {"aot_inductor.package_constants_in_so": False}
CHECK_SCRIPT = Path(__file__).with_name("aot_check.py")

Status = Literal["ok", "missing", "stale", "corrupt"]
Outcome = Literal["passed", "mismatch", "error", "crashed", "timeout", "not_run"]


# ---------------------------------------------------------------------------------------- errors
class AotError(AdapterError):
    """Base class of ahead-of-time compile errors."""


class AotUnsupported(AotError):
    """This module, device or call cannot be compiled ahead of time (the message says why)."""


class AotBuildFailed(AotError):
    """Export or AOTInductor compile of one block kind failed; ``kind`` names it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class AotPackageError(AotError):
    """A package cannot be used: ``status`` is ``missing``, ``stale`` or ``corrupt``."""

    def __init__(self, kind: str, status: Status, message: str) -> None:
        super().__init__(f"{kind}: package {status}: {message}")
        self.kind = kind
        self.status = status


class AotBindError(AotError):
    """Binding failed; every block was left (or put back) eager."""


# ---------------------------------------------------------------------------------- block kinds
def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _structure(block: nn.Module) -> list[Any]:
    """What makes two blocks of one class one kind: weights layout and submodule/processor classes."""
    tensors = [
        [name, list(t.shape), str(t.dtype)]
        for name, t in [*block.named_parameters(remove_duplicate=False),
                        *block.named_buffers(remove_duplicate=False)]
    ]
    classes = []
    for name, sub in block.named_modules(remove_duplicate=False):
        processor = getattr(sub, "processor", None)
        classes.append([name, _qualname(type(sub)),
                        None if processor is None else _qualname(type(processor))])
    return [_qualname(type(block)), block.training, tensors, classes]


def _digest(value: Any, length: int = 64) -> str:
    text = json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def block_kind(block: nn.Module) -> str:
    """``ClassName-<12 hex>``: one export serves every block of one kind."""
    return f"{type(block).__name__}-{_digest(_structure(block), 12)}"


def block_kinds(module: nn.Module) -> dict[str, list[nn.Module]]:
    """The repeated blocks of ``module`` (as regional compilation finds them), grouped by kind."""
    kinds: dict[str, list[nn.Module]] = {}
    for block in repeated_blocks(module):
        kinds.setdefault(block_kind(block), []).append(block)
    return kinds


def _device_of(block: nn.Module) -> torch.device:
    for tensor in [*block.parameters(), *block.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _check_device(device: torch.device) -> None:
    if device.type not in SUPPORTED_DEVICES:
        raise AotUnsupported(
            f"ahead-of-time compiled blocks run on {', '.join(SUPPORTED_DEVICES)} only (AOTInductor "
            f"builds no {device.type} code); this module is on {device}: use the just-in-time plan"
        )


# ---------------------------------------------------------------------------------------- calls
_SIGNATURES: dict[type, inspect.Signature] = {}


def _signature(block: nn.Module) -> inspect.Signature:
    cls = type(block)
    if cls not in _SIGNATURES:
        sig = inspect.signature(cls.forward)
        params = list(sig.parameters.values())[1:]  # drop self
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
            raise AotUnsupported(
                f"{cls.__name__}.forward takes *args: its calls cannot be matched to one exported "
                "signature"
            )
        _SIGNATURES[cls] = sig.replace(parameters=params)
    return _SIGNATURES[cls]


def normalize_call(block: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The call as keyword arguments in the forward's order, defaults filled in (``**kwargs`` entries
    last, by name): positional and keyword calls of one block become one structure."""
    sig = _signature(block)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            extra.update(value)
        else:
            out[name] = value
    for name in sorted(extra):
        out[name] = extra[name]
    return out


@dataclass
class BlockCall:
    """One captured call of a block: normalised keyword arguments, tensors cloned and contiguous."""

    kwargs: dict[str, Any]

    def leaves(self) -> list[Any]:
        return list(pytree.tree_leaves(((), self.kwargs)))

    def to(self, device: torch.device) -> BlockCall:
        return BlockCall(pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), self.kwargs))


def _eager(block: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """The block's own eager call (hooks and forward), whatever its call slot holds."""
    call_impl: Callable[..., Any] = internals.eager_call(block)
    return call_impl(*args, **kwargs)


def _snapshot(value: Any) -> Any:
    return pytree.tree_map_only(
        torch.Tensor, lambda t: t.detach().clone(memory_format=torch.contiguous_format), value
    )


def capture_calls(module: nn.Module, runs: Iterable[Callable[[], object]]) -> dict[str, list[BlockCall]]:
    """Run each of ``runs`` (one eager call of ``module`` per declared size, e.g. through cache-dit's
    mounted forward) and keep the first call of each block kind in each run.

    Returns ``{kind: [BlockCall per run that reached that kind]}``. The hooks are removed afterwards,
    also when a run raises. Run under ``torch.no_grad()``/``inference_mode()`` as serving would.
    """
    kinds = block_kinds(module)
    if not kinds:
        raise AotUnsupported(
            f"{type(module).__name__} has no repeated blocks (no diffusers `_repeated_blocks`, no "
            "nn.ModuleList of identical blocks): nothing to compile ahead of time"
        )
    captured: dict[str, list[BlockCall]] = {kind: [] for kind in kinds}
    seen: set[str] = set()
    handles = []

    def hook_for(kind: str) -> Callable[..., None]:
        def hook(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if kind not in seen:
                seen.add(kind)
                captured[kind].append(BlockCall(_snapshot(normalize_call(block, args, kwargs))))

        return hook

    try:
        for kind, blocks in kinds.items():
            for block in blocks:
                handles.append(block.register_forward_pre_hook(hook_for(kind), with_kwargs=True))
        for run in runs:
            seen.clear()
            run()
    finally:
        for handle in handles:
            handle.remove()
    return captured


# --------------------------------------------------------------------------------------- bounds
@dataclass(frozen=True)
class TensorSpec:
    """One tensor argument: its size per dim, static (int) or dynamic ``(min, max)``; the example
    size the export was hinted with; its dtype."""

    path: str
    sizes: tuple[int | tuple[int, int], ...]
    example: tuple[int, ...]
    dtype: str

    @property
    def dynamic_dims(self) -> tuple[int, ...]:
        return tuple(i for i, size in enumerate(self.sizes) if isinstance(size, tuple))


@dataclass(frozen=True)
class CallSpec:
    """The bounds of one block kind's calls: argument structure, tensors, non-tensor values."""

    treespec: str
    tensors: tuple[TensorSpec, ...]
    constants: tuple[tuple[int, Any], ...]  # (leaf index, value) of every non-tensor leaf

    @property
    def dynamic(self) -> bool:
        return any(t.dynamic_dims for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "treespec": self.treespec,
            "tensors": [
                {"path": t.path, "sizes": [list(s) if isinstance(s, tuple) else s for s in t.sizes],
                 "example": list(t.example), "dtype": t.dtype}
                for t in self.tensors
            ],
            "constants": [[index, value] for index, value in self.constants],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CallSpec:
        return cls(
            treespec=str(data["treespec"]),
            tensors=tuple(
                TensorSpec(
                    path=str(t["path"]),
                    sizes=tuple(tuple(s) if isinstance(s, list) else int(s) for s in t["sizes"]),
                    example=tuple(int(s) for s in t["example"]),
                    dtype=str(t["dtype"]),
                )
                for t in data["tensors"]
            ),
            constants=tuple((int(i), v) for i, v in data["constants"]),
        )


_PLAIN = (bool, int, float, str, type(None))


def _leaf_paths(kwargs: Mapping[str, Any]) -> list[str]:
    flat, _ = pytree.tree_flatten_with_path(((), dict(kwargs)))
    return [pytree.keystr(path[1:]).lstrip(".").replace("['", "").replace("']", "") for path, _ in flat]


def plan_bounds(calls: Sequence[BlockCall]) -> CallSpec:
    """Which dims are dynamic: those whose sizes differ between ``calls`` (one per declared size),
    bounded by the smallest and largest seen; with one call (or equal sizes) all are static. The
    first call is the export's example. Raises ``AotUnsupported`` if the calls cannot share one export
    (another structure, dtype, rank or non-tensor value)."""
    if not calls:
        raise AotUnsupported("no captured call: run the module once before planning bounds")
    first = calls[0]
    leaves, spec = pytree.tree_flatten(((), first.kwargs))
    paths = _leaf_paths(first.kwargs)
    constants: list[tuple[int, Any]] = []
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            if not isinstance(leaf, _PLAIN):
                raise AotUnsupported(
                    f"argument {paths[index]} is a {type(leaf).__name__}: only tensors and plain values "
                    "(None, bool, int, float, str) can be matched against an exported block"
                )
            constants.append((index, leaf))
    seen_sizes: dict[int, list[tuple[int, ...]]] = {
        i: [] for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)
    }
    for call in calls:
        other, other_spec = pytree.tree_flatten(((), call.kwargs))
        if other_spec != spec:
            raise AotUnsupported("the captured calls differ in argument structure: no single export fits")
        for index, (a, b) in enumerate(zip(leaves, other, strict=True)):
            if isinstance(a, torch.Tensor):
                if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.dim() != b.dim():
                    raise AotUnsupported(f"argument {paths[index]} changes dtype or rank between calls")
                seen_sizes[index].append(tuple(b.shape))
            elif type(a) is not type(b) or a != b:
                raise AotUnsupported(f"argument {paths[index]} changes value between calls ({a!r}, {b!r})")
    tensors = []
    for index, sizes in seen_sizes.items():
        leaf = leaves[index]
        dims: list[int | tuple[int, int]] = []
        for d in range(leaf.dim()):
            values = {s[d] for s in sizes}
            dims.append(values.pop() if len(values) == 1 else (min(values), max(values)))
        tensors.append(TensorSpec(paths[index], tuple(dims), tuple(leaf.shape), str(leaf.dtype)))
    return CallSpec(pytree.treespec_dumps(spec), tuple(tensors), tuple(constants))


def _dynamic_shapes(call: BlockCall, spec: CallSpec) -> dict[str, Any]:
    by_leaf = iter(spec.tensors)

    def one(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return None
        tensor_spec = next(by_leaf)
        dims = {
            d: torch.export.Dim.AUTO(min=size[0], max=size[1])
            for d, size in enumerate(tensor_spec.sizes) if isinstance(size, tuple)
        }
        return dims or None

    leaves, treespec = pytree.tree_flatten(call.kwargs)
    shapes: dict[str, Any] = pytree.tree_unflatten([one(leaf) for leaf in leaves], treespec)
    return shapes


# ---------------------------------------------------------------------------------------- guard
@dataclass(frozen=True)
class _Guard:
    """The exported sizes, as the compiled code assumes them: per tensor and dim a static size, a
    symbol (bound by the first dim that has it, then range-checked) or a linear relation of symbols."""

    static: tuple[tuple[int, int, int], ...]  # (tensor, dim, size)
    symbols: tuple[tuple[int, int, str], ...]  # (tensor, dim, name)
    ranges: tuple[tuple[str, int, int | None], ...]  # (name, min, max or None)
    linear: tuple[tuple[int, int, int, tuple[tuple[str, int], ...]], ...]  # (tensor, dim, c, terms)
    ranks: tuple[int, ...]

    def check(self, shapes: Sequence[torch.Size]) -> bool:
        if len(shapes) != len(self.ranks) or any(
            len(s) != r for s, r in zip(shapes, self.ranks, strict=True)
        ):
            return False
        for t, d, size in self.static:
            if shapes[t][d] != size:
                return False
        env: dict[str, int] = {}
        for t, d, name in self.symbols:
            value = int(shapes[t][d])
            if env.setdefault(name, value) != value:
                return False
        for name, low, high in self.ranges:
            value = env[name]
            if value < low or (high is not None and value > high):
                return False
        for t, d, const, terms in self.linear:
            if shapes[t][d] != const + sum(coeff * env[name] for name, coeff in terms):
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "static": [list(x) for x in self.static],
            "symbols": [list(x) for x in self.symbols],
            "ranges": [list(x) for x in self.ranges],
            "linear": [[t, d, c, [list(term) for term in terms]] for t, d, c, terms in self.linear],
            "ranks": list(self.ranks),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _Guard:
        return cls(
            static=tuple((int(t), int(d), int(s)) for t, d, s in data["static"]),
            symbols=tuple((int(t), int(d), str(n)) for t, d, n in data["symbols"]),
            ranges=tuple((str(n), int(lo), None if hi is None else int(hi)) for n, lo, hi in data["ranges"]),
            linear=tuple(
                (int(t), int(d), int(c), tuple((str(n), int(k)) for n, k in terms))
                for t, d, c, terms in data["linear"]
            ),
            ranks=tuple(int(r) for r in data["ranks"]),
        )


def _guard_from_export(kind: str, ep: Any) -> _Guard:
    nodes = {node.name: node for node in ep.graph.nodes if node.op == "placeholder"}
    tensor_shapes: list[Any] = []
    for input_spec in ep.graph_signature.input_specs:
        if input_spec.kind.name != "USER_INPUT" or type(input_spec.arg).__name__ != "TensorArgument":
            continue
        tensor_shapes.append(nodes[input_spec.arg.name].meta["val"].shape)
    static, symbols, linear = [], [], []
    names: set[str] = set()
    for t, shape in enumerate(tensor_shapes):
        for d, size in enumerate(shape):
            if isinstance(size, int):
                static.append((t, d, size))
                continue
            expr = size.node.expr
            if expr.is_Symbol:
                symbols.append((t, d, str(expr)))
                names.add(str(expr))
                continue
            terms: list[tuple[str, int]] = []
            const = 0
            for term, coeff in expr.as_coefficients_dict().items():
                if not coeff.is_Integer:
                    raise AotBuildFailed(kind, f"exported size {expr} is not an integer relation")
                if term.is_Number:
                    const += int(coeff) * int(term)
                elif term.is_Symbol:
                    terms.append((str(term), int(coeff)))
                    names.add(str(term))
                else:
                    raise AotBuildFailed(
                        kind, f"exported size {expr} is not linear in the dynamic sizes: declare sizes "
                        "that keep this dim static, or use the just-in-time plan"
                    )
            linear.append((t, d, const, tuple(sorted(terms))))
    bound = {name for _, _, name in symbols}
    if not names <= bound:
        raise AotBuildFailed(kind, f"sizes {sorted(names - bound)} appear only inside relations")
    ranges = []
    for sym, value_range in ep.range_constraints.items():
        if getattr(sym, "is_Symbol", False) and str(sym) in bound:
            upper = value_range.upper
            high = int(upper) if getattr(upper, "is_finite", True) and math.isfinite(float(upper)) else None
            ranges.append((str(sym), int(value_range.lower), high))
    return _Guard(tuple(static), tuple(symbols), tuple(sorted(ranges)), tuple(linear),
                  tuple(len(shape) for shape in tensor_shapes))


# ------------------------------------------------------------------------------- keys, manifests
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


# ------------------------------------------------------------------------------------ the check
@dataclass(frozen=True)
class CheckResult:
    """One package's check in a child process. ``crashed`` carries the signal's name in ``detail``."""

    kind: str
    outcome: Outcome
    max_error: float | None = None
    tolerance: float = 0.0
    seconds: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "passed"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "outcome": self.outcome, "max_error": self.max_error,
                "tolerance": self.tolerance, "seconds": round(self.seconds, 3), "detail": self.detail}


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative to the output's largest magnitude: fused kernels round differently from eager."""
    return 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3


def _random_call(spec: CallSpec, device: torch.device, seed: int = 0) -> BlockCall:
    """Inputs at the export's example sizes, for a check where no call was captured (a restart)."""
    generator = torch.Generator().manual_seed(seed)
    treespec = pytree.treespec_loads(spec.treespec)
    constants = dict(spec.constants)
    tensors = iter(spec.tensors)
    leaves: list[Any] = []
    for index in range(treespec.num_leaves):
        if index in constants:
            leaves.append(constants[index])
            continue
        tensor_spec = next(tensors)
        dtype = getattr(torch, tensor_spec.dtype.removeprefix("torch."))
        if dtype.is_floating_point:
            value = torch.randn(tensor_spec.example, generator=generator).to(dtype)
        else:
            value = torch.zeros(tensor_spec.example, dtype=dtype)
        leaves.append(value.to(device))
    _, kwargs = pytree.tree_unflatten(leaves, treespec)
    return BlockCall(dict(kwargs))


# What a package that kills its loader most often is: seen on a machine whose ``CXX`` was a g++
# that links libstdc++ into the library statically, which then clashes with libtorch's. Inductor
# builds with ``$CXX`` (else ``g++``).
CRASH_HINT = (
    "a package that crashes its loader was most often linked with a static libstdc++ (its library "
    "has no NEEDED libstdc++.so); inductor builds with $CXX, else g++: build with a compiler that "
    "links it shared (e.g. CXX=/usr/bin/g++), then prepare again"
)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _run_check_process(
    command: Sequence[str], kinds: Sequence[str], tolerances: Sequence[float], timeout_s: float,
    cwd: str | None = None,
) -> list[CheckResult]:
    """Run a check process and turn what it printed (one JSON line per step) and how it ended into
    one result per kind: the kind it was loading or running when it died gets ``crashed`` (or
    ``timeout``), those after it ``not_run``."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            list(command), capture_output=True, text=True, timeout=timeout_s, cwd=cwd, check=False
        )
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
        ended: Outcome | None = None
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        code, ended = -1, "timeout"
    elapsed = time.perf_counter() - started
    done: dict[int, dict[str, Any]] = {}
    current: int | None = None
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or "index" not in record:
            continue
        current = int(record["index"])
        if record.get("stage") == "done":
            done[current] = record
    if ended is None and code < 0:
        ended = "crashed"
    if ended is not None and current is None:
        current = 0  # it died or hung before its first word: starting up, or loading the first
    tail = stderr.strip()[-1500:]
    results = []
    for index, kind in enumerate(kinds):
        record = done.get(index)
        if record is not None:
            said = record.get("outcome")
            outcome: Outcome = "passed" if said == "passed" else "mismatch" if said == "mismatch" else "error"
            results.append(CheckResult(
                kind, outcome,
                record.get("max_error"), tolerances[index], float(record.get("seconds", 0.0)),
                str(record.get("detail", "")),
            ))
        elif ended is not None and index == current:
            if ended == "crashed":
                detail = f"{_signal_name(code)}; {CRASH_HINT}"
            else:
                detail = f"no answer in {timeout_s:.0f} s"
            results.append(CheckResult(kind, ended, None, tolerances[index], elapsed,
                                       f"{detail}; stderr: {tail}" if tail else detail))
        elif ended is not None or code != 0:
            why = f"the check process ended with {_signal_name(code) if code < 0 else f'exit {code}'}"
            if ended == "timeout":
                why = f"the check process gave no answer in {timeout_s:.0f} s"
            results.append(CheckResult(kind, "not_run", None, tolerances[index], 0.0,
                                       f"{why} before this package; stderr: {tail}"))
        else:
            results.append(CheckResult(kind, "error", None, tolerances[index], 0.0,
                                       f"no result from the check process; stderr: {tail}"))
    return results


@dataclass(frozen=True)
class CheckJob:
    """One package to check: its file, the block whose weights it binds, a call, and the tolerance.
    ``expected`` (flat outputs) defaults to the block's eager output on ``call``."""

    kind: str
    package: Path
    block: nn.Module
    call: BlockCall
    tolerance: float | None = None
    expected: list[Any] | None = None


def check_packages(jobs: Sequence[CheckJob], *, timeout_s: float = 600.0) -> dict[str, CheckResult]:
    """Load and run each package in one short-lived child process and compare with eager.

    A crash, a hang or an exception in the child is a result (``crashed``/``timeout``/``error``),
    never a failure of this process. The weights and inputs travel through a private temporary file.
    """
    if not jobs:
        return {}
    records: list[dict[str, Any]] = []
    tolerances: list[float] = []
    for job in jobs:
        device = _device_of(job.block)
        _check_device(device)
        expected = job.expected
        if expected is None:
            with torch.no_grad():
                output = _eager(job.block, (), job.call.kwargs)
            expected = list(pytree.tree_leaves(output))
        dtype = next((t.dtype for t in job.block.parameters()), torch.float32)
        tolerance = job.tolerance if job.tolerance is not None else default_tolerance(dtype)
        tolerances.append(tolerance)
        records.append({
            "package": str(Path(job.package).resolve()),
            "device_index": -1 if device.type == "cpu" else (device.index or 0),
            "weights": {name: t.detach() for name, t in _constants(job.block).items()},
            "kwargs": job.call.kwargs,
            "expected": [t.detach() if isinstance(t, torch.Tensor) else t for t in expected],
            "tolerance": tolerance,
        })
    with tempfile.TemporaryDirectory(prefix="aot-check-") as scratch:
        jobs_path = Path(scratch) / "jobs.pt"
        torch.save(records, jobs_path)
        del records
        # By path, from a scratch directory: neither this package nor the caller's cwd is importable
        # there, so no module of ours shadows one that torch imports.
        launcher = (
            "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
        )
        command = [sys.executable, "-c", launcher, str(CHECK_SCRIPT), str(jobs_path)]
        results = _run_check_process(command, [job.kind for job in jobs], tolerances, timeout_s, cwd=scratch)
    return {result.kind: result for result in results}


# ---------------------------------------------------------------------------------------- build
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


def _constants(block: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the exported block reads as a constant: parameters and all buffers."""
    tensors: dict[str, torch.Tensor] = dict(block.named_parameters(remove_duplicate=False))
    tensors.update(block.named_buffers(remove_duplicate=False))
    return tensors


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


def verify_packages(
    module: nn.Module,
    packages: Mapping[str, PackageInfo],
    *,
    calls: Mapping[str, BlockCall] | None = None,
    timeout_s: float = 600.0,
    record: bool = True,
) -> dict[str, CheckResult]:
    """Check packages found by ``open_packages`` in a child process, with the first block of each
    kind's weights and a captured call (or random inputs at the export's example sizes). With
    ``record``, a pass is written into the manifest (this host), so the next restart here skips it."""
    kinds = block_kinds(module)
    jobs = []
    for kind, info in packages.items():
        block = kinds[kind][0]
        call = (calls or {}).get(kind) or _random_call(info.spec, _device_of(block))
        jobs.append(CheckJob(kind, info.path, block, call))
    results = check_packages(jobs, timeout_s=timeout_s)
    if record:
        for kind, check in results.items():
            if check.ok:
                info = packages[kind]
                manifest = dict(info.manifest)
                manifest["verified_on"] = host_fingerprint(_device_of(kinds[kind][0]))
                manifest["check"] = check.to_json()
                partial = info.manifest_path.with_name(f".{info.manifest_path.name}.{os.getpid()}")
                partial.write_text(json.dumps(manifest, indent=1))
                os.replace(partial, info.manifest_path)
    return results


# ----------------------------------------------------------------------------------------- bind
@dataclass
class AotStats:
    """Calls served by AOT code and misses (run eagerly) by reason, over every bound block."""

    calls: int = 0
    misses: Counter[str] = field(default_factory=Counter)
    rebinds: int = 0


def _flattener(spec: pytree.TreeSpec) -> Callable[[Any, list[Any]], bool]:
    """A flatten for one fixed structure: appends the leaves, answers whether the value has exactly
    that structure (dict keys, sequence lengths, container types). Faster than ``tree_flatten`` plus a
    spec comparison, which every block call would otherwise pay."""
    if spec.is_leaf():
        def leaf(value: Any, out: list[Any]) -> bool:
            out.append(value)
            return True

        return leaf
    children = [_flattener(child) for child in spec.children_specs]
    kind = spec.type
    if kind is dict:
        keys = list(spec.context)

        def flat_dict(value: Any, out: list[Any]) -> bool:
            if type(value) is not dict or len(value) != len(keys):
                return False
            return all(
                key in value and child(value[key], out) for key, child in zip(keys, children, strict=True)
            )

        return flat_dict
    if kind in (tuple, list):
        def flat_sequence(value: Any, out: list[Any]) -> bool:
            if type(value) is not kind or len(value) != len(children):
                return False
            return all(child(item, out) for item, child in zip(value, children, strict=True))

        return flat_sequence

    def general(value: Any, out: list[Any]) -> bool:
        leaves, found = pytree.tree_flatten(value)
        out.extend(leaves)
        return bool(found == spec)

    return general


def load_package(path: Path, device_index: int) -> Any:
    """Load one package: the loader class itself, as ``aoti_load_package`` does after its first try.
    That first try (``load_pt2``) reads the device's description, which on a CPU compiles inductor's
    ISA probe programs: seconds on a fresh machine (about 50 on the lent H100) before any load."""
    loader_class = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader_class is None:
        return torch._inductor.aoti_load_package(str(path), device_index=device_index).loader
    return loader_class(str(path), "model", False, 1, device_index)


class _AotCall:
    """What a bound block's ``_compiled_call_impl`` holds: check the call, run the package."""

    def __init__(
        self, block: nn.Module, kind: str, loader: Any, spec: CallSpec, guard: _Guard, stats: AotStats,
        on_miss: Callable[[nn.Module, str], None] | None,
    ) -> None:
        self.block_ref = weakref.ref(block)
        self.kind = kind
        self.loader = loader
        self.device = _device_of(block)
        self.spec = spec
        self.guard = guard
        self.stats = stats
        self.on_miss = on_miss
        self.signature = _signature(block)
        params = self.signature.parameters.values()
        self.names = tuple(p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD)
        self.positional = tuple(p.name for p in params if p.kind in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
        self.keyword_only = frozenset(
            p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY
        )
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        in_spec, out_spec = self.loader.get_call_spec()
        self.in_spec = pytree.treespec_loads(in_spec)
        self.out_spec = pytree.treespec_loads(out_spec)
        self.flatten = _flattener(self.in_spec)
        children = self.out_spec.children_specs
        self.flat_tuple_out = self.out_spec.type is tuple and all(c.is_leaf() for c in children)
        self.constants = dict(spec.constants)
        self.dtypes = tuple(getattr(torch, t.dtype.removeprefix("torch.")) for t in spec.tensors)
        self.bound: list[tuple[dict[str, Any], str, torch.Tensor, int]] = []
        self.keep: list[Any] = []

    # Constants: which tensors the runner reads, by pointer; held here so none is freed under it.
    def bind_constants(self) -> None:
        block = self.block_ref()
        assert block is not None
        tensors = _constants(block)
        wanted = self.loader.get_constant_fqns()
        missing = [name for name in wanted if name not in tensors]
        if missing:
            raise AotBindError(f"{self.kind}: the package reads constants the block lacks: {missing[:5]}")
        constants = {name: tensors[name] for name in wanted}
        for name, tensor in constants.items():
            if tensor.device != self.device or not tensor.is_contiguous():
                raise AotBindError(f"{self.kind}: weight {name} is not a contiguous tensor on {self.device}")
        # (map, use_inactive, check_full_update, user_managed): bind the tensors themselves, no copy.
        self.loader.load_constants(constants, False, True, True)
        entries: list[tuple[dict[str, Any], str, torch.Tensor, int]] = []
        owners = dict(block.named_modules(remove_duplicate=False))
        for name, tensor in constants.items():
            owner_name, _, attr = name.rpartition(".")
            owner = owners[owner_name]
            slots = owner._parameters if attr in owner._parameters else owner._buffers
            entries.append((slots, attr, tensor, tensor.data_ptr()))
        self.bound = entries
        self.keep = [tensor.untyped_storage() for tensor in constants.values()]

    def constants_current(self) -> bool:
        return all(slots.get(attr) is tensor and tensor.data_ptr() == ptr
                   for slots, attr, tensor, ptr in self.bound)

    def _miss(self, reason: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.stats.misses[reason] += 1
        block = self.block_ref()
        assert block is not None
        if self.on_miss is not None:
            self.on_miss(block, reason)
        return _eager(block, args, kwargs)

    def _grad_needed(self, tensors: Sequence[torch.Tensor]) -> bool:
        return any(t.requires_grad for t in tensors) or any(
            tensor.requires_grad for _, _, tensor, _ in self.bound
        )

    def _normalize(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """``normalize_call`` without ``inspect``'s binding where the call is plain (positional then
        keyword arguments of named parameters): a few microseconds on every block call."""
        if len(args) > len(self.positional):
            return None
        given = dict(zip(self.positional[: len(args)], args, strict=True))
        for name, value in kwargs.items():
            if name in given or name not in self.keyword_only:
                return None
            given[name] = value
        if len(given) != len(self.names):
            for name in self.names:
                if name not in given:
                    if name not in self.defaults:
                        return None
                    given[name] = self.defaults[name]
        return {name: given[name] for name in self.names}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        normalized = self._normalize(args, kwargs)
        if normalized is None:
            try:
                normalized = normalize_call(self.block_ref(), args, kwargs)  # type: ignore[arg-type]
            except TypeError:
                return self._miss("signature", args, kwargs)
        leaves: list[Any] = []
        if not self.flatten(((), normalized), leaves):
            return self._miss("structure", args, kwargs)
        tensors: list[torch.Tensor] = []
        for index, leaf in enumerate(leaves):
            if index in self.constants:
                expected = self.constants[index]
                if type(leaf) is not type(expected) or leaf != expected:
                    return self._miss("value", args, kwargs)
                continue
            if not isinstance(leaf, torch.Tensor):
                return self._miss("structure", args, kwargs)
            if leaf.dtype != self.dtypes[len(tensors)] or leaf.device != self.device:
                return self._miss("dtype/device", args, kwargs)
            tensors.append(leaf if leaf.is_contiguous() else leaf.contiguous())
        if not self.guard.check([t.shape for t in tensors]):
            return self._miss("shape", args, kwargs)
        if torch.is_grad_enabled() and self._grad_needed(tensors):
            return self._miss("grad", args, kwargs)
        if not self.constants_current():
            self.bind_constants()
            self.stats.rebinds += 1
        self.stats.calls += 1
        outputs = self.loader.boxed_run(tensors)
        return tuple(outputs) if self.flat_tuple_out else pytree.tree_unflatten(outputs, self.out_spec)


@dataclass
class AotBinding:
    """The blocks of one module that run AOT code: per kind, its package and blocks; load seconds."""

    module_ref: weakref.ref[nn.Module]
    calls: dict[nn.Module, _AotCall]
    packages: dict[str, PackageInfo]
    stats: AotStats
    load_s: float
    first_load_s: float

    @property
    def blocks(self) -> int:
        return len(self.calls)

    def summary(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "kinds": {
                kind: {"package": info.path.name,
                       "blocks": sum(call.kind == kind for call in self.calls.values())}
                for kind, info in self.packages.items()
            },
            "load_s": round(self.load_s, 4),
            "first_load_s": round(self.first_load_s, 4),
            "calls": self.stats.calls,
            "misses": dict(self.stats.misses),
            "rebinds": self.stats.rebinds,
        }


_bindings: weakref.WeakKeyDictionary[nn.Module, AotBinding] = weakref.WeakKeyDictionary()


def binding(module: nn.Module) -> AotBinding | None:
    """The module's current binding, or None."""
    return _bindings.get(module)


def _check_manifest_fits(kind: str, info: PackageInfo, block: nn.Module) -> None:
    device = _device_of(block)
    if info.manifest.get("device", {}).get("type") != device.type:
        raise AotPackageError(kind, "stale", f"built for {info.manifest.get('device')}, block is on {device}")
    expected = info.manifest.get("constants", {})
    actual = {name: [list(t.shape), str(t.dtype)] for name, t in _constants(block).items()}
    if expected != actual:
        raise AotPackageError(kind, "stale", "the block's weights differ in names, shapes or dtypes")


def bind(
    module: nn.Module,
    packages: Mapping[str, PackageInfo],
    *,
    on_miss: Callable[[nn.Module, str], None] | None = None,
) -> AotBinding:
    """Load each block's package (once per block: one load holds one set of constants), bind the
    block's own weights without copying, and put the AOT call in the block's call slot.

    ``on_miss(block, reason)`` is told of every call the package cannot serve (shape outside the
    bounds, another structure, dtype or device, grad needed) before it runs eagerly; it may raise.
    All or nothing: on any failure every block is left eager. Raises ``AotPackageError`` (a package
    missing, stale or corrupt: not loaded), ``AotBindError``, ``AotUnsupported``.
    """
    internals.check()
    if module in _bindings:
        raise AotBindError(f"{type(module).__name__} is already bound: unbind it first")
    kinds = block_kinds(module)
    for kind, blocks in kinds.items():
        if kind not in packages:
            raise AotPackageError(kind, "missing", "no package given for this block kind")
        _check_device(_device_of(blocks[0]))
        problem = _validate(packages[kind])
        if problem is not None:
            raise AotPackageError(kind, "corrupt", problem)
        for block in blocks:
            _check_manifest_fits(kind, packages[kind], block)
            if internals.compiled_call(block) is not None:
                raise AotBindError(f"{kind}: a block is already compiled (its call slot is taken)")
            if block._forward_hooks or block._forward_pre_hooks or block._forward_hooks_with_kwargs:
                raise AotBindError(f"{kind}: a block has forward hooks, which the AOT call would skip")
    stats = AotStats()
    calls: dict[nn.Module, _AotCall] = {}
    started = time.perf_counter()
    first_load_s = 0.0
    try:
        for kind, blocks in kinds.items():
            info = packages[kind]
            spec = info.spec
            guard = _Guard.from_json(info.manifest["guard"])
            for block in blocks:
                device = _device_of(block)
                load_started = time.perf_counter()
                loader = load_package(
                    info.path, device_index=-1 if device.type == "cpu" else (device.index or 0)
                )
                if not calls:
                    first_load_s = time.perf_counter() - load_started
                call = _AotCall(block, kind, loader, spec, guard, stats, on_miss)
                call.bind_constants()
                calls[block] = call
        for block, call in calls.items():
            # Behind the module's eager switch, like a just-in-time compile: an eager call of the
            # module (a miss served eagerly) runs its blocks' eager forwards.
            internals.install(block, module, call)
    except AotError:
        for block in calls:
            internals.set_compiled_call(block, None)
        raise
    except Exception as error:
        for block in calls:
            internals.set_compiled_call(block, None)
        raise AotBindError(f"loading or binding a package failed: {type(error).__name__}: {error}") from error
    result = AotBinding(weakref.ref(module), calls, dict(packages), stats,
                        time.perf_counter() - started, first_load_s)
    _bindings[module] = result
    return result


def rebind(module: nn.Module) -> int:
    """Re-bind the constants of every bound block whose weights were replaced (new tensors, a moved
    ``.data``); returns how many were re-bound (0 when nothing is bound or nothing changed). In-place
    changes need none: the packages read the block's tensors themselves. Raises ``AotPackageError``
    (``stale``) when a weight changed shape or dtype: that needs a new build."""
    current = _bindings.get(module)
    if current is None:
        return 0
    count = 0
    for block, call in current.calls.items():
        if not call.constants_current():
            _check_manifest_fits(call.kind, current.packages[call.kind], block)
            call.bind_constants()
            count += 1
    current.stats.rebinds += count
    return count


def unbind(module: nn.Module) -> bool:
    """Every bound block back to its eager call (exactly: the slot is cleared), packages released.
    Returns whether anything was bound."""
    current = _bindings.pop(module, None)
    if current is None:
        return False
    for block, call in current.calls.items():
        if _bound_call(block) is call:
            internals.set_compiled_call(block, None)
    current.calls.clear()
    return True


def _bound_call(block: nn.Module) -> object:
    """What the block's call slot runs, under the eager switch."""
    slot = internals.compiled_call(block)
    return slot.compiled if isinstance(slot, internals.EagerSwitch) else slot


def aot_blocks(module: nn.Module) -> list[nn.Module]:
    """Submodules whose call slot runs an AOT package (for tests and the audit)."""
    return [
        sub for sub in module.modules() if isinstance(_bound_call(sub), _AotCall)
    ]
