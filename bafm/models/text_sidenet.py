"""Text-conditioned SideNet for text-to-image flow backbones (SD3, Flux).

The class SideNet of ``bafm.models.sidenet`` with its class embedding replaced by a linear
projection of the pipeline's pooled text embedding (SD3: CLIP-L + CLIP-G pooled, 2048 wide;
Flux: CLIP-L pooled, 768 wide). Everything else is the class SideNet's: the same blocks (imported,
not copied), the same fused ``t``/``h``/condition embedding, the zero-initialised output conv
and the output offset multiplied by ``h``, so ``S(x, v, t, 0) = v`` exactly.

There is no learned null embedding. The pipelines' unconditional branch is the encoding of the
negative prompt (the empty prompt by default), which has a pooled embedding of its own; the
SideNet sees exactly what the backbone's unconditional branch sees, so it needs no special case
under classifier-free guidance, and a user's own negative prompt stays in distribution as far as
the projection generalises. Conditioning dropout in training swaps in the empty prompt's
encoding (``bafm.models.text_condition.select_rows``).

Exports are ``<stem>.safetensors`` + ``<stem>.json`` (format ``bafm-text-sidenet``), read back
without executing code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bafm.models.checkpoint_io import CheckpointError, cast_state_dict, check_against, load_weights, read_config, write_weights
from bafm.models.layers import TimestepEmbedder
from bafm.models.sidenet import broadcast_times, run_body, side_blocks, zero_init
from bafm.models.text_condition import Condition, pooled_embedding

TEXT_SIDENET_FORMAT = "bafm-text-sidenet"
TEXT_SIDENET_FIELDS = ("in_channels", "pooled_dim", "channels", "emb_dim", "depth", "num_heads", "frequency_dim",
                       "patch_size")


class TextSideNet(nn.Module):
    """Predicts the velocity at ``t - h`` from the state and velocity at ``t`` and the prompt.

    ``forward`` returns the offset (already multiplied by ``h``); ``velocity`` returns
    ``v + offset``. ``h > 0`` looks toward data, ``h < 0`` toward noise.
    """

    velocity_kind = "side_offset"  # velocity = v + forward(x, v, t, h, cond), see bafm.models.fast

    def __init__(
        self,
        in_channels: int = 16,
        pooled_dim: int = 2048,
        channels: int = 256,
        emb_dim: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        frequency_dim: int = 256,
        patch_size: int = 1,
    ) -> None:
        """Build the SideNet (PyTorch default initialisation, zero output conv).

        Args:
            in_channels: latent channels ``C`` of the (unpacked) VAE latents; the input conv
                sees ``2 C`` (state and velocity).
            pooled_dim: width ``P`` of the pipeline's pooled text embedding.
            channels: feature width.
            emb_dim: width of the t/h/text embeddings and their fusion.
            depth: number of blocks; block ``depth // 2`` is the attention block.
            num_heads: attention heads (``channels`` must be divisible by it).
            frequency_dim: width of the sinusoidal t/h features.
            patch_size: ``p``: the body runs on ``p x p`` patches folded into channels
                (``pixel_unshuffle``; ``pixel_shuffle`` unfolds the output), ``p^2`` times fewer
                positions, as the backbones' own 2x2 patches. 1: the release's layout.

        Raises:
            ValueError: on an inconsistent configuration.
        """
        super().__init__()
        if depth < 1:
            raise ValueError(f"SideNet depth must be >= 1, got {depth}")
        if pooled_dim < 1:
            raise ValueError(f"pooled_dim must be >= 1, got {pooled_dim}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.config: Dict[str, Any] = dict(
            in_channels=in_channels, pooled_dim=pooled_dim, channels=channels, emb_dim=emb_dim,
            depth=depth, num_heads=num_heads, frequency_dim=frequency_dim, patch_size=patch_size,
        )  # fmt: skip
        self.in_channels, self.pooled_dim, self.patch_size = in_channels, pooled_dim, patch_size
        folded = in_channels * patch_size**2  # channels of one p x p patch of the latents
        self.t_embedder = TimestepEmbedder(emb_dim, frequency_dim)
        self.h_embedder = TimestepEmbedder(emb_dim, frequency_dim)
        # In place of the class table: one linear map of the pooled text embedding; the fusion
        # MLP below supplies the non-linearity, as it does for the class embedding.
        self.text_embedder = nn.Linear(pooled_dim, emb_dim)
        self.emb_fusion = nn.Sequential(nn.Linear(3 * emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(2 * folded, channels, 3, padding=1, bias=False)
        self.blocks = side_blocks(channels, emb_dim, depth, num_heads)
        self.output_conv = nn.Conv2d(channels, folded, 3, padding=1)
        zero_init(self.output_conv)  # zero output: the SideNet starts as the identity S(x, v, t, h) = v

    def forward(
        self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, h: torch.Tensor | float, cond: Condition
    ) -> torch.Tensor:
        """Velocity offset ``S(x, v, t, h, cond) - v``.

        Args:
            x: state ``x_t``, shape ``(B, C, H, W)``.
            v: backbone velocity at ``t`` (bafm convention), shape ``(B, C, H, W)``.
            t: times in ``[0, 1]``, shape ``(B,)``.
            h: signed offsets (``t - h`` is the target time), shape ``(B,)``.
            cond: a ``TextCondition`` (only its ``pooled`` ``(B, P)`` is read) or the pooled
                embedding itself; the unconditional rows carry the negative prompt's.

        Returns:
            The offset, proportional to ``h``, shape ``(B, C, H, W)``.
        """
        t, h = broadcast_times(t, h, x)
        pooled = pooled_embedding(cond)
        if pooled.dim() != 2 or pooled.shape != (x.shape[0], self.pooled_dim):
            raise ValueError(
                f"pooled text embedding has shape {tuple(pooled.shape)}, expected ({x.shape[0]}, {self.pooled_dim})"
            )
        text = self.text_embedder(pooled.to(self.text_embedder.weight.dtype))  # (B, E)
        emb = self.emb_fusion(torch.cat([self.t_embedder(t), self.h_embedder(h), text], dim=-1))  # (B, E)
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latents of size {tuple(x.shape[-2:])} are not divisible by the SideNet's patch_size {p}")
        xv = torch.cat([F.pixel_unshuffle(x, p), F.pixel_unshuffle(v, p)] if p > 1 else [x, v], dim=1)
        feat = self.input_conv(xv)  # (B, channels, H / p, W / p)
        delta = run_body(self.blocks, self.output_conv, feat, emb)  # (B, C p^2, H / p, W / p)
        delta = F.pixel_shuffle(delta, p) if p > 1 else delta  # (B, C, H, W)
        return delta * h.reshape(-1, 1, 1, 1).to(delta.dtype)

    def velocity(
        self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, h: torch.Tensor | float, cond: Condition
    ) -> torch.Tensor:
        """Estimated velocity at time ``t - h``: ``v + forward(x, v, t, h, cond)``.

        Args:
            x: state ``x_t``, shape ``(B, C, H, W)``.
            v: backbone velocity at ``t``, shape ``(B, C, H, W)``.
            t: times in ``[0, 1]``, shape ``(B,)``.
            h: signed offsets, shape ``(B,)``; ``h = 0`` returns ``v`` exactly.
            cond: ``TextCondition`` or pooled embedding ``(B, P)``.

        Returns:
            Velocity estimate at ``t - h``, shape ``(B, C, H, W)``.
        """
        return v + self.forward(x, v, t, h, cond)


def save_text_sidenet(model: nn.Module, path: str | Path, extra_config: Optional[Dict[str, Any]] = None) -> Path:
    """Export a ``TextSideNet`` as ``<stem>.safetensors`` + ``<stem>.json`` (no backbone weights).

    Args:
        model: a ``TextSideNet`` (a ``torch.compile`` wrapper is unwrapped).
        path: target ``.safetensors`` path.
        extra_config: more JSON entries (e.g. the backbone it was trained for); they must not
            reuse the model's own keys.

    Returns:
        The JSON config path.

    Raises:
        TypeError: ``model`` is not a ``TextSideNet``.
        ValueError: ``extra_config`` collides with a model key.
    """
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, TextSideNet):
        raise TypeError(f"save_text_sidenet expects a TextSideNet, got {type(model).__name__}")
    config: Dict[str, Any] = {"format": TEXT_SIDENET_FORMAT, **model.config}
    clash = sorted(set(extra_config or {}) & set(config))
    if clash:
        raise ValueError(f"extra_config keys {clash} collide with the model config")
    config.update(extra_config or {})
    return write_weights(model.state_dict(), path, config)


def load_text_sidenet(
    path: str | Path,
    *,
    trainable: bool = False,
    device: torch.device | str = "cpu",
    dtype: Optional[torch.dtype] = torch.float32,
) -> TextSideNet:
    """Load a ``TextSideNet`` export (safetensors + JSON config; no code is executed).

    Args:
        path: ``<stem>.safetensors`` written by ``save_text_sidenet``.
        trainable: keep it in training mode with gradients; default frozen (eval, no gradients).
        device: where the weights end up.
        dtype: floating-point dtype of the weights (None keeps the stored one).

    Returns:
        The SideNet.

    Raises:
        CheckpointError: missing/unsafe file, a config of another format or without the model
            fields, or tensors that do not match it (naming the keys).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: a text SideNet is a .safetensors export with its .json config")
    state = load_weights(path, ())
    config = read_config(path) or {}
    if config.get("format") != TEXT_SIDENET_FORMAT:
        raise CheckpointError(
            f"{path}: its config says format '{config.get('format')}', expected '{TEXT_SIDENET_FORMAT}' "
            "(a class-conditional SideNet loads with bafm.models.load_sidenet)"
        )
    config = {"patch_size": 1, **config}  # exports written before patch_size existed
    missing = [k for k in TEXT_SIDENET_FIELDS if k not in config]
    if missing:
        raise CheckpointError(f"{path}: config lacks {', '.join(missing)}")
    kwargs = {k: int(config[k]) for k in TEXT_SIDENET_FIELDS}
    with torch.device("meta"):
        model = TextSideNet(**kwargs)
    what = (f"TextSideNet (channels {kwargs['channels']}, depth {kwargs['depth']}, pooled_dim "
            f"{kwargs['pooled_dim']}, in_channels {kwargs['in_channels']}, patch_size {kwargs['patch_size']})")  # fmt: skip
    check_against({k: v.shape for k, v in model.state_dict().items()}, state, path, what)
    model.load_state_dict(cast_state_dict(state, dtype), strict=True, assign=True)
    model = model.to(device)
    return model.train().requires_grad_(True) if trainable else model.eval().requires_grad_(False)
