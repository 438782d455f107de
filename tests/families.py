"""Tiny real diffusers pipelines, one per DiT family cache-dit supports: random weights built in
code (nothing downloaded), sized after diffusers' own fast tests (``get_dummy_components``).

Text encoders and VAEs are left out: each case's ``call(steps, seed)`` passes
``prompt_embeds``-style inputs and asks for ``output_type="latent"`` (what the transformers
produced; the pipelines fall back to their default VAE scale factor, and the sizes are picked
for it). No pipeline here insisted on a text encoder; Cosmos insists on its guardrail, which a
pass-through module replaces. ``FAMILIES`` is the one registry that ``tests/test_families.py``
and ``scripts/families_table.py`` (the "Supported pipelines" table of docs/pipelines.md) both
run. It lives beside the tests, not in the shipped package: a test fixture, imported as
``families`` (tests/ is on the path under pytest; the script puts it there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# Steps of a served request, and of the warm-up call (shorter: the lifecycle steers cache-dit).
SERVING_STEPS = 6
WARMUP_STEPS = 2

Call = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class FamilyCase:
    """One family: how to build its tiny pipeline, one call's keyword arguments, and the
    DBCache settings under which it caches some steps of a ``SERVING_STEPS``-step request."""

    key: str
    family: str
    pipeline_class: str
    modality: str  # "image" | "video"
    build: Callable[[int], Any]  # seed -> pipeline
    call: Call  # call(steps=..., seed=...) -> pipeline kwargs
    cache: Mapping[str, Any] = field(default_factory=dict)
    guidance: str = "none"  # how the family's calls run guidance: "separate", "batched", "distilled", "none"
    slow: bool = False
    notes: str = ""
    # A family that cannot be served: the lifecycle error expected up front, and why.
    refused: str | None = None
    # The second resolution (height, width) of the unwarmed-shape check; None: twice the first.
    second_size: tuple[int, int] | None = None
    # Where the unwarmed-shape policy misses this family's second resolution: why (the check
    # then asserts the gap is still there, so a fix shows up as a failure to update).
    shape_gap: str | None = None


class NotInDiffusers(LookupError):
    """An older diffusers than the newest tested one lacks a class a family needs: the family
    is skipped, by the class's name, not failed. On the newest tested diffusers a missing class
    stays an ``AttributeError`` (a typo here must fail)."""


def _older_diffusers() -> str | None:
    """The installed diffusers' version when it is older than the newest tested one, else None."""
    import diffusers
    from packaging.version import Version

    from adapters.versions import TESTED

    older = Version(diffusers.__version__) < Version(TESTED["newest"]["diffusers"])
    return str(diffusers.__version__) if older else None


def missing_from_diffusers(*names: str) -> str | None:
    """Why an older diffusers cannot build a family: the ``names`` it lacks, or None when it
    has them all (or is the newest tested diffusers, where a missing name is a bug).

    Example::

        missing_from_diffusers("FluxPipeline")     # None on every tested diffusers
    """
    import diffusers

    missing = [name for name in names if not hasattr(diffusers, name)]
    version = _older_diffusers() if missing else None
    return f"diffusers {version} has no {', '.join(missing)}" if version else None


def unavailable(family: FamilyCase) -> str | None:
    """Why the installed diffusers cannot serve ``family`` (its pipeline class is missing from
    an older diffusers), or None.

    Example::

        reason = unavailable(case("flux"))     # None
    """
    reason = missing_from_diffusers(family.pipeline_class)
    return f"{family.family}: {reason}" if reason else None


def _diffusers(*names: str) -> Any:
    """diffusers' classes by name (imported on first use; typed Any: diffusers is untyped)."""
    import diffusers

    reason = missing_from_diffusers(*names)
    if reason is not None:
        raise NotInDiffusers(reason)
    found = tuple(getattr(diffusers, name) for name in names)
    return found[0] if len(found) == 1 else found


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _mask(tokens: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.ones(1, tokens, dtype=dtype)


def _base(steps: int, seed: int, **extra: Any) -> dict[str, Any]:
    return {
        "num_inference_steps": steps,
        "generator": _gen(seed + 1000),
        "output_type": "latent",
        **extra,
    }


def _done(pipe: Any) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _eval(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval()


# ---------------------------------------------------------------------------------- images
def _flux(seed: int, kontext: bool = False) -> Any:
    FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel = _diffusers(
        "FluxKontextPipeline", "FluxPipeline", "FluxTransformer2DModel"
    )

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    cls = FluxKontextPipeline if kontext else FluxPipeline
    return _done(
        cls(
            scheduler=_flow(),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=_eval(transformer),
        )
    )


def _flow(**kwargs: Any) -> Any:
    FlowMatchEulerDiscreteScheduler = _diffusers("FlowMatchEulerDiscreteScheduler")

    return FlowMatchEulerDiscreteScheduler(**kwargs)


def _flux_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=_randn(g, 1, 8, 32),
        pooled_prompt_embeds=_randn(g, 1, 32),
        height=32,
        width=32,
        guidance_scale=3.5,
    )


def _flux_kontext_call(steps: int, seed: int = 0) -> dict[str, Any]:
    return {**_flux_call(steps, seed), "max_area": 32 * 32}


def _chroma(seed: int) -> Any:
    ChromaPipeline, ChromaTransformer2DModel = _diffusers("ChromaPipeline", "ChromaTransformer2DModel")

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=[4, 4, 8],
        approximator_hidden_dim=32,
        approximator_layers=1,
        approximator_num_channels=16,
    )
    return _done(
        ChromaPipeline(
            scheduler=_flow(), vae=None, text_encoder=None, tokenizer=None, transformer=_eval(transformer)
        )
    )


