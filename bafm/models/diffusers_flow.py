"""diffusers' text-to-image flow transformers (SD3/SD3.5, FLUX.1) as frozen bafm backbones.

Both families share the project's time convention: their sigma is our ``t``
(``x_t = (1 - t) x_0 + t noise``) and they predict ``v = noise - x_0``. What differs is adapted
here, once:

* the timestep each transformer expects: SD3 takes ``1000 t`` (the scheduler's ``timesteps``);
  Flux takes ``t`` and scales it by 1000 itself (``FluxPipeline`` passes ``timesteps / 1000``);
* Flux's 2x2 latent packing: its transformer reads ``(B, H/2 * W/2, 4 C)`` tokens with
  per-token image ids ``(0, row, col)`` and all-zero text ids; bafm's state stays
  ``(B, C, H, W)``, so solvers and the SideNet see the same layout for both families;
* FLUX.1-dev's distilled guidance, an input of the transformer (not two branches): held here as
  ``distilled_guidance`` and passed on every call (FLUX.1-schnell and SD3 have no such input).

Classifier-free guidance with a negative prompt and each pipeline's time grid live in the
sampling closure (``bafm.models.text_sampling``) and ``bafm.solvers.grids`` (``sd3``, ``flux``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from bafm.models.checkpoint_io import CheckpointError
from bafm.models.text_condition import TextCondition

# family -> diffusers transformer class name
FAMILIES = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
# SD3's transformer is conditioned on the scheduler's timesteps, ``1000 * sigma``.
SD3_TIMESTEP_SCALE = 1000.0


def pack_latents(x: Tensor) -> Tensor:
    """Flux's tokens: each 2x2 patch of ``(B, C, H, W)`` latents becomes one ``4 C`` token.

    Returns:
        ``(B, H/2 * W/2, 4 C)``, tokens row-major over the patch grid, features ``(c, dy, dx)``.
    """
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of ``pack_latents``: ``(B, H/2 * W/2, 4 C)`` tokens back to ``(B, C, H, W)``."""
    b, _, features = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, features // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Flux's rotary position ids of the packed image tokens: ``(0, row, col)`` per token.

    Args:
        height: latent height ``H`` (tokens have ``H / 2`` rows).
        width: latent width ``W``.

    Returns:
        ``(H/2 * W/2, 3)``.
    """
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([torch.zeros_like(grid_r), grid_r, grid_c], dim=-1).reshape(-1, 3)


class FlowTransformerBackbone(nn.Module):
    """A frozen SD3 or Flux transformer with ``velocity(x, t, cond)`` in the project convention.

    Attributes:
        transformer: the diffusers model (frozen, eval mode).
        family: ``"sd3"`` or ``"flux"``.
        in_channels: channels ``C`` of the unpacked latents ``(B, C, H, W)``.
        pooled_dim: width ``P`` of the pooled text embedding.
        text_dim: width ``D`` of the token embeddings the transformer reads.
        distilled_guidance: FLUX.1-dev's guidance input, or None for a model without one.
    """

    def __init__(self, transformer: nn.Module, family: str, distilled_guidance: float = 3.5) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family is '{family}', expected one of: {', '.join(FAMILIES)}")
        if type(transformer).__name__ != FAMILIES[family]:
            raise ValueError(f"a '{family}' backbone wraps a {FAMILIES[family]}, got {type(transformer).__name__}")
        self.transformer = transformer.eval().requires_grad_(False)
        self.family = family
        config = transformer.config
        # Flux's in_channels counts packed features (4 per latent channel).
        self.in_channels = int(config.in_channels) // (4 if family == "flux" else 1)
        self.pooled_dim = int(config.pooled_projection_dim)
        self.text_dim = int(config.joint_attention_dim)
        has_guidance_input = family == "flux" and bool(getattr(config, "guidance_embeds", False))
        self.distilled_guidance = float(distilled_guidance) if has_guidance_input else None
        # The spatial multiple latents must have: SD3's patch size, Flux's 2x2 packing.
        self.spatial_multiple = 2 if family == "flux" else int(config.patch_size)
        self.requires_grad_(False).eval()

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the transformer's weights (inputs are cast to it, outputs back)."""
        return next(self.transformer.parameters()).dtype

    def _check(self, x: Tensor, cond: TextCondition) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.family} backbone takes latents (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[-2] % self.spatial_multiple or x.shape[-1] % self.spatial_multiple:
            raise ValueError(
                f"{self.family} latents need H and W divisible by {self.spatial_multiple}, got {tuple(x.shape[-2:])}"
            )
        if cond.pooled.shape != (x.shape[0], self.pooled_dim) or cond.prompt_embeds.shape[0] != x.shape[0]:
            raise ValueError(
                f"{self.family} backbone: condition of pooled {tuple(cond.pooled.shape)} and prompt embeds "
                f"{tuple(cond.prompt_embeds.shape)} for latents of batch {x.shape[0]} (pooled width {self.pooled_dim})"
            )

    def velocity(self, x: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        """``v = noise - x_0`` at ``(x, t)``.

        Args:
            x: latents ``(B, C, H, W)`` (already scaled/shifted as the pipeline's latents are).
            t: times ``(B,)`` in ``[0, 1]`` (1 = noise).
            cond: prompt embeddings ``(B, L, D)`` and pooled embedding ``(B, P)``.

        Returns:
            ``(B, C, H, W)`` velocity in ``x``'s dtype.
        """
        self._check(x, cond)
        dtype = self.dtype
        t = t.to(device=x.device, dtype=dtype).expand(x.shape[0])
        text = cond.prompt_embeds.to(dtype)
        pooled = cond.pooled.to(dtype)
        if self.family == "sd3":
            out = self.transformer(
                hidden_states=x.to(dtype), timestep=t * SD3_TIMESTEP_SCALE, encoder_hidden_states=text,
                pooled_projections=pooled, return_dict=False,
            )[0]  # fmt: skip
            return out.to(x.dtype)
        height, width = x.shape[-2:]
        guidance = None
        if self.distilled_guidance is not None:
            guidance = torch.full((x.shape[0],), self.distilled_guidance, device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack_latents(x.to(dtype)),  # (B, H/2 * W/2, 4 C)
            timestep=t,  # Flux's transformer multiplies by 1000 itself
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=dtype),
            img_ids=image_ids(height, width, x.device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width).to(x.dtype)


def _transformer_class(family: str) -> type:
    import diffusers

    if family not in FAMILIES:
        raise CheckpointError(f"backbone family is '{family}', expected one of: {', '.join(FAMILIES)}")
    return getattr(diffusers, FAMILIES[family])


def _local_subfolder(path: Path, subfolder: str) -> str:
    """The subfolder of a local pipeline folder holding the transformer ('' for a transformer folder)."""
    if (path / subfolder / "config.json").is_file():
        return subfolder
    if (path / "config.json").is_file():
        return ""
    raise CheckpointError(
        f"{path}: no transformer here: missing {path / subfolder / 'config.json'} (pipeline folder) "
        f"and {path / 'config.json'} (transformer folder)"
    )


def load_flow_transformer(
    path: str | Path,
    family: str,
    *,
    subfolder: str = "transformer",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    distilled_guidance: float = 3.5,
    local_files_only: Optional[bool] = None,
) -> FlowTransformerBackbone:
    """Load an SD3 or Flux transformer with ``from_pretrained`` and wrap it as a frozen backbone.

    Args:
        path: a local pipeline folder (transformer in ``subfolder``), a transformer folder, or a
            hub id (e.g. ``stabilityai/stable-diffusion-3-medium-diffusers``), fetched into the
            Hugging Face cache (with its progress bar) when online.
        family: ``"sd3"`` or ``"flux"``.
        subfolder: the transformer's subfolder in a pipeline folder or repository.
        dtype: weights dtype (bfloat16 for real sizes on a GPU).
        device: where to put it.
        distilled_guidance: FLUX.1-dev's guidance input (ignored by models without one).
        local_files_only: never reach the hub; None: only when ``HF_HUB_OFFLINE`` is set.

    Returns:
        The frozen ``FlowTransformerBackbone``.

    Raises:
        CheckpointError: one line naming what is missing (a local folder without a config, or a
            hub id not in the cache while offline) or what is wrong.
    """
    cls = _transformer_class(family)
    local = Path(path).expanduser()
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if local.exists():
        source, sub = str(local), _local_subfolder(local, subfolder)
        config_file = local / sub / "config.json" if sub else local / "config.json"
        try:
            class_name = json.loads(config_file.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{config_file}: not a readable diffusers config: {err}") from err
        if class_name != FAMILIES[family]:
            raise CheckpointError(
                f"{config_file}: holds a {class_name}, but backbone family '{family}' needs a {FAMILIES[family]}"
            )
    else:
        source, sub = str(path), subfolder
        if str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
            raise CheckpointError(f"{path}: no such folder, and not a hub id of the form owner/name")
    try:
        transformer = cls.from_pretrained(
            source, subfolder=sub or None, torch_dtype=dtype, use_safetensors=True,
            local_files_only=bool(local_files_only),
        )  # fmt: skip
    except (OSError, ValueError, RuntimeError) as err:  # missing files / offline misses: OSError
        where = f"{source}/{sub}" if sub else source
        hint = "" if local.exists() else " (offline or not downloaded: `hf download " + source + "`)"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{where}: cannot load the {FAMILIES[family]} weights{hint}: {first}") from err
    return FlowTransformerBackbone(transformer.to(device), family, distilled_guidance=distilled_guidance)
