"""The text-to-image parts of ``bafm train``: diffusers backbone, text SideNet, data checks.

``bafm train`` runs the same Lightning module, chain loss, EMA, resume rules and callbacks for
SD3/Flux as for SiT; only what is built differs. With ``backbone.source`` ``sd3`` or ``flux``
the backbone is the pipeline's transformer (``bafm.models.diffusers_flow``), the SideNet is a
``TextSideNet`` conditioned on the pooled text embedding, and the module gets the dataset's
unconditional encoding for conditioning dropout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

from bafm.models.diffusers_flow import FlowTransformerBackbone, load_flow_transformer
from bafm.models.text_sidenet import TextSideNet, save_text_sidenet

TEXT_SOURCES = ("sd3", "flux")


def is_text_to_image(cfg: Any) -> bool:
    """Whether the experiment's backbone is a diffusers text-to-image transformer."""
    return str(cfg.backbone.source) in TEXT_SOURCES


def backbone_dtype(cfg: Any) -> torch.dtype:
    """bfloat16 weights where training runs in bf16 on a GPU (FLUX.1-dev's 12 B parameters are 48 GB in
    float32), else float32."""
    tc = cfg.trainer
    on_gpu = tc.accelerator in ("gpu", "cuda") or (tc.accelerator == "auto" and torch.cuda.is_available())
    bf16 = str(tc.precision) in ("bf16-mixed", "bf16-true", "bf16") or str(tc.precision) == "auto"
    return torch.bfloat16 if on_gpu and bf16 else torch.float32


def load_text_backbone(cfg: Any) -> FlowTransformerBackbone:
    """The frozen SD3/Flux transformer of ``backbone.path`` (loaded on the CPU; Lightning moves it)."""
    bc = cfg.backbone
    return load_flow_transformer(bc.path, str(bc.source), dtype=backbone_dtype(cfg),
                                 distilled_guidance=float(bc.guidance))  # fmt: skip


def build_text_sidenet(cfg: Any, backbone: FlowTransformerBackbone) -> TextSideNet:
    """The trainable ``TextSideNet`` of ``cfg.sidenet``, sized for ``backbone``'s latents and pooled width."""
    sc = cfg.sidenet
    sidenet = TextSideNet(in_channels=backbone.in_channels, pooled_dim=backbone.pooled_dim, channels=sc.channels,
                          emb_dim=sc.emb_dim, depth=sc.depth, num_heads=sc.num_heads,
                          patch_size=sc.patch_size)  # fmt: skip
    return sidenet.to(memory_format=torch.channels_last) if sc.channels_last else sidenet


def check_text_data(backbone: FlowTransformerBackbone, manifest: Dict[str, Any], what: str) -> None:
    """Fail before the first step if the shards were not made for this backbone.

    Raises:
        ValueError: shards without prompt embeddings, or latents / embeddings of other shapes,
            naming both sides.
    """
    extra = manifest.get("extra_arrays", {})
    if "prompt_embeds.npy" not in extra or "pooled.npy" not in extra:
        raise ValueError(f"the data ({what}) hold no prompt embeddings; write them with `bafm data` and "
                         "data.source=captions for this backbone")
    channels, height, width = manifest["latent_shape"]
    multiple = backbone.spatial_multiple
    if channels != backbone.in_channels or height % multiple or width % multiple:
        raise ValueError(f"latent shape mismatch: the data ({what}) has latents {tuple(manifest['latent_shape'])} "
                         f"but the {backbone.family} backbone takes {backbone.in_channels} channels with sides "
                         f"divisible by {multiple}; check data.* and backbone.path")
    (text_dim,), (pooled_dim,) = extra["prompt_embeds.npy"][1:], extra["pooled.npy"]
    if (text_dim, pooled_dim) != (backbone.text_dim, backbone.pooled_dim):
        raise ValueError(f"prompt embedding mismatch: the data ({what}) has text width {text_dim} and pooled width "
                         f"{pooled_dim}, the {backbone.family} backbone takes {backbone.text_dim} and "
                         f"{backbone.pooled_dim}; encode the captions with this backbone's pipeline")


def export_text_sidenet(sidenet: nn.Module, path: Path, cfg: Any) -> Path:
    """Export the EMA ``TextSideNet`` with the backbone it was trained beside."""
    return save_text_sidenet(sidenet, path, {"backbone": str(cfg.backbone.path),
                                             "backbone_family": str(cfg.backbone.source)})  # fmt: skip