def _chroma_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=_randn(g, 1, 8, 32),
        negative_prompt_embeds=_randn(g, 1, 8, 32),
        prompt_attention_mask=_mask(8, torch.bool),
        negative_prompt_attention_mask=_mask(8, torch.bool),
        height=32,
        width=32,
        guidance_scale=5.0,
    )


def _qwenimage(seed: int) -> Any:
    QwenImagePipeline, QwenImageTransformer2DModel = _diffusers(
        "QwenImagePipeline", "QwenImageTransformer2DModel"
    )

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    return _done(
        QwenImagePipeline(
            scheduler=_flow(), vae=None, text_encoder=None, tokenizer=None, transformer=_eval(transformer)
        )
    )


def _qwenimage_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=_randn(g, 1, 8, 16),
        prompt_embeds_mask=_mask(8),
        negative_prompt_embeds=_randn(g, 1, 8, 16),
        negative_prompt_embeds_mask=_mask(8),
        true_cfg_scale=4.0,
        height=32,
        width=32,
    )


def _sd3(seed: int) -> Any:
    SD3Transformer2DModel, StableDiffusion3Pipeline = _diffusers(
        "SD3Transformer2DModel", "StableDiffusion3Pipeline"
    )

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    return _done(
        StableDiffusion3Pipeline(
            transformer=_eval(transformer),
            scheduler=_flow(),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
        )
    )


def _sd3_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=_randn(g, 1, 8, 32),
        negative_prompt_embeds=_randn(g, 1, 8, 32),
        pooled_prompt_embeds=_randn(g, 1, 64),
        negative_pooled_prompt_embeds=_randn(g, 1, 64),
        height=32,
        width=32,
        guidance_scale=5.0,
    )


def _hidream(seed: int) -> Any:
    HiDreamImagePipeline, HiDreamImageTransformer2DModel = _diffusers(
        "HiDreamImagePipeline", "HiDreamImageTransformer2DModel"
    )

    torch.manual_seed(seed)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[32, 16],
        text_emb_dim=64,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(32, 32),
        llama_layers=(0, 1),
    )
    pipe = HiDreamImagePipeline(
        scheduler=_flow(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        text_encoder_4=None,
        tokenizer_4=None,
        transformer=_eval(transformer),
    )
    pipe.default_sample_size = 4  # the pipeline rescales every request to this area (x8): 32x32
    return _done(pipe)


def _hidream_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds_t5=_randn(g, 1, 8, 32),
        negative_prompt_embeds_t5=_randn(g, 1, 8, 32),
        prompt_embeds_llama3=_randn(g, 2, 1, 8, 16),
        negative_prompt_embeds_llama3=_randn(g, 2, 1, 8, 16),
        pooled_prompt_embeds=_randn(g, 1, 64),
        negative_pooled_prompt_embeds=_randn(g, 1, 64),
        height=32,
        width=32,
        guidance_scale=5.0,
    )


def _lumina2(seed: int) -> Any:
    Lumina2Pipeline, Lumina2Transformer2DModel = _diffusers("Lumina2Pipeline", "Lumina2Transformer2DModel")

    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=4,
        hidden_size=8,
        num_layers=2,
        num_attention_heads=1,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2],
        cap_feat_dim=8,
        axes_lens=(32, 32, 32),  # RoPE tables sized for tiny inputs (the default 300x512x512 is slow)
    )
    return _done(
        Lumina2Pipeline(
            transformer=_eval(transformer), scheduler=_flow(), vae=None, text_encoder=None, tokenizer=None
        )
    )


def _lumina2_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=_randn(g, 1, 8, 8),
        prompt_attention_mask=_mask(8),
        negative_prompt_embeds=_randn(g, 1, 8, 8),
        negative_prompt_attention_mask=_mask(8),
        height=32,
        width=32,
        guidance_scale=5.0,
    )


def _sana(seed: int) -> Any:
    SanaPipeline, SanaTransformer2DModel = _diffusers("SanaPipeline", "SanaTransformer2DModel")

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=32,
    )
    return _done(
        SanaPipeline(
            tokenizer=None, text_encoder=None, vae=None, transformer=_eval(transformer), scheduler=_flow()
        )
    )


