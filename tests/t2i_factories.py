"""Tiny random SD3 / Flux transformers, VAEs and pipelines, built locally (no network, milliseconds).

The transformer configs are those of diffusers' own pipeline tests. Pipelines are built with
every text encoder and tokenizer set to None and run from given prompt embeddings.
"""

from typing import Dict, Tuple

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from bafm.models.text_condition import TextCondition

SD3_CONFIG = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                  pooled_projection_dim=64, out_channels=4)  # fmt: skip
FLUX_CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   axes_dims_rope=[4, 4, 8])  # fmt: skip
TEXT_TOKENS = 7  # length L of the test prompt embeddings


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise on every weight: zero-initialised modulation/output layers would make the field trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval()


def tiny_sd3_transformer(seed: int = 0) -> SD3Transformer2DModel:
    """SD3 transformer of diffusers' pipeline tests: 4 latent channels, pooled width 64, text width 32."""
    torch.manual_seed(seed)
    return _perturb(SD3Transformer2DModel(**SD3_CONFIG), seed)


def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = False) -> FluxTransformer2DModel:
    """Flux transformer of diffusers' pipeline tests (4 packed features = 1 latent channel);
    ``guidance_embeds`` gives it FLUX.1-dev's distilled guidance input."""
    torch.manual_seed(seed)
    return _perturb(FluxTransformer2DModel(**FLUX_CONFIG, guidance_embeds=guidance_embeds), seed)


def tiny_vae(latent_channels: int, seed: int = 0) -> AutoencoderKL:
    """One-block ``AutoencoderKL`` (no downsampling: ``vae_scale_factor`` 1)."""
    torch.manual_seed(seed)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                         scaling_factor=1.5035).eval()  # fmt: skip


def tiny_sd3_pipeline(seed: int = 0, shift: float = 3.0) -> StableDiffusion3Pipeline:
    """SD3 pipeline with the tiny transformer and VAE, no text encoders (run it from embeddings)."""
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed), vae=tiny_vae(4, seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = False) -> FluxPipeline:
    """Flux pipeline with the tiny transformer and VAE and FLUX.1's dynamic-shift scheduler."""
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
    return FluxPipeline(
        transformer=tiny_flux_transformer(seed, guidance_embeds), vae=tiny_vae(1, seed), scheduler=scheduler,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip


def text_condition(batch: int, text_dim: int, pooled_dim: int, seed: int) -> TextCondition:
    """Random prompt embeddings ``(B, L, D)`` and pooled embedding ``(B, P)``."""
    gen = torch.Generator().manual_seed(seed)
    return TextCondition(torch.randn(batch, TEXT_TOKENS, text_dim, generator=gen),
                         torch.randn(batch, pooled_dim, generator=gen))  # fmt: skip


def pipeline_embeddings(cond: TextCondition, negative: TextCondition = None) -> Dict[str, torch.Tensor]:
    """The keyword arguments a pipeline takes for given embeddings."""
    kwargs = dict(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled)
    if negative is not None:
        kwargs.update(negative_prompt_embeds=negative.prompt_embeds, negative_pooled_prompt_embeds=negative.pooled)
    return kwargs


def sd3_conditions(batch: int, seed: int = 1) -> Tuple[TextCondition, TextCondition]:
    """Prompt and negative-prompt embeddings for the tiny SD3 transformer."""
    return text_condition(batch, 32, 64, seed), text_condition(batch, 32, 64, seed + 100)


def flux_condition(batch: int, seed: int = 1) -> TextCondition:
    """Prompt embeddings for the tiny Flux transformer."""
    return text_condition(batch, 32, 32, seed)
