"""SD3-medium and FLUX.1-dev at their real sizes, built from their configs (no weights, no network).

The configs are the ``config.json`` files of the public diffusers repositories
(``stabilityai/stable-diffusion-3-medium-diffusers``, ``black-forest-labs/FLUX.1-dev``): the
transformer, the VAE and the text encoders. Models are built on the ``meta`` device for FLOP
and parameter counts, or with random weights on a GPU for timings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch
from torch import nn

from bafm.models.text_condition import TextCondition
from bafm.models.text_sidenet import TextSideNet

SD3_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                              num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                              pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)  # fmt: skip
FLUX1_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                             guidance_embeds=True, axes_dims_rope=[16, 56, 56])  # fmt: skip
# 16-channel VAE of SD3 and FLUX.1 (same architecture, different weights).
VAE_16CH = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              vocab_size=49408, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")  # fmt: skip
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)  # fmt: skip
# CLIP ViT-L/14 (openai/clip-vit-large-patch14), the CLIP score's model in the T2I sweep.
CLIP_VIT_L14 = dict(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, max_position_embeddings=77, vocab_size=49408),
                    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, patch_size=14, image_size=224),
                    projection_dim=768)  # fmt: skip
# The release SideNet's widths (channels 256, embedding 256, depth 4) on 2x2 latent patches, as in
# experiments/sd3_medium.yaml and flux1_dev.yaml.
SIDENET_RELEASE = dict(channels=256, emb_dim=256, depth=4, num_heads=4, frequency_dim=256, patch_size=2)


@dataclass(frozen=True)
class T2ISize:
    """One text-to-image backbone at one resolution.

    Attributes:
        name: label in results.
        family: ``"sd3"`` or ``"flux"``.
        transformer: diffusers transformer config.
        latent: unpacked latent shape ``(C, H, W)``.
        text_tokens: length ``L`` of the prompt embeddings (SD3: 77 CLIP + 256 T5; Flux: 512 T5).
        text_dim: width ``D`` of the prompt embeddings.
        pooled_dim: width ``P`` of the pooled embedding.
        cfg: whether the pipeline's default sampling doubles the batch (SD3's CFG; FLUX.1-dev's
            guidance is an input, one branch).
        encoders: text encoder configs (name -> (kind, config)).
    """

    name: str
    family: str
    transformer: Dict[str, Any]
    latent: Tuple[int, int, int]
    text_tokens: int
    text_dim: int
    pooled_dim: int
    cfg: bool
    encoders: Dict[str, Tuple[str, Dict[str, Any]]] = field(default_factory=dict)


SIZES = {
    "sd3-medium-1024": T2ISize("sd3-medium-1024", "sd3", SD3_MEDIUM_TRANSFORMER, (16, 128, 128), 77 + 256, 4096, 2048,
                               True, {"clip_l": ("clip", CLIP_L), "clip_g": ("clip", CLIP_G),
                                      "t5_xxl": ("t5", T5_XXL)}),
    "flux1-dev-1024": T2ISize("flux1-dev-1024", "flux", FLUX1_DEV_TRANSFORMER, (16, 128, 128), 512, 4096, 768, False,
                              {"clip_l": ("clip", CLIP_L), "t5_xxl": ("t5", T5_XXL)}),
}  # fmt: skip
# The same code paths at the sizes of diffusers' pipeline tests, to check the scripts on a CPU.
TINY_SIZES = {
    "tiny-sd3": T2ISize("tiny-sd3", "sd3", dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                        pooled_projection_dim=64, out_channels=4), (4, 16, 16), 7, 32, 64, True),
    "tiny-flux": T2ISize("tiny-flux", "flux", dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                         axes_dims_rope=[4, 4, 8], guidance_embeds=True), (1, 16, 16), 7, 32, 32, False),
}  # fmt: skip


def build_transformer(size: T2ISize, device: torch.device | str = "meta",
                      dtype: torch.dtype = torch.bfloat16) -> nn.Module:  # fmt: skip
    """The diffusers transformer of ``size`` (random weights; none at all on ``meta``)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if size.family == "sd3" else FluxTransformer2DModel
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in ``dtype``: FLUX.1-dev in float32 would need 48 GB first
    try:
        with torch.device(device):
            model = cls(**size.transformer)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def build_sidenet(size: T2ISize, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32,
                  **overrides: Any) -> TextSideNet:  # fmt: skip
    """The experiments' text SideNet for ``size``'s latents and pooled embedding (``overrides``: its fields)."""
    with torch.device(device):
        net = TextSideNet(in_channels=size.latent[0], pooled_dim=size.pooled_dim, **{**SIDENET_RELEASE, **overrides})
    return net.to(dtype=dtype)


def build_encoder(kind: str, config: Dict[str, Any]) -> nn.Module:
    """A text encoder on the meta device (parameter counts only)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        if kind == "clip":
            return CLIPTextModelWithProjection(CLIPTextConfig(**config))
        return T5EncoderModel(T5Config(**config))


def build_clip_scorer() -> nn.Module:
    """CLIP ViT-L/14 on the meta device (parameter count only)."""
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        return CLIPModel(CLIPConfig(**CLIP_VIT_L14))


def build_vae() -> nn.Module:
    """The 16-channel VAE on the meta device (parameter count only)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**VAE_16CH)


def inputs(size: T2ISize, batch: int, device: torch.device | str = "meta",
           dtype: torch.dtype = torch.bfloat16) -> Tuple[torch.Tensor, torch.Tensor, TextCondition]:  # fmt: skip
    """Random latents ``(B, C, H, W)``, times ``(B,)`` and a condition of ``batch`` rows."""
    x = torch.randn(batch, *size.latent, device=device, dtype=dtype)
    t = torch.rand(batch, device=device, dtype=dtype)
    cond = TextCondition(torch.randn(batch, size.text_tokens, size.text_dim, device=device, dtype=dtype),
                         torch.randn(batch, size.pooled_dim, device=device, dtype=dtype))  # fmt: skip
    return x, t, cond


def parameter_count(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
