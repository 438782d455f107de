"""Block kinds: which repeated blocks one export serves, and where a block lives."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from adapters.aot.errors import AotUnsupported
from adapters.regional import repeated_blocks

SUPPORTED_DEVICES = ("cpu", "cuda")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    return isinstance(value, (tuple, list)) and len(value) <= 64 and all(isinstance(v, _PLAIN) for v in value)


def plain_attributes(obj: object) -> list[list[Any]]:
    """The public plain-valued attributes of ``obj`` (numbers, strings, flags, short tuples of
    them): what a forward may read besides tensors (a per-layer LoRA or IP-Adapter ``scale``).
    Export bakes them into the package, so they are part of the kind."""
    values = getattr(obj, "__dict__", {})
    return [[name, value if not isinstance(value, tuple) else list(value)]
            for name, value in sorted(values.items())
            if not name.startswith("_") and name != "training" and _plain(value)]


def _structure(block: nn.Module) -> list[Any]:
    """What makes two blocks of one class one kind: weights layout, submodule/processor classes,
    and the plain attributes of every submodule and processor (which export bakes in)."""
    tensors = [
        [name, list(t.shape), str(t.dtype)]
        for name, t in [*block.named_parameters(remove_duplicate=False),
                        *block.named_buffers(remove_duplicate=False)]
    ]
    classes = []
    for name, sub in block.named_modules(remove_duplicate=False):
        processor = getattr(sub, "processor", None)
        classes.append([name, _qualname(type(sub)),
                        None if processor is None else _qualname(type(processor)),
                        plain_attributes(sub), [] if processor is None else plain_attributes(processor)])
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



def _constants(block: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the exported block reads as a constant: parameters and all buffers."""
    tensors: dict[str, torch.Tensor] = dict(block.named_parameters(remove_duplicate=False))
    tensors.update(block.named_buffers(remove_duplicate=False))
    return tensors