def _sana_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        negative_prompt=None,
        prompt_embeds=_randn(g, 1, 8, 8),
        prompt_attention_mask=_mask(8),
        negative_prompt_embeds=_randn(g, 1, 8, 8),
        negative_prompt_attention_mask=_mask(8),
        height=128,
        width=128,
        guidance_scale=4.5,
        use_resolution_binning=False,
    )


def _pixart_sigma(seed: int) -> Any:
    DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel = _diffusers(
        "DDIMScheduler", "PixArtSigmaPipeline", "PixArtTransformer2DModel"
    )

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return _done(
        PixArtSigmaPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            transformer=_eval(transformer),
            scheduler=DDIMScheduler(),
        )
    )


def _pixart_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        negative_prompt=None,
        prompt_embeds=_randn(g, 1, 8, 32),
        prompt_attention_mask=_mask(8),
        negative_prompt_embeds=_randn(g, 1, 8, 32),
        negative_prompt_attention_mask=_mask(8),
        height=64,
        width=64,
        guidance_scale=4.5,
        use_resolution_binning=False,
    )


def _cogview4(seed: int) -> Any:
    CogView4Pipeline, CogView4Transformer2DModel = _diffusers(
        "CogView4Pipeline", "CogView4Transformer2DModel"
    )

    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        out_channels=4,
        text_embed_dim=32,
        time_embed_dim=8,
        condition_dim=4,
    )
    scheduler = _flow(
        base_shift=0.25,
        max_shift=0.75,
        base_image_seq_len=256,
        use_dynamic_shifting=True,
        time_shift_type="linear",
    )
    return _done(
        CogView4Pipeline(
            tokenizer=None, text_encoder=None, vae=None, transformer=_eval(transformer), scheduler=scheduler
        )
    )


def _cogview4_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=_randn(g, 1, 16, 32),
        negative_prompt_embeds=_randn(g, 1, 16, 32),
        height=32,
        width=32,
        guidance_scale=6.0,
    )


def _auraflow(seed: int) -> Any:
    AuraFlowPipeline, AuraFlowTransformer2DModel = _diffusers(
        "AuraFlowPipeline", "AuraFlowTransformer2DModel"
    )

    torch.manual_seed(seed)
    transformer = AuraFlowTransformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        out_channels=4,
        pos_embed_max_size=256,
    )
    return _done(
        AuraFlowPipeline(
            tokenizer=None, text_encoder=None, vae=None, transformer=_eval(transformer), scheduler=_flow()
        )
    )


def _auraflow_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=_randn(g, 1, 8, 32),
        prompt_attention_mask=_mask(8),
        negative_prompt_embeds=_randn(g, 1, 8, 32),
        negative_prompt_attention_mask=_mask(8),
        height=32,
        width=32,
        guidance_scale=5.0,
    )


def _zimage(seed: int) -> Any:
    ZImagePipeline, ZImageTransformer2DModel = _diffusers("ZImagePipeline", "ZImageTransformer2DModel")

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # created with torch.empty: fixed so the output is defined
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    return _done(
        ZImagePipeline(
            scheduler=_flow(), vae=None, text_encoder=None, tokenizer=None, transformer=_eval(transformer)
        )
    )


def _zimage_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=[_randn(g, 8, 16)],
        negative_prompt_embeds=[_randn(g, 8, 16)],
        height=64,
        width=64,
        guidance_scale=3.0,
        cfg_normalization=False,
        cfg_truncation=1.0,
    )


class _NoGuardrail(torch.nn.Module):
    """Stands in for Cosmos' guardrail (a large model the pipeline insists on): lets all through,
    as diffusers' fast tests' dummy does."""

    _where: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_where", torch.zeros(1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._where.device

    @property
    def dtype(self) -> torch.dtype:
        return self._where.dtype

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: Any) -> Any:
        return frames


def _cosmos2(seed: int) -> Any:
    Cosmos2TextToImagePipeline, CosmosTransformer3DModel = _diffusers(
        "Cosmos2TextToImagePipeline", "CosmosTransformer3DModel"
    )
    torch.manual_seed(seed)
    transformer = CosmosTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2,
        text_embed_dim=32,
        adaln_lora_dim=4,
        max_size=(4, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False,  # True resizes the mask with torchvision, not a dependency here
        extra_pos_embed_type="learnable",
    )
    return _done(
        Cosmos2TextToImagePipeline(
            text_encoder=None,
            tokenizer=None,
            transformer=_eval(transformer),
            vae=None,
            scheduler=_flow(use_karras_sigmas=True),
            safety_checker=_NoGuardrail(),
        )
    )


def _cosmos2_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=_randn(g, 1, 8, 32),
        negative_prompt_embeds=_randn(g, 1, 8, 32),
        height=64,
        width=64,
        guidance_scale=3.0,
    )


