"""SideNet: the small network that predicts the velocity at ``t - h`` from the velocity at ``t``.

Computation and parameter names follow the BA-solver release (HKUST-LongGroup/BA-solver,
``models/side_net.py``), so its checkpoints load strictly:

* embeddings of ``t``, the signed offset ``h`` and the class ``y`` are concatenated and fused by
  a two-layer MLP;
* ``concat(x, v)`` goes through a bias-free 3x3 input conv, then ``depth`` blocks: depthwise-
  separable residual blocks, except block ``depth // 2`` which is a self-attention block;
  each block normalises with a parameter-free channel RMSNorm (eps 1e-5) and is modulated by
  ``(1 + scale, shift)`` from the fused embedding (``scale`` first in the projection);
* a final RMSNorm, SiLU and zero-initialised 3x3 output conv give a velocity change that is
  multiplied by ``h``, so ``S(x, v, t, 0) = v`` exactly and training starts at ``S = v``.

Beyond the release, a SideNet built with ``feature_dim > 0`` also reads the backbone's hidden
tokens at the anchor (``bafm.models.anchor_features``): every SideNet call in a BA step sits where
the backbone was just evaluated, so these features cost no backbone call. They enter twice, both
through zero-initialised linear maps (training starts from the feature-free network): per token,
added to the input conv's output on the token's patch, and mean-pooled, added to the fused
embedding. ``feature_dim = 0`` is the release architecture, whose checkpoints load unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bafm.models.layers import LabelEmbedder, TimestepEmbedder


def is_channels_last(x: torch.Tensor) -> bool:
    """True when ``(B, C, H, W)`` is stored channels-last (NHWC) and not also plain contiguous."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def channel_rms_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Parameter-free RMS normalisation over the channel axis of ``(B, C, H, W)``.

    ``x * rsqrt(mean_c(x^2) + eps)``, accumulated in float32 for half-precision inputs and
    returned in ``x``'s dtype and memory layout. On channels-last storage the channel axis is the
    innermost one, so the fused ``F.rms_norm`` kernel runs on the NHWC view (one pass, no copy).
    """
    if is_channels_last(x):
        return F.rms_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=eps).permute(0, 3, 1, 2)
    if x.dtype in (torch.float16, torch.bfloat16):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=1, keepdim=True) + eps)).to(x.dtype)
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def _scale_shift(emb_proj: nn.Linear, emb: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)``, each ``(B, C, 1, 1)``, from the fused embedding ``(B, E)``."""
    style = emb_proj(emb).reshape(-1, 2 * channels, 1, 1)
    scale, shift = style.chunk(2, dim=1)
    return scale, shift


class SideResBlock(nn.Module):
    """Depthwise-separable residual block with scale/shift modulation before the second conv."""

    def __init__(self, channels: int, emb_dim: int) -> None:
        super().__init__()
        self.channels = channels
        self.conv1_dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.conv1_pw = nn.Conv2d(channels, channels, 1, bias=False)
        self.conv2_dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.conv2_pw = nn.Conv2d(channels, channels, 1, bias=True)
        self.emb_proj = nn.Linear(emb_dim, 2 * channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, C, H, W)``, ``emb`` ``(B, E)`` -> ``(B, C, H, W)``."""
        h = self.conv1_pw(self.conv1_dw(channel_rms_norm(x)))
        scale, shift = _scale_shift(self.emb_proj, emb, self.channels)
        h = torch.addcmul(shift, channel_rms_norm(h), scale + 1.0)
        h = self.conv2_pw(self.conv2_dw(F.silu(h)))
        return x + h


class SideAttentionBlock(nn.Module):
    """Modulated multi-head self-attention over the ``H * W`` positions (1x1-conv qkv and output)."""

    def __init__(self, channels: int, emb_dim: int, num_heads: int = 4) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"SideNet channels {channels} are not divisible by num_heads {num_heads}")
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.emb_proj = nn.Linear(emb_dim, 2 * channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.proj = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, C, H, W)``, ``emb`` ``(B, E)`` -> ``(B, C, H, W)``."""
        B, C, H, W = x.shape
        scale, shift = _scale_shift(self.emb_proj, emb, C)
        h = torch.addcmul(shift, channel_rms_norm(x), scale + 1.0)
        # qkv channels are laid out as (3, heads, head_dim); positions become the sequence axis.
        qkv = self.qkv(h)  # (B, 3C, H, W)
        if is_channels_last(qkv):
            # NHWC storage: token-major (B, HW, 3, heads, head_dim) is a free view, and so are q/k/v
            # (unit last stride), which CUDA's fused attention kernels read without a copy.
            qkv = qkv.permute(0, 2, 3, 1).reshape(B, H * W, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, HW, head_dim) each
            if not qkv.is_cuda:  # CPU SDPA is several times slower on strided views
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, head_dim)
            out = out.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
            out = out.contiguous(memory_format=torch.channels_last)
        else:
            qkv = qkv.reshape(B, 3, self.num_heads, self.head_dim, H * W)
            # Contiguous q/k/v (one copy): SDPA on strided views is several times slower on CPU.
            q, k, v = qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)  # (B, heads, HW, head_dim) each
            out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, head_dim)
            out = out.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj(out)


