"""The GPU benchmarks' Flux transformer: FLUX.1's widths with few blocks, or the tests' tiny one.

One description for every script that builds it: the dtype per device, the shape, the model,
and a request's inputs at a number of image tokens (the text tokens stay the shape's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from lifecycle.testing.tiny import FluxShape, flux_architecture, flux_inputs, tiny_flux


class BenchFlux(NamedTuple):
    shape: FluxShape
    dtype: torch.dtype
    model: torch.nn.Module
    inputs: Callable[[int], Any]  # image tokens -> one request's inputs, on the model's device


def bench_flux(device: torch.device, blocks: tuple[int, int] | list[int], *, tiny: bool) -> BenchFlux:
    """A Flux transformer of ``blocks`` (double, single) with random weights (seed 0), built on
    ``device`` in bf16 on a GPU and fp32 on a CPU; ``tiny``: the tests' widths."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    double, single = blocks
    if tiny:
        shape = FluxShape(num_layers=double, num_single_layers=single)
    else:
        shape = flux_architecture(double, single)
    torch.manual_seed(0)
    with torch.device(device):
        model = tiny_flux(shape, dtype=dtype)
    model = model.to(device)

    def inputs(tokens: int) -> Any:
        return flux_inputs(dataclasses.replace(shape, image_tokens=tokens), device=device, dtype=dtype)

    return BenchFlux(shape, dtype, model, inputs)
