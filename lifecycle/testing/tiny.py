"""Tiny real diffusers transformers with random weights, built in code (nothing downloaded),
and a denoising loop that drives them: for the demo, the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class FluxShape:
    """A Flux-architecture transformer's size and one request's token counts.

    Example::

        shape = FluxShape(num_layers=1, num_single_layers=1)
        module = tiny_flux(shape)
    """

    num_layers: int = 2
    num_single_layers: int = 2
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    joint_attention_dim: int = 32
    pooled_projection_dim: int = 32
    in_channels: int = 16
    image_tokens: int = 64
    text_tokens: int = 8


def flux_architecture(double_blocks: int, single_blocks: int) -> FluxShape:
    """FLUX.1's widths (hidden 3072 = 24 heads x 128, T5 4096, CLIP 768, 64 latent channels,
    4096 image + 512 text tokens) with fewer blocks: the GPU benchmarks' model.

    Args:
        double_blocks: the number of double-stream (joint) blocks.
        single_blocks: the number of single-stream blocks.

    Example::

        shape = flux_architecture(2, 4)
        module = tiny_flux(shape, dtype=torch.bfloat16).to("cuda")
    """
    return FluxShape(
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        in_channels=64,
        image_tokens=4096,
        text_tokens=512,
    )


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Three even axis sizes that add up to ``head_dim`` (Flux uses 16, 56, 56 for 128)."""
    first = max(2, (head_dim // 8) // 2 * 2)
    rest = head_dim - first
    second = rest // 2 // 2 * 2
    return (first, second, rest - second)


def tiny_flux(
    shape: FluxShape = FluxShape(), *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A ``diffusers.FluxTransformer2DModel`` with random weights, in eval mode.

    Args:
        shape: the transformer's size.
        seed: the ``torch.manual_seed`` the weights are drawn under.
        dtype: the weights' dtype.

    Raises:
        ImportError: diffusers is not installed.

    Example::

        module = tiny_flux()
        out = denoise(module, flux_inputs(), steps=4)
    """
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model: nn.Module = FluxTransformer2DModel(
        patch_size=1,
        in_channels=shape.in_channels,
        num_layers=shape.num_layers,
        num_single_layers=shape.num_single_layers,
        attention_head_dim=shape.attention_head_dim,
        num_attention_heads=shape.num_attention_heads,
        joint_attention_dim=shape.joint_attention_dim,
        pooled_projection_dim=shape.pooled_projection_dim,
        axes_dims_rope=_rope_axes(shape.attention_head_dim),
    )
    return model.to(dtype=dtype).eval()


@dataclass
class FluxInputs:
    """One request's conditioning and starting latents (made by ``flux_inputs``).

    Example::

        inputs = flux_inputs(seed=3)
        latents = denoise(tiny_flux(), inputs, steps=4)
    """

    latents: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor
    image_ids: torch.Tensor
    text_ids: torch.Tensor


def flux_inputs(
    shape: FluxShape = FluxShape(), *, seed: int = 1, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FluxInputs:
    """Seeded random conditioning and latents for one request of a transformer of ``shape``.

    Args:
        shape: the transformer's size and the request's token counts.
        seed: the seed of the generator the tensors are drawn from.
        device: where the tensors go.
        dtype: the tensors' dtype.

    Example::

        inputs = flux_inputs(FluxShape(), seed=1)
        latents = denoise(tiny_flux(), inputs, steps=4)
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    return FluxInputs(
        latents=randn(1, shape.image_tokens, shape.in_channels),
        text=randn(1, shape.text_tokens, shape.joint_attention_dim),
        pooled=randn(1, shape.pooled_projection_dim),
        image_ids=torch.zeros(shape.image_tokens, 3, device=device, dtype=dtype),
        text_ids=torch.zeros(shape.text_tokens, 3, device=device, dtype=dtype),
    )


def denoise(module: nn.Module, inputs: FluxInputs, steps: int) -> torch.Tensor:
    """A flow-matching Euler loop: ``steps`` transformer calls, as a sampler would make them.

    Args:
        module: the transformer (a ``FluxTransformer2DModel`` or the lifecycle's ``module``).
        inputs: the request's conditioning and starting latents.
        steps: the number of transformer calls.

    Returns:
        The final latents.

    Example::

        latents = denoise(tiny_flux(), flux_inputs(), steps=8)
    """
    latents = inputs.latents.clone()
    with torch.no_grad():
        for index in range(steps):
            sigma = 1.0 - index / steps
            timestep = torch.full((1,), sigma, device=latents.device, dtype=latents.dtype)
            velocity = module(
                hidden_states=latents,
                encoder_hidden_states=inputs.text,
                pooled_projections=inputs.pooled,
                timestep=timestep,
                img_ids=inputs.image_ids,
                txt_ids=inputs.text_ids,
                return_dict=False,
            )[0]
            latents = latents - velocity / steps
    return latents


def denoiser(inputs: FluxInputs, steps: int) -> Callable[[nn.Module], Any]:
    """``run(module)`` for ``warm_up``/``prepare``: one ``steps``-step request.

    Args:
        inputs: the request's conditioning and starting latents.
        steps: the number of transformer calls per run.

    Example::

        run = denoiser(flux_inputs(), steps=8)
        lc.prepare(run)
    """
    return lambda module: denoise(module, inputs, steps)


def demo_cache_config(num_inference_steps: int | None = None, threshold: float = 0.3) -> Any:
    """A DBCache config under which a tiny Flux caches some steps (F1B0, short warm-up).

    Args:
        num_inference_steps: the steps per request, when known (for a step-aware schedule).
        threshold: the residual-difference threshold below which a step is cached.

    Raises:
        ImportError: cache-dit is not installed.

    Example::

        config = demo_cache_config(num_inference_steps=8)
        print(CacheDitAdapter().describe_config(config))
    """
    from adapters import CacheDitAdapter

    return CacheDitAdapter().make_config(
        Fn_compute_blocks=1,
        Bn_compute_blocks=0,
        residual_diff_threshold=threshold,
        max_warmup_steps=4,
        num_inference_steps=num_inference_steps,
    )
