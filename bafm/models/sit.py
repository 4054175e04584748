"""SiT: the scalable interpolant transformer backbone (adaLN-Zero DiT blocks), with a size registry.

Parameter names and computation follow the public SiT (willisma/SiT ``models.py``) and REPA
(sihyun-yu/REPA ``models/sit.py``) releases, so their checkpoints load strictly.

Two time conventions exist among released checkpoints:

* ``"repa"`` (REPA, BA-solver, bafm's own): ``x_t = (1 - t) x_data + t noise``, network output
  ``v = noise - x_data``. This is bafm's convention; ``velocity`` returns the raw output.
* ``"sit"`` (original SiT release): ``t = 0`` is noise and the network predicts
  ``data - noise``; ``velocity`` adapts it once: ``t_model = 1 - t``, ``v = -v_model``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bafm.models.layers import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d

TIME_CONVENTIONS = ("repa", "sit")


@dataclass(frozen=True)
class SiTSize:
    """Depth, width, heads and patch size of one registry entry."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int


_BASE_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# "SiT-XL/2" -> SiTSize(28, 1152, 16, 2), as in the SiT paper (Table 1) and releases.
SIT_ARCHS: Dict[str, SiTSize] = {
    f"SiT-{name}/{patch}": SiTSize(depth, width, heads, patch)
    for name, (depth, width, heads) in _BASE_SIZES.items()
    for patch in (2, 4, 8)
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` of tokens ``(B, T, D)`` by ``(B, D)`` vectors."""
    # One fused pass over the tokens (eager ran a multiply and an add).
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> tokens (a strided conv, named ``proj`` as in timm)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, T, D)`` with ``T = (H / p) * (W / p)`` in row-major order."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional qk LayerNorm."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over tokens ``(B, T, D)`` -> ``(B, T, D)``."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, T, head_dim) views, unit last stride
        if not qkv.is_cuda:
            # Contiguous q/k/v: SDPA on strided views is several times slower on CPU. CUDA's fused
            # kernels read these (B, T, heads, head_dim) views directly, so no copy there.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Two-layer tanh-GELU MLP (``fc1``, ``fc2`` as in timm)."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` -> ``(B, T, D)``."""
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (shift/scale/gate for attention and MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Update tokens ``x`` ``(B, T, D)`` under conditioning ``c`` ``(B, D)``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        # Gated residuals as one fused pass each: x + gate * branch.
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` -> ``(B, T, p * p * out_channels)``."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_projector(hidden_size: int, projector_hidden: int, z_dim: int) -> nn.Sequential:
    """REPA alignment head (``Linear-SiLU-Linear-SiLU-Linear``); kept so REPA checkpoints load."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_hidden),
        nn.SiLU(),
        nn.Linear(projector_hidden, projector_hidden),
        nn.SiLU(),
        nn.Linear(projector_hidden, z_dim),
    )


class SiT(nn.Module):
    """Class-conditional flow-matching transformer on ``(B, C, H, W)`` latents.

    ``forward(x, t, y)`` is the raw network in its checkpoint's own time convention
    (``time_convention``); ``velocity(x, t, y)`` is always in bafm's convention
    (``t = 1`` noise, ``v = noise - x_data``).
    """

    velocity_kind = "backbone"  # velocity(x, t, y), see bafm.models.fast

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        projector_dims: Sequence[int] = (),
        projector_hidden: int = 2048,
        qk_norm: bool = False,
        time_convention: str = "repa",
        arch: Optional[str] = None,
    ) -> None:
        """Build the network (initialised as in the releases).

        Args:
            input_size: latent height = width, divisible by ``patch_size``.
            patch_size: patch side ``p``.
            in_channels: latent channels ``C``.
            hidden_size: token width ``D`` (divisible by 4 and by ``num_heads``).
            depth: number of transformer blocks.
            num_heads: attention heads.
            mlp_ratio: MLP hidden width / ``D``.
            num_classes: real classes; the null class id is ``num_classes``.
            learn_sigma: output ``2 C`` channels (original SiT); the extra ones are dropped.
            projector_dims: output widths of REPA projector heads (unused when sampling).
            projector_hidden: hidden width of the projector heads.
            qk_norm: LayerNorm on queries and keys per head.
            time_convention: ``"repa"`` or ``"sit"`` (see the module docstring).
            arch: registry name recorded for export (e.g. ``"SiT-XL/2"``), or None.

        Raises:
            ValueError: on an inconsistent configuration, naming the offending value.
        """
        super().__init__()
        if time_convention not in TIME_CONVENTIONS:
            raise ValueError(f"time_convention is '{time_convention}', expected one of {TIME_CONVENTIONS}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.config: Dict[str, Any] = dict(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            projector_dims=[int(d) for d in projector_dims],
            projector_hidden=projector_hidden,
            qk_norm=qk_norm,
            time_convention=time_convention,
        )
        self.arch = arch
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_classes = num_classes
        self.time_convention = time_convention

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # Fixed sin-cos table, a frozen Parameter as in the releases (so it is in the state dict).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.projectors = nn.ModuleList(build_projector(hidden_size, projector_hidden, z) for z in projector_dims)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Release initialisation: Xavier linears, zeroed adaLN and output (the block starts as identity)."""
        if self.pos_embed.is_meta:  # shape-only model: nothing to initialise
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size).unsqueeze(0))
        # Patch embedding initialised like a linear layer over the flattened patch.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, T, p * p * C_out)`` -> images ``(B, C_out, H, W)``."""
        B = x.shape[0]
        g, p, c = self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(B, g, g, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, c, g, p, g, p)
        return x.reshape(B, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
        """Raw network output in the checkpoint's own time convention.

        Args:
            x: latents, shape ``(B, C, H, W)``.
            t: times in ``[0, 1]`` in ``time_convention``, shape ``(B,)`` (a scalar is broadcast).
            y: int64 labels in ``[0, num_classes]`` (``num_classes`` = null), shape ``(B,)``.

        Returns:
            Predicted velocity, shape ``(B, C, H, W)`` (sigma channels, if any, dropped).
        """
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        tokens = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)  # (B, T, D)
        out = self.unpatchify(self.final_layer(tokens, c))  # (B, C_out, H, W)
        return out[:, : self.in_channels]

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
        """Velocity in bafm's convention (``t = 1`` noise, ``v = noise - x_data``).

        Args:
            x: state ``x_t``, shape ``(B, C, H, W)``.
            t: times in ``[0, 1]``, shape ``(B,)`` (a scalar is broadcast).
            y: int64 labels, null class ``num_classes``, shape ``(B,)``.

        Returns:
            ``dx_t / dt``, shape ``(B, C, H, W)``.
        """
        if self.time_convention == "sit":  # fixed at construction: no data-dependent branch
            return -self.forward(x, 1.0 - t, y)
        return self.forward(x, t, y)


