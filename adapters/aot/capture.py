"""Capturing real block calls: the examples each block kind is exported from."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from adapters import _torch_internals as internals
from adapters.aot.errors import AotUnsupported
from adapters.aot.kinds import block_kinds

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