# ---------------------------------------------------------------------------------- videos
def _wan_transformer(seed: int, cls_name: str = "WanTransformer3DModel") -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = _diffusers(cls_name)
    return _eval(
        cls(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=32,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
    )


def _wan(seed: int, two: bool = False) -> Any:
    WanPipeline = _diffusers("WanPipeline")

    return _done(
        WanPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            scheduler=_flow(shift=5.0),
            transformer=_wan_transformer(seed),
            transformer_2=_wan_transformer(seed + 1) if two else None,
            boundary_ratio=0.875 if two else None,
        )
    )


def _wan_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=_randn(g, 1, 8, 32),
        negative_prompt_embeds=_randn(g, 1, 8, 32),
        height=16,
        width=16,
        num_frames=5,
        guidance_scale=4.0,
    )


def _skyreels_v2(seed: int) -> Any:
    SkyReelsV2Pipeline, UniPCMultistepScheduler = _diffusers("SkyReelsV2Pipeline", "UniPCMultistepScheduler")

    return _done(
        SkyReelsV2Pipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            transformer=_wan_transformer(seed, "SkyReelsV2Transformer3DModel"),
            scheduler=UniPCMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0
            ),
        )
    )


def _hunyuan_video(seed: int) -> Any:
    HunyuanVideoPipeline, HunyuanVideoTransformer3DModel = _diffusers(
        "HunyuanVideoPipeline", "HunyuanVideoTransformer3DModel"
    )

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    return _done(
        HunyuanVideoPipeline(
            text_encoder=None,
            tokenizer=None,
            transformer=_eval(transformer),
            vae=None,
            scheduler=_flow(shift=7.0),
            text_encoder_2=None,
            tokenizer_2=None,
        )
    )


def _hunyuan_video_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=_randn(g, 1, 8, 16),
        pooled_prompt_embeds=_randn(g, 1, 8),
        prompt_attention_mask=_mask(8),
        height=16,
        width=16,
        num_frames=5,
        guidance_scale=4.5,
    )


def _cogvideox(seed: int) -> Any:
    CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler = _diffusers(
        "CogVideoXPipeline", "CogVideoXTransformer3DModel", "DDIMScheduler"
    )

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    return _done(
        CogVideoXPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            transformer=_eval(transformer),
            scheduler=DDIMScheduler(),
        )
    )


def _cogvideox_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=_randn(g, 1, 16, 32),
        negative_prompt_embeds=_randn(g, 1, 16, 32),
        height=16,
        width=16,
        num_frames=9,
        guidance_scale=6.0,
    )


def _ltx(seed: int) -> Any:
    LTXPipeline, LTXVideoTransformer3DModel = _diffusers("LTXPipeline", "LTXVideoTransformer3DModel")

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=32,
    )
    return _done(
        LTXPipeline(
            scheduler=_flow(), vae=None, text_encoder=None, tokenizer=None, transformer=_eval(transformer)
        )
    )


def _ltx_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=_randn(g, 1, 8, 32),
        prompt_attention_mask=_mask(8),
        negative_prompt_embeds=_randn(g, 1, 8, 32),
        negative_prompt_attention_mask=_mask(8),
        height=64,
        width=64,
        num_frames=9,
        guidance_scale=3.0,
    )


def _mochi(seed: int) -> Any:
    MochiPipeline, MochiTransformer3DModel = _diffusers("MochiPipeline", "MochiTransformer3DModel")

    torch.manual_seed(seed)
    transformer = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=12,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=32,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    )
    return _done(
        MochiPipeline(
            scheduler=_flow(), vae=None, text_encoder=None, tokenizer=None, transformer=_eval(transformer)
        )
    )


def _mochi_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        prompt_embeds=_randn(g, 1, 16, 32),
        prompt_attention_mask=_mask(16),
        negative_prompt_embeds=_randn(g, 1, 16, 32),
        negative_prompt_attention_mask=_mask(16),
        height=16,
        width=16,
        num_frames=7,
        guidance_scale=4.5,
    )


def _allegro(seed: int) -> Any:
    AllegroPipeline, AllegroTransformer3DModel, DDIMScheduler = _diffusers(
        "AllegroPipeline", "AllegroTransformer3DModel", "DDIMScheduler"
    )

    torch.manual_seed(seed)
    transformer = AllegroTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        cross_attention_dim=24,
        sample_width=8,
        sample_height=8,
        sample_frames=8,
        caption_channels=24,
    )
    return _done(
        AllegroPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            transformer=_eval(transformer),
            scheduler=DDIMScheduler(),
        )
    )


def _allegro_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        negative_prompt=None,
        prompt_embeds=_randn(g, 1, 8, 24),
        prompt_attention_mask=_mask(8),
        negative_prompt_embeds=_randn(g, 1, 8, 24),
        negative_prompt_attention_mask=_mask(8),
        height=16,
        width=16,
        num_frames=8,
        guidance_scale=5.0,
    )


