"""Tiny real diffusers pipelines with random weights, built in code (nothing downloaded).

- ``tiny_flux_pipeline()``: a ``FluxPipeline`` around the tiny Flux transformer of ``lifecycle.testing.tiny``.
- ``tiny_wan22_pipeline()``: a Wan 2.2-style ``WanPipeline`` with two transformers (``transformer``
  for high-noise steps, ``transformer_2`` below ``boundary_ratio``), as in Wan2.2-T2V-A14B.

Neither has a text encoder: a request passes ``prompt_embeds`` (and, for Wan's classifier-free
guidance, ``negative_prompt_embeds``) built by ``*_call()``, which returns the keyword arguments
of one pipeline call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lifecycle.testing.tiny import FluxShape, tiny_flux

# Wan 2.2 switches from ``transformer`` to ``transformer_2`` at this fraction of the train timesteps.
WAN22_BOUNDARY_RATIO = 0.875
_FLUX_SHAPE = FluxShape()


@dataclass(frozen=True)
class WanShape:
    """A tiny Wan transformer and one request's video size.

    Example::

        shape = WanShape(num_layers=1, frames=9)
        pipe = tiny_wan22_pipeline(shape)
    """

    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 12
    text_dim: int = 32
    text_tokens: int = 8
    frames: int = 5
    height: int = 16
    width: int = 16


def tiny_flux_pipeline(shape: FluxShape = _FLUX_SHAPE, *, seed: int = 0) -> Any:
    """A ``diffusers.FluxPipeline``: tiny Flux transformer, tiny VAE, no text encoders.

    The VAE packs 2x2 latent patches of 4 channels, so the transformer's in_channels must be 16.

    Args:
        shape: the transformer's size.
        seed: the seed of the transformer's weights (the VAE's is ``seed + 1``).

    Raises:
        ValueError: ``shape.in_channels`` is not 16.
        ImportError: diffusers is not installed.

    Example::

        pipe = tiny_flux_pipeline()
        images = pipeline_output(pipe(**flux_call(steps=4)))
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    if shape.in_channels != 16:
        raise ValueError(f"the tiny Flux pipeline needs in_channels=16 (4 latent channels x 2x2): {shape}")
    transformer = tiny_flux(shape, seed=seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_call(
    shape: FluxShape = _FLUX_SHAPE, *, steps: int = 8, seed: int = 1, size: int = 32,
    output_type: str = "pt", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Keyword arguments of one ``FluxPipeline`` call: fixed embeddings and a seeded generator.

    ``size`` 32 with the tiny VAE (scale 2) gives 16x16 latents, packed into 64 image tokens.

    Args:
        shape: the transformer's size (the embeddings' widths and text length).
        steps: ``num_inference_steps``.
        seed: the seed of the embeddings (the call's generator gets ``seed + 1``).
        size: the image's height and width in pixels.
        output_type: the pipeline's ``output_type``.
        device: where the embeddings go.
        dtype: the embeddings' dtype.

    Example::

        pipe = tiny_flux_pipeline()
        images = pipeline_output(pipe(**flux_call(steps=4, seed=2)))
    """
    generator = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(1, shape.text_tokens, shape.joint_attention_dim, generator=generator)
        .to(device=device, dtype=dtype),
        "pooled_prompt_embeds": torch.randn(1, shape.pooled_projection_dim, generator=generator)
        .to(device=device, dtype=dtype),
        "height": size,
        "width": size,
        "num_inference_steps": steps,
        "guidance_scale": 3.5,
        "generator": torch.Generator().manual_seed(seed + 1),
        "output_type": output_type,
    }


def tiny_wan_transformer(shape: WanShape = WanShape(), *, seed: int = 0) -> torch.nn.Module:
    """A ``diffusers.WanTransformer3DModel`` with random weights, in eval mode.

    Args:
        shape: the transformer's size.
        seed: the ``torch.manual_seed`` the weights are drawn under.

    Raises:
        ImportError: diffusers is not installed.

    Example::

        module = tiny_wan_transformer(WanShape(num_layers=1))
    """
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model: torch.nn.Module = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=shape.num_attention_heads,
        attention_head_dim=shape.attention_head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=shape.text_dim,
        freq_dim=32,
        ffn_dim=32,
        num_layers=shape.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return model.eval()


def tiny_wan22_pipeline(shape: WanShape = WanShape(), *, seed: int = 0) -> Any:
    """A Wan 2.2-style ``diffusers.WanPipeline``: two tiny transformers (different weights),
    ``boundary_ratio=0.875``, a tiny ``AutoencoderKLWan``, no text encoder.

    Args:
        shape: the transformers' size.
        seed: the first transformer's seed (the second's is ``seed + 1``, the VAE's ``seed + 2``).

    Raises:
        ImportError: diffusers is not installed.

    Example::

        pipe = tiny_wan22_pipeline()
        frames = pipeline_output(pipe(**wan_call(steps=4)))
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    transformer = tiny_wan_transformer(shape, seed=seed)
    transformer_2 = tiny_wan_transformer(shape, seed=seed + 1)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=WAN22_BOUNDARY_RATIO,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_call(
    shape: WanShape = WanShape(), *, steps: int = 8, seed: int = 1, guidance_scale: float = 4.0,
    output_type: str = "pt", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Keyword arguments of one ``WanPipeline`` call. With ``guidance_scale > 1`` (classifier-free
    guidance) each step calls the step's transformer twice: conditional, then unconditional.

    Args:
        shape: the transformer's text width and length, and the video's size.
        steps: ``num_inference_steps``.
        seed: the seed of the embeddings (the call's generator gets ``seed + 1``).
        guidance_scale: the classifier-free guidance scale.
        output_type: the pipeline's ``output_type``.
        device: where the embeddings go.
        dtype: the embeddings' dtype.

    Example::

        pipe = tiny_wan22_pipeline()
        frames = pipeline_output(pipe(**wan_call(steps=4, guidance_scale=1.0)))
    """
    generator = torch.Generator().manual_seed(seed)
    text = (1, shape.text_tokens, shape.text_dim)
    return {
        "prompt_embeds": torch.randn(*text, generator=generator).to(device=device, dtype=dtype),
        "negative_prompt_embeds": torch.randn(*text, generator=generator).to(device=device, dtype=dtype),
        "height": shape.height,
        "width": shape.width,
        "num_frames": shape.frames,
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "generator": torch.Generator().manual_seed(seed + 1),
        "output_type": output_type,
    }


def pipeline_output(result: Any) -> torch.Tensor:
    """The images (Flux) or frames (Wan) of a pipeline call, as one tensor.

    Args:
        result: what the pipeline call returned (a ``FluxPipelineOutput`` or ``WanPipelineOutput``).

    Raises:
        AttributeError: ``result`` has neither ``images`` nor ``frames``.

    Example::

        images = pipeline_output(tiny_flux_pipeline()(**flux_call(steps=4)))
    """
    output = result.images if hasattr(result, "images") else result.frames
    return output if isinstance(output, torch.Tensor) else torch.as_tensor(output)