def side_blocks(channels: int, emb_dim: int, depth: int, num_heads: int) -> nn.ModuleList:
    """The SideNet body: ``depth`` residual blocks, block ``depth // 2`` an attention block."""
    return nn.ModuleList(
        SideAttentionBlock(channels, emb_dim, num_heads) if i == depth // 2 else SideResBlock(channels, emb_dim)
        for i in range(depth)
    )


def zero_init(*layers: nn.Module) -> None:
    """Zero the weights and biases of ``layers`` (skipped on the meta device, which holds no values)."""
    for layer in layers:
        if not layer.weight.is_meta:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)


def broadcast_times(t: torch.Tensor | float, h: torch.Tensor | float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` and ``h`` as ``(B,)`` tensors on ``x``'s device (a scalar is broadcast to the batch)."""
    t, h = torch.as_tensor(t, device=x.device), torch.as_tensor(h, device=x.device)
    return (t.expand(x.shape[0]) if t.ndim == 0 else t), (h.expand(x.shape[0]) if h.ndim == 0 else h)


def run_body(blocks: nn.ModuleList, output_conv: nn.Conv2d, feat: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Blocks, final RMSNorm, SiLU and output conv: ``(B, channels, H, W)`` features -> velocity change."""
    for block in blocks:
        feat = block(feat, emb)
    return output_conv(F.silu(channel_rms_norm(feat)))


class SideNet(nn.Module):
    """Predicts the velocity at ``t - h`` given the state and velocity at ``t``.

    ``forward`` returns the offset (already multiplied by ``h``); ``velocity`` returns
    ``v + offset``. ``h > 0`` looks toward data, ``h < 0`` toward noise.
    """

    velocity_kind = "side_offset"  # velocity = v + forward(x, v, t, h, y), see bafm.models.fast

    def __init__(
        self,
        in_channels: int = 4,
        channels: int = 256,
        emb_dim: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        num_classes: int = 1000,
        frequency_dim: int = 256,
        feature_dim: int = 0,
        feature_layer: int = -1,
    ) -> None:
        """Build the SideNet (release initialisation: PyTorch defaults, zero output conv).

        Args:
            in_channels: latent channels ``C`` (the input conv sees ``2 C``: state and velocity).
            channels: feature width.
            emb_dim: width of the t/h/class embeddings and their fusion.
            depth: number of blocks; block ``depth // 2`` is the attention block.
            num_heads: attention heads (``channels`` must be divisible by it).
            num_classes: real classes; the null class id is ``num_classes``.
            frequency_dim: width of the sinusoidal t/h features.
            feature_dim: width ``D`` of the backbone tokens read at the anchor; 0 for none (the
                release architecture).
            feature_layer: index of the backbone block whose output tokens are read (negative
                counts from the last); recorded for the sampler, unused without features.

        Raises:
            ValueError: on an inconsistent configuration.
        """
        super().__init__()
        if depth < 1:
            raise ValueError(f"SideNet depth must be >= 1, got {depth}")
        if feature_dim < 0:
            raise ValueError(f"SideNet feature_dim must be >= 0 (0: no backbone features), got {feature_dim}")
        self.config: Dict[str, Any] = dict(
            in_channels=in_channels,
            channels=channels,
            emb_dim=emb_dim,
            depth=depth,
            num_heads=num_heads,
            num_classes=num_classes,
            frequency_dim=frequency_dim,
            feature_dim=feature_dim,
            feature_layer=feature_layer,
        )
        self.feature_dim = feature_dim
        self.feature_layer = feature_layer
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.t_embedder = TimestepEmbedder(emb_dim, frequency_dim)
        self.h_embedder = TimestepEmbedder(emb_dim, frequency_dim)
        self.y_embedder = LabelEmbedder(num_classes, emb_dim)
        self.emb_fusion = nn.Sequential(
            nn.Linear(3 * emb_dim, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        self.input_conv = nn.Conv2d(2 * in_channels, channels, 3, padding=1, bias=False)
        self.blocks = side_blocks(channels, emb_dim, depth, num_heads)
        self.output_conv = nn.Conv2d(channels, in_channels, 3, padding=1)
        if feature_dim:
            self.feature_map = nn.Linear(feature_dim, channels)  # per token -> its patch's pixels
            self.feature_emb = nn.Linear(feature_dim, emb_dim)  # pooled -> the fused embedding
        # Zero output: the SideNet starts as the identity S(x, v, t, h) = v; zero feature maps:
        # training starts from the feature-free network.
        zero_init(self.output_conv, *([self.feature_map, self.feature_emb] if feature_dim else []))

    @property
    def uses_backbone_features(self) -> bool:
        """Whether ``velocity`` needs the backbone's tokens at the anchor (``features=``)."""
        return self.feature_dim > 0

    def _feature_inputs(self, features: Optional[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone tokens ``(B, T, D)`` -> a ``(B, channels, H, W)`` map and a ``(B, E)`` embedding.

        Token ``(i, j)`` of the ``g x g`` token grid covers the ``p x p`` pixels of its patch
        (``p = H / g``), so its projection is repeated over them.
        """
        if features is None or features.dim() != 3 or features.shape[0] != like.shape[0]:
            got = "None" if features is None else f"shape {tuple(features.shape)}"
            raise ValueError(
                f"this SideNet reads backbone features (feature_dim {self.feature_dim}): pass features= "
                f"of shape ({like.shape[0]}, T, {self.feature_dim}), got {got}"
            )
        B, T, _ = features.shape
        H, W = like.shape[-2:]
        g = math.isqrt(T)
        if g * g != T or H % g or W % g:
            raise ValueError(f"backbone features have {T} tokens, which do not tile a {H}x{W} latent")
        features = features.to(self.feature_map.weight.dtype)
        tokens = self.feature_map(features)  # (B, T, channels)
        grid = tokens.transpose(1, 2).reshape(B, -1, g, g)  # (B, channels, g, g)
        spatial = grid.repeat_interleave(H // g, dim=2).repeat_interleave(W // g, dim=3)  # (B, channels, H, W)
        return spatial, self.feature_emb(features.mean(dim=1))

    def forward(
        self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, h: torch.Tensor | float, y: torch.Tensor,
        features: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Velocity offset ``S(x, v, t, h) - v``.

        Args:
            x: state ``x_t``, shape ``(B, C, H, W)``.
            v: backbone velocity at ``t`` (bafm convention), shape ``(B, C, H, W)``.
            t: times in ``[0, 1]``, shape ``(B,)``.
            h: signed offsets (``t - h`` is the target time), shape ``(B,)``.
            y: int64 labels, null class ``num_classes``, shape ``(B,)``.
            features: the backbone's tokens at ``(x, t)``, ``(B, T, feature_dim)``; required when
                ``feature_dim > 0``, ignored otherwise.

        Returns:
            The offset, proportional to ``h``, shape ``(B, C, H, W)``.
        """
        t, h = broadcast_times(t, h, x)
        emb = torch.cat([self.t_embedder(t), self.h_embedder(h), self.y_embedder(y)], dim=-1)  # (B, 3E)
        emb = self.emb_fusion(emb)  # (B, E)
        feat = self.input_conv(torch.cat([x, v], dim=1))  # (B, channels, H, W)
        if self.feature_dim:
            spatial, pooled = self._feature_inputs(features, x)
            feat = feat + spatial.to(feat.dtype).contiguous(memory_format=_layout(feat))
            emb = emb + pooled.to(emb.dtype)
        delta = run_body(self.blocks, self.output_conv, feat, emb)  # (B, C, H, W)
        return delta * h.reshape(-1, 1, 1, 1).to(delta.dtype)

    def velocity(
        self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, h: torch.Tensor | float, y: torch.Tensor,
        features: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Estimated velocity at time ``t - h``: ``v + forward(x, v, t, h, y)``.

        Args:
            x: state ``x_t``, shape ``(B, C, H, W)``.
            v: backbone velocity at ``t``, shape ``(B, C, H, W)``.
            t: times in ``[0, 1]``, shape ``(B,)``.
            h: signed offsets, shape ``(B,)``; ``h = 0`` returns ``v`` exactly.
            y: int64 labels, shape ``(B,)``.
            features: backbone tokens at the anchor (see ``forward``).

        Returns:
            Velocity estimate at ``t - h``, shape ``(B, C, H, W)``.
        """
        return v + self.forward(x, v, t, h, y, features)