def _latte(seed: int) -> Any:
    DDIMScheduler, LattePipeline, LatteTransformer3DModel = _diffusers(
        "DDIMScheduler", "LattePipeline", "LatteTransformer3DModel"
    )

    torch.manual_seed(seed)
    transformer = LatteTransformer3DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        video_length=2,
    )
    return _done(
        LattePipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            transformer=_eval(transformer),
            scheduler=DDIMScheduler(),
        )
    )


def _latte_call(steps: int, seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return _base(
        steps,
        seed,
        negative_prompt=None,
        prompt_embeds=_randn(g, 1, 8, 32),
        negative_prompt_embeds=_randn(g, 1, 8, 32),
        height=64,
        width=64,
        video_length=2,
        guidance_scale=5.0,
        enable_temporal_attentions=True,
        decode_chunk_size=1,
    )


# Where each family caches: F1B0 and the threshold/warm-up under which some of a 6-step request is
# cached (measured on the CPU; the table shows the counts).
_DEFAULT_CACHE: dict[str, Any] = {"residual_diff_threshold": 0.4, "max_warmup_steps": 2}

FAMILIES: tuple[FamilyCase, ...] = (
    FamilyCase("flux", "Flux", "FluxPipeline", "image", _flux, _flux_call, guidance="distilled"),
    FamilyCase(
        "flux_kontext",
        "Flux Kontext",
        "FluxKontextPipeline",
        "image",
        lambda seed: _flux(seed, kontext=True),
        _flux_kontext_call,
        guidance="distilled",
        notes="text-to-image call (no input image)",
    ),
    FamilyCase(
        "chroma",
        "Chroma",
        "ChromaPipeline",
        "image",
        _chroma,
        _chroma_call,
        cache={"residual_diff_threshold": 0.8, "max_warmup_steps": 1},
        guidance="separate",
        notes="cache-dit patch functor on the blocks: reset restores their forwards (was our defect)",
    ),
    FamilyCase(
        "qwenimage",
        "QwenImage",
        "QwenImagePipeline",
        "image",
        _qwenimage,
        _qwenimage_call,
        guidance="separate",
        notes="true_cfg_scale=4",
    ),
    FamilyCase(
        "sd3",
        "Stable Diffusion 3",
        "StableDiffusion3Pipeline",
        "image",
        _sd3,
        _sd3_call,
        guidance="batched",
        notes="mounted through cache-dit's StableDiffusion3 (pipeline-name) adapter",
    ),
    FamilyCase(
        "hidream",
        "HiDream",
        "HiDreamImagePipeline",
        "image",
        _hidream,
        _hidream_call,
        guidance="batched",
        second_size=(64, 32),  # the pipeline rescales to a fixed area: change the aspect instead
        notes="cache-dit patch functor on the blocks: reset restores their forwards (was our defect)",
    ),
    FamilyCase(
        "lumina2",
        "Lumina 2",
        "Lumina2Pipeline",
        "image",
        _lumina2,
        _lumina2_call,
        guidance="separate",
        notes="separate-CFG taken from the pipeline's name (a transformer-only mount hid it: ours)",
    ),
    FamilyCase("sana", "Sana", "SanaPipeline", "image", _sana, _sana_call, guidance="batched"),
    FamilyCase(
        "pixart_sigma",
        "PixArt Sigma",
        "PixArtSigmaPipeline",
        "image",
        _pixart_sigma,
        _pixart_call,
        guidance="batched",
    ),
    FamilyCase(
        "cogview4", "CogView4", "CogView4Pipeline", "image", _cogview4, _cogview4_call, guidance="separate"
    ),
    FamilyCase(
        "auraflow",
        "AuraFlow",
        "AuraFlowPipeline",
        "image",
        _auraflow,
        _auraflow_call,
        cache={"residual_diff_threshold": 1.5},
        guidance="batched",
    ),
    FamilyCase(
        "zimage",
        "Z-Image",
        "ZImagePipeline",
        "image",
        _zimage,
        _zimage_call,
        cache={"residual_diff_threshold": 0.8},
        guidance="batched",
    ),
    FamilyCase(
        "cosmos2",
        "Cosmos 2",
        "Cosmos2TextToImagePipeline",
        "image",
        _cosmos2,
        _cosmos2_call,
        guidance="separate",
        notes="guardrail replaced by a pass-through module; concat_padding_mask off (needs torchvision)",
    ),
    FamilyCase("wan21", "Wan 2.1", "WanPipeline", "video", _wan, _wan_call, guidance="separate"),
    FamilyCase(
        "wan22",
        "Wan 2.2",
        "WanPipeline",
        "video",
        lambda seed: _wan(seed, two=True),
        _wan_call,
        guidance="separate",
        notes="two transformers, boundary_ratio=0.875",
    ),
    FamilyCase(
        "skyreels_v2",
        "SkyReels V2",
        "SkyReelsV2Pipeline",
        "video",
        _skyreels_v2,
        _wan_call,
        guidance="separate",
    ),
    FamilyCase(
        "hunyuan_video",
        "HunyuanVideo",
        "HunyuanVideoPipeline",
        "video",
        _hunyuan_video,
        _hunyuan_video_call,
        guidance="distilled",
    ),
    FamilyCase(
        "cogvideox",
        "CogVideoX",
        "CogVideoXPipeline",
        "video",
        _cogvideox,
        _cogvideox_call,
        guidance="batched",
    ),
    FamilyCase("ltx", "LTX-Video", "LTXPipeline", "video", _ltx, _ltx_call, guidance="batched"),
    FamilyCase("mochi", "Mochi", "MochiPipeline", "video", _mochi, _mochi_call, guidance="batched"),
    FamilyCase("allegro", "Allegro", "AllegroPipeline", "video", _allegro, _allegro_call, guidance="batched"),
    FamilyCase(
        "latte",
        "Latte",
        "LattePipeline",
        "video",
        _latte,
        _latte_call,
        guidance="batched",
        refused="cache-dit 1.5.3 registers no adapter for Latte (cache-dit's scope): "
        "refused at mount_cache; served with LifecyclePolicy(cache_dit=False)",
    ),
)


# The slowest families on a 2-core CPU (compile dominates): pytest marks them ``slow``.
_SLOW_ON_CPU = frozenset(
    {"hidream", "lumina2", "zimage", "sana", "cogview4", "allegro", "auraflow", "mochi", "cosmos2"}
)
FAMILIES = tuple(dataclasses.replace(f, slow=f.key in _SLOW_ON_CPU) for f in FAMILIES)


def case(key: str) -> FamilyCase:
    for family in FAMILIES:
        if family.key == key:
            return family
    raise KeyError(f"no family {key!r}; known: {', '.join(f.key for f in FAMILIES)}")


def cache_config(family: FamilyCase, num_inference_steps: int | None = SERVING_STEPS) -> Any:
    """The family's ``cache_dit.DBCacheConfig`` (F1B0)."""
    from adapters import CacheDitAdapter

    settings = {**_DEFAULT_CACHE, **family.cache}
    return CacheDitAdapter().make_config(
        Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=num_inference_steps, **settings
    )


def output_of(result: Any) -> torch.Tensor:
    """The latents a pipeline call returned (``images`` or ``frames``), as one tensor."""
    output = result.images if hasattr(result, "images") else result.frames
    if isinstance(output, (list, tuple)):
        return torch.stack([torch.as_tensor(o) for o in output])
    return output if isinstance(output, torch.Tensor) else torch.as_tensor(output)


# ---------------------------------------------------------------------------------- the story
@dataclass
class FamilyResult:
    """What ``run_family`` measured for one family (JSON-serialisable through ``as_dict``)."""

    key: str
    family: str
    pipeline_class: str
    members: list[str] = field(default_factory=list)
    guidance: str = "none"
    separate_cfg: dict[str, bool] = field(default_factory=dict)
    # Per request (3), per member: cached steps and dynamo graphs compiled during it.
    cached_steps: list[dict[str, int]] = field(default_factory=list)
    cfg_cached_steps: list[dict[str, int]] = field(default_factory=list)
    new_graphs: list[dict[str, int]] = field(default_factory=list)
    identical_outputs: bool = False
    # A request at a second resolution no warm-up saw: under on_unwarmed="eager" (its output
    # shape, and graphs compiled per member), then under "fail" (the error's type); then one
    # more request at the first resolution, compared with the first request.
    first_shape: list[int] = field(default_factory=list)
    second_shape: list[int] = field(default_factory=list)
    second_new_graphs: dict[str, int] = field(default_factory=dict)
    second_fail_error: str | None = None
    shape_misses: int = 0
    first_again_identical: bool = False
    first_again_new_graphs: dict[str, int] = field(default_factory=dict)
    # The first request against a never-warmed pipeline of the same seed with the same mount
    # (cache-dit on, not compiled): what warm-up must not change.
    first_vs_unwarmed_max_abs_diff: float = float("nan")
    warmed_up: bool = False
    reset_state: str = ""
    reset_matches_unmanaged: bool = False
    reset_max_abs_diff: float = float("nan")
    refused_error: str | None = None  # type name of the up-front error, for a refused family
    refused_message: str | None = None
    refused_at: str | None = None  # the trigger that refused
    notes: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _separate_cfg(member: Any) -> bool:
    """Whether the member's live cache-dit context runs guidance as separate cond/uncond calls."""
    module = member.module
    manager = getattr(module, "_context_manager", None)
    names = getattr(module, "_context_names", None) or []
    if manager is None or not names:
        return False
    return bool(getattr(manager.get_context(names[0]).cache_config, "enable_separate_cfg", False))


def run_family(family: FamilyCase, *, compile_backend: str = "aot_eager", requests: int = 3) -> FamilyResult:
    """The whole serving story of one family through ``PipelineLifecycle.from_diffusers``:
    construction, ``prepare`` with a ``WARMUP_STEPS``-step call, ``requests`` identical requests
    of ``SERVING_STEPS`` steps, ``reset``, then one call compared with a never-managed pipeline
    built from the same seed. A ``refused`` family must be refused before warm-up with a typed
    error; it is then served the way the error names, ``LifecyclePolicy(cache_dit=False)``."""
    import time

    from adapters import CacheDitAdapter
    from lifecycle._errors import LifecycleError, PipelineError
    from lifecycle._pipeline import PipelineLifecycle
    from states import LifecyclePolicy, State

    started = time.perf_counter()
    result = FamilyResult(
        family.key, family.family, family.pipeline_class, guidance=family.guidance, notes=family.notes
    )
    compile_options = {"backend": compile_backend}
    pipe = family.build(0)
    if type(pipe).__name__ != family.pipeline_class:
        raise AssertionError(f"{family.key}: built {type(pipe).__name__}, expected {family.pipeline_class}")
    policy = LifecyclePolicy()
    plc = PipelineLifecycle.from_diffusers(
        pipe, policy=policy, backend="cpu", cache_config=cache_config(family), compile_options=compile_options
    )
    result.members = list(plc.members)

    def warm(p: Any) -> object:
        return p(**family.call(steps=WARMUP_STEPS))

    if family.refused is not None:
        try:
            plc.prepare(warm, num_inference_steps=SERVING_STEPS)
        except LifecycleError as exc:
            cause = exc.__cause__ if isinstance(exc, PipelineError) and exc.__cause__ is not None else exc
            result.refused_error = type(cause).__name__
            result.refused_message = str(cause)
            result.refused_at = str(getattr(getattr(cause, "trigger", None), "value", None))
        else:
            raise AssertionError(f"{family.key}: expected to be refused, but prepare succeeded")
        plc.reset()
        pipe = family.build(0)
        policy = LifecyclePolicy(cache_dit=False)
        plc = PipelineLifecycle.from_diffusers(
            pipe, policy=policy, backend="cpu", compile_options=compile_options
        )
    plc.prepare(warm, num_inference_steps=SERVING_STEPS)
    result.warmed_up = plc.state is State.WARMED_UP
    result.separate_cfg = {n: _separate_cfg(m) for n, m in plc.members.items()} if policy.cache_dit else {}

    outputs = []
    for index in range(requests):
        with plc.request(num_inference_steps=SERVING_STEPS, request_id=f"{family.key}-{index}") as records:
            outputs.append(output_of(pipe(**family.call(steps=SERVING_STEPS))))
        result.cached_steps.append({n: r.cached_steps for n, r in records.items()})
        result.cfg_cached_steps.append({n: r.cfg_cached_steps for n, r in records.items()})
        result.new_graphs.append({n: r.new_graphs for n, r in records.items()})
    result.identical_outputs = all(torch.equal(out, outputs[0]) for out in outputs[1:])

    _second_resolution(family, plc, pipe, outputs[0], result)

    unwarmed = family.build(0)
    if policy.cache_dit:
        adapter = CacheDitAdapter(type(unwarmed).__name__)
        for name in plc.members:
            adapter.mount(getattr(unwarmed, name), cache_config(family))
    first = output_of(unwarmed(**family.call(steps=SERVING_STEPS)))
    if first.shape == outputs[0].shape:
        result.first_vs_unwarmed_max_abs_diff = float((first - outputs[0]).abs().max())

    plc.reset()
    result.reset_state = plc.state.value
    after = output_of(pipe(**family.call(steps=SERVING_STEPS)))
    reference = output_of(family.build(0)(**family.call(steps=SERVING_STEPS)))
    result.reset_matches_unmanaged = after.shape == reference.shape and torch.equal(after, reference)
    if after.shape == reference.shape:
        result.reset_max_abs_diff = float((after - reference).abs().max())
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _second_resolution(
    family: FamilyCase, plc: Any, pipe: Any, first: torch.Tensor, result: FamilyResult
) -> None:
    """The unwarmed-shape policy at a second resolution, then the first resolution again."""
    from lifecycle._errors import UnwarmedShapeError
    from lifecycle.testing import capture_audit

    first_call = family.call(steps=SERVING_STEPS)
    height, width = family.second_size or (first_call["height"] * 2, first_call["width"] * 2)
    overrides: dict[str, Any] = {"height": height, "width": width}
    if "max_area" in first_call:  # Flux Kontext rescales every request to this area
        overrides["max_area"] = height * width
    second = first_call | overrides
    result.first_shape = list(first.shape)
    with capture_audit() as events:
        with plc.request(num_inference_steps=SERVING_STEPS, on_unwarmed="eager") as records:
            result.second_shape = list(output_of(pipe(**second)).shape)
        result.second_new_graphs = {n: r.new_graphs for n, r in records.items()}
        try:
            with plc.request(num_inference_steps=SERVING_STEPS, on_unwarmed="fail"):
                pipe(**family.call(steps=SERVING_STEPS) | overrides)
        except UnwarmedShapeError as exc:
            result.second_fail_error = type(exc).__name__
        result.shape_misses = len([e for e in events if e.get("event") == "lifecycle.shape_miss"])
    with plc.request(num_inference_steps=SERVING_STEPS) as records:
        again = output_of(pipe(**family.call(steps=SERVING_STEPS)))
    result.first_again_identical = torch.equal(again, first)
    result.first_again_new_graphs = {n: r.new_graphs for n, r in records.items()}


# ---------------------------------------------------------------------------------- the table
TABLE_BEGIN = "<!-- families-table:begin (generated by scripts/families_table.py; do not edit) -->"
TABLE_END = "<!-- families-table:end -->"
_HEADER = (
    "| family | pipeline class | transformers managed | guidance mode | cached steps seen | "
    "0 new graphs | identical outputs | notes |"
)


def _guidance_cell(result: FamilyResult) -> str:
    if result.refused_error is not None:
        return f"{result.guidance} (cache off)"
    separate = sorted({v for v in result.separate_cfg.values()})
    mode = "separate-CFG" if separate == [True] else "not separate-CFG"
    return f"{mode} ({result.guidance})"


def _cached_cell(result: FamilyResult) -> str:
    if result.refused_error is not None:
        return "n/a (refused)"
    first = result.cached_steps[0] if result.cached_steps else {}
    counts = [f"{n}: {c}" for n, c in first.items()] if len(first) > 1 else [str(v) for v in first.values()]
    return f"{', '.join(counts)} of {SERVING_STEPS}"


def table_row(result: FamilyResult) -> str:
    zero = all(v == 0 for graphs in result.new_graphs for v in graphs.values()) and bool(result.new_graphs)
    ok = result.warmed_up and zero and result.identical_outputs and result.reset_matches_unmanaged
    notes = [result.notes] if result.notes else []
    if result.refused_error is not None:
        notes.append(
            f"no adapter in cache-dit (cache-dit's scope, not ours): {result.refused_error} at "
            f"{result.refused_at}; served with LifecyclePolicy(cache_dit=False)"
        )
    compiled = sum(result.second_new_graphs.values())
    if compiled:
        notes.append(
            f"unwarmed-shape gap (ours): the second resolution compiled {compiled} graphs under "
            "on_unwarmed='eager' (list-of-tensor inputs are not sized)"
        )
    if not result.reset_matches_unmanaged:
        notes.append(f"after reset differs from an unmanaged pipeline (max {result.reset_max_abs_diff:.2e})")
    status = "" if ok else "**FAILS** "
    cells = [
        result.family,
        f"`{result.pipeline_class}`",
        ", ".join(f"`{m}`" for m in result.members),
        _guidance_cell(result),
        _cached_cell(result),
        "yes" if zero else "**no**",
        "yes" if result.identical_outputs else "**no**",
        status + "; ".join(notes),
    ]
    return "| " + " | ".join(cells) + " |"


def render_table(results: list[FamilyResult]) -> str:
    """The README's "Supported pipelines" table, in ``FAMILIES`` order, with the closing counts."""
    order = {f.key: i for i, f in enumerate(FAMILIES)}
    rows = sorted(results, key=lambda r: order.get(r.key, len(order)))
    served = [r for r in rows if r.refused_error is None]
    passing = [r for r in served if "**" not in table_row(r)]
    images = sum(1 for r in passing if case(r.key).modality == "image")
    lines = [_HEADER, "|" + "---|" * 8]
    lines += [table_row(r) for r in rows]
    lines.append("")
    lines.append(
        f"{len(rows)} families tried: {len(passing)} served with cache-dit and compile end to end "
        f"({images} image, {len(passing) - images} video), {len(rows) - len(served)} refused up front "
        f"by a typed error, {len(served) - len(passing)} failing. Tiny pipelines with random weights "
        f"(`tests/families.py`), CPU, `aot_eager`, {WARMUP_STEPS}-step warm-up, "
        f"{SERVING_STEPS}-step requests, F1B0 DBCache."
    )
    return "\n".join(lines)


def readme_table(readme_text: str) -> str:
    """The generated part of a README: what lies between the two markers."""
    begin = readme_text.index(TABLE_BEGIN) + len(TABLE_BEGIN)
    return readme_text[begin : readme_text.index(TABLE_END)].strip("\n")


def with_table(readme_text: str, table: str) -> str:
    begin = readme_text.index(TABLE_BEGIN) + len(TABLE_BEGIN)
    return readme_text[:begin] + "\n" + table + "\n" + readme_text[readme_text.index(TABLE_END) :]
