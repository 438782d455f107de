"""``CompilePlan(reproducible=True)``: compiled outputs that are bit-identical across
processes (replicas) and across a restart from compile artifacts.

The source of the difference (measured on an H200, torch 2.11, ``bench/gpu_replicas.py``; the
README's "Reproducibility" section has the numbers): inductor picks some kernel configurations by
*benchmarking at run time*. A reduction kernel (LayerNorm, RMSNorm, softmax statistics) gets
several candidate Triton configs (block size along the reduced axis, rows per program, warps);
on its first call each candidate is timed on the device and the fastest is kept. The candidates
add the reduced elements in different orders, so a different winner gives different low bits,
and two processes with identical weights, inputs and seed pick different winners whenever two
timings are close. Measured: three default processes gave three outputs, and every pair had
picked a different winner for at least one reduction (``R0_BLOCK`` 2048 against 4096; a
persistent reduction's ``XBLOCK`` 8 against 32); under this option the reductions were not
timed and the three outputs were bit-identical, although pointwise kernels still picked
different winners (their configs do not change numerics). Eager is unaffected (its kernels are
fixed per shape), which is why eager + cache-dit is bit-identical across processes and compiled
code is not; cache-dit's cached steps then carry the first differing step forward.

What the option does: it compiles with inductor's deterministic mode (``deterministic=True``,
torch >= 2.8: "skips any on-device benchmarking in inductor if we know it affects numerics"):
reduction kernels get one configuration chosen by a fixed rule, ``pad_mm`` and template
selection decide without timing, and coordinate descent and ``R0_BLOCK`` scaling are off for
reductions. Pointwise kernels still autotune: their configs do not change numerics.

Scope: *per compile, not process-wide*. The setting travels as inductor ``options`` of this
module's ``torch.compile`` (inductor applies it as a config patch around each of its compiles and
bakes it into the generated kernels' metadata), so other modules of the process and the host's
own ``torch.compile`` calls are untouched, and nothing is left to restore on ``reset()``. It is
part of inductor's own cache key and of our artifact key (the plan), so a reproducible
artifact is never loaded into a non-reproducible compile, nor the reverse.

What it cannot fix on its own, reported in the audit (``reproducible`` on the compile
transition, see ``process_settings``) rather than changed behind the host's back, because these
are process-wide switches the host owns: ``torch.backends.cudnn.benchmark`` (cuDNN times
convolution algorithms, the same problem for eager convolutions), the matmul precision settings
(TF32), and, on the CPU, the thread count (a reduction split over N threads adds in an order
that depends on N: replicas must run with the same ``torch.get_num_threads()``).
Backends other than inductor (``eager``, ``aot_eager``) run eager kernels, already reproducible:
there the option only adds the audit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from adapters import _torch_internals as internals
from adapters.errors import InvalidOptions

# inductor config keys the option sets for its compiles (as torch.compile ``options``).
INDUCTOR_SETTINGS: dict[str, Any] = {"deterministic": True}


def supported() -> bool:
    """Whether this torch's inductor has the deterministic mode (torch >= 2.8)."""
    try:
        return internals.inductor_has_config("deterministic")
    except Exception:  # a torch without inductor
        return False


def validate_reproducible(reproducible: bool, options: Mapping[str, Any]) -> None:
    """Check that the plan's ``reproducible`` does not contradict torch.compile's arguments."""
    if not reproducible or options.get("backend", "inductor") != "inductor":
        return
    if not supported():
        raise InvalidOptions(
            f"CompilePlan(reproducible=True) needs inductor's deterministic mode (torch >= 2.8); "
            f"torch {torch.__version__} has none: upgrade torch, or drop reproducible"
        )
    inductor_options = options.get("options") or {}
    for key, wanted in INDUCTOR_SETTINGS.items():
        if key in inductor_options and inductor_options[key] != wanted:
            raise InvalidOptions(
                f"compile options contradict the plan: reproducible=True sets inductor "
                f"{key}={wanted!r}, but options[{key!r}] is {inductor_options[key]!r}; drop one"
            )


def torch_compile_kwargs(options: Mapping[str, Any], *, reproducible: bool) -> dict[str, Any]:
    """torch.compile's keyword arguments for validated ``options`` (a new dict), with the
    reproducible settings merged in when the plan asks for them.

    torch.compile takes ``mode`` or ``options``, not both, so a ``mode`` is expanded into the
    inductor options it stands for (``torch._inductor.list_mode_options``) first.
    """
    kwargs = dict(options)
    if not reproducible or kwargs.get("backend", "inductor") != "inductor":
        return kwargs
    mode = kwargs.pop("mode", None)
    merged: dict[str, Any] = {}
    if mode not in (None, "default"):
        merged.update(internals.inductor_mode_options(str(mode)))
    merged.update(kwargs.get("options") or {})
    merged.update(INDUCTOR_SETTINGS)
    kwargs["options"] = merged
    return kwargs


def process_settings(device_type: str) -> dict[str, Any]:
    """The process-wide switches that decide reproducibility beyond the compile (for the audit)."""
    settings: dict[str, Any] = {
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device_type == "cpu":
        settings["threads"] = torch.get_num_threads()
    return settings


def audit_fields(reproducible: bool, options: Mapping[str, Any], device_type: str) -> dict[str, Any] | None:
    """What the compile transition records when the plan asks for it (None when it does not)."""
    if not reproducible:
        return None
    inductor = options.get("backend", "inductor") == "inductor"
    settings = process_settings(device_type)
    warnings = []
    if settings["cudnn_benchmark"]:
        warnings.append(
            "torch.backends.cudnn.benchmark is on: cuDNN picks convolution algorithms by timing "
            "them, so convolutions may differ between processes; set it False in every replica"
        )
    if device_type == "cpu":
        warnings.append(
            f"CPU reductions depend on the thread count ({settings['threads']} here): run every "
            "replica with the same torch.set_num_threads()"
        )
    return {
        "scope": "this module's compile (inductor options), not process-wide",
        "inductor": dict(INDUCTOR_SETTINGS) if inductor else None,
        "process": settings,
        "notes": warnings,
    }