def resolve_size(
    arch: Optional[str],
    depth: Optional[int] = None,
    hidden_size: Optional[int] = None,
    num_heads: Optional[int] = None,
    patch_size: Optional[int] = None,
) -> SiTSize:
    """A registry entry with optional per-field overrides.

    Args:
        arch: registry name such as ``"SiT-XL/2"``; None requires every field.
        depth: override of the number of blocks.
        hidden_size: override of the width.
        num_heads: override of the number of heads.
        patch_size: override of the patch size.

    Returns:
        The resolved size.

    Raises:
        ValueError: unknown name (listing the valid ones) or missing fields without a name.
    """
    if arch is None:
        fields = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)
        missing = [k for k, v in fields.items() if v is None]
        if missing:
            raise ValueError(f"no arch given, so {', '.join(missing)} must be set explicitly")
        return SiTSize(**fields)  # type: ignore[arg-type]
    if arch not in SIT_ARCHS:
        raise ValueError(f"unknown SiT architecture '{arch}'; known: {', '.join(SIT_ARCHS)}")
    base = asdict(SIT_ARCHS[arch])
    for key, value in dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size).items():
        if value is not None:
            base[key] = value
    return SiTSize(**base)


def build_sit(
    arch: Optional[str] = "SiT-XL/2",
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = False,
    depth: Optional[int] = None,
    hidden_size: Optional[int] = None,
    num_heads: Optional[int] = None,
    mlp_ratio: float = 4.0,
    projector_dims: Sequence[int] = (),
    projector_hidden: int = 2048,
    qk_norm: bool = False,
    time_convention: str = "repa",
    patch_size: Optional[int] = None,
    device: torch.device | str | None = None,
) -> SiT:
    """Build a SiT from a registry name plus overrides.

    Args:
        arch: registry name (``"SiT-{S,B,L,XL}/{2,4,8}"``), or None with every size field set.
        input_size: latent height = width.
        in_channels: latent channels.
        num_classes: real classes (the table gets one more row for the null class).
        learn_sigma: extra (ignored) sigma output channels, as in the original SiT release.
        depth: overrides the registry depth (e.g. 6 for the embedded default).
        hidden_size: overrides the registry width (e.g. 192).
        num_heads: overrides the registry heads (e.g. 3).
        mlp_ratio: MLP width ratio.
        projector_dims: REPA projector output widths (kept for loading only).
        projector_hidden: REPA projector hidden width.
        qk_norm: per-head LayerNorm on queries/keys.
        time_convention: ``"repa"`` (bafm's) or ``"sit"``.
        patch_size: overrides the registry patch size.
        device: where to allocate; ``"meta"`` builds a shape-only model (no memory, no init).

    Returns:
        The network (in training mode, trainable).
    """
    size = resolve_size(arch, depth, hidden_size, num_heads, patch_size)
    with torch.device(device) if device is not None else nullcontext():
        return SiT(
            input_size=input_size,
            patch_size=size.patch_size,
            in_channels=in_channels,
            hidden_size=size.hidden_size,
            depth=size.depth,
            num_heads=size.num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            projector_dims=projector_dims,
            projector_hidden=projector_hidden,
            qk_norm=qk_norm,
            time_convention=time_convention,
            arch=arch,
        )
