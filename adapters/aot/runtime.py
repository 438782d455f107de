"""Runtime: bind every block to its package with the block's own weights, check each call
against the package's bounds, and put the block back to eager."""

from __future__ import annotations

import inspect
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from adapters import _torch_internals as internals
from adapters.aot.bounds import CallSpec, _Guard
from adapters.aot.capture import _eager, _signature, normalize_call
from adapters.aot.errors import AotBindError, AotError, AotPackageError
from adapters.aot.kinds import _check_device, _constants, _device_of, block_kind, block_kinds
from adapters.aot.store import PackageInfo, _validate


@dataclass
class AotStats:
    """Calls served by AOT code and misses (run eagerly) by reason, over every bound block."""

    calls: int = 0
    misses: Counter[str] = field(default_factory=Counter)
    rebinds: int = 0
    copied: set[str] = field(default_factory=set)  # weights bound as contiguous copies


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
    """Load one package (``_torch_internals.load_aoti_package``): one load per block."""
    return internals.load_aoti_package(str(path), device_index)


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
        # (the owner's tensor slots, name, the tensor there at binding, its data pointer, its
        # version counter when the package reads a contiguous copy of it, else None)
        self.bound: list[tuple[dict[str, Any], str, torch.Tensor, int, int | None]] = []
        self.keep: list[Any] = []
        self.copied: tuple[str, ...] = ()

    # Constants: which tensors the runner reads, by pointer; held here so none is freed under it.
    def bind_constants(self) -> None:
        """Bind the block's own tensors without a copy; a weight the host replaced with a
        non-contiguous tensor is bound as a contiguous copy (named in ``copied``), which is made
        again when that tensor changes in place. Raises ``AotBindError`` (a weight missing, or on
        another device)."""
        block = self.block_ref()
        assert block is not None
        tensors = _constants(block)
        wanted = self.loader.get_constant_fqns()
        missing = [name for name in wanted if name not in tensors]
        if missing:
            raise AotBindError(f"{self.kind}: the package reads constants the block lacks: {missing[:5]}")
        constants = {name: tensors[name] for name in wanted}
        bound: dict[str, torch.Tensor] = {}
        copied: list[str] = []
        for name, tensor in constants.items():
            if tensor.device != self.device:
                raise AotBindError(f"{self.kind}: weight {name} is on {tensor.device}, not {self.device}")
            if tensor.is_contiguous():
                bound[name] = tensor
            else:
                bound[name] = tensor.detach().contiguous()
                copied.append(name)
        internals.load_constants(self.loader, bound, user_managed=True)
        entries: list[tuple[dict[str, Any], str, torch.Tensor, int, int | None]] = []
        owners = dict(block.named_modules(remove_duplicate=False))
        for name, tensor in constants.items():
            owner_name, _, attr = name.rpartition(".")
            slots = internals.tensor_slots(owners[owner_name], attr)
            version = internals.tensor_version(tensor) if name in copied else None
            entries.append((slots, attr, tensor, tensor.data_ptr(), version))
        self.bound = entries
        self.keep = [tensor.untyped_storage() for tensor in bound.values()]
        self.copied = tuple(copied)

    def constants_current(self) -> bool:
        return all(
            slots.get(attr) is tensor and tensor.data_ptr() == ptr
            and (version is None or internals.tensor_version(tensor) == version)
            for slots, attr, tensor, ptr, version in self.bound
        )

    def _miss(self, reason: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.stats.misses[reason] += 1
        block = self.block_ref()
        assert block is not None
        if self.on_miss is not None:
            self.on_miss(block, reason)
        return _eager(block, args, kwargs)

    def _grad_needed(self, tensors: Sequence[torch.Tensor]) -> bool:
        return any(t.requires_grad for t in tensors) or any(
            tensor.requires_grad for _, _, tensor, _, _ in self.bound
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
            try:
                self.bind_constants()
            except AotError:
                return self._miss("weights", args, kwargs)
            self.stats.rebinds += 1
            self.stats.copied.update(f"{self.kind}:{name}" for name in self.copied)
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
            "copied_weights": sorted(self.stats.copied),
        }


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
    internals.check_aot()
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
            if internals.has_forward_hooks(block):
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
    for call in calls.values():
        stats.copied.update(f"{call.kind}:{name}" for name in call.copied)
    return AotBinding(weakref.ref(module), calls, dict(packages), stats,
                      time.perf_counter() - started, first_load_s)


def rebind(binding: AotBinding) -> int:
    """Re-bind the constants of every bound block whose weights were replaced (new tensors, a moved
    ``.data``); returns how many were re-bound (0 when nothing changed). In-place changes need
    none: the packages read the block's tensors themselves. Raises ``AotPackageError`` (``stale``)
    when a weight changed shape or dtype, or a block's plain attributes changed (a new ``scale``):
    that needs a new build."""
    count = 0
    for block, call in binding.calls.items():
        if block_kind(block) != call.kind:
            raise AotPackageError(
                call.kind, "stale", "a block's plain attributes (a scale, a flag) changed since the build"
            )
        if not call.constants_current():
            _check_manifest_fits(call.kind, binding.packages[call.kind], block)
            call.bind_constants()
            binding.stats.copied.update(f"{call.kind}:{name}" for name in call.copied)
            count += 1
    binding.stats.rebinds += count
    return count


def unbind(binding: AotBinding) -> bool:
    """Every bound block back to its eager call (exactly: the slot is cleared), packages released.
    Returns whether anything was bound."""
    if not binding.calls:
        return False
    for block, call in binding.calls.items():
        if _bound_call(block) is call:
            internals.set_compiled_call(block, None)
    binding.calls.clear()
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
