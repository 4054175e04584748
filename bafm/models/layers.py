"""Layers shared by the SiT backbone and the SideNet.

The embedders reproduce the public SiT/REPA/BA-solver releases bit for bit (same frequency
table, same ``[cos, sin]`` order, same parameter names), so released checkpoints load into them.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) times, as in DiT/SiT.

    The times are used as given: SiT, REPA and the BA-solver SideNet feed ``t`` in ``[0, 1]``
    (and signed offsets ``h``) directly, without the ``* 1000`` of discrete-time DiT.

    Args:
        t: times, shape ``(B,)``.
        dim: embedding width; an odd width gets one zero column appended.
        max_period: sets the lowest frequency, ``1 / max_period``.

    Returns:
        ``[cos(t * f), sin(t * f)]`` with ``f_k = max_period ** (-k / (dim // 2))``,
        shape ``(B, dim)``, float32.
    """
    half = dim // 2
    # Same float32 expression as the releases, so the table matches them bit for bit.
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half
    )
    args = t.reshape(-1, 1).float() * freqs.reshape(1, -1)  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        embedding = nn.functional.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedder(nn.Module):
    """Scalar time -> vector: sinusoidal features followed by a two-layer SiLU MLP.

    Parameter names (``mlp.0``, ``mlp.2``) follow the SiT/REPA/BA-solver releases.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        """Create the embedder.

        Args:
            hidden_size: output width.
            frequency_embedding_size: width of the sinusoidal features.
        """
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed times.

        Args:
            t: times (or signed offsets), shape ``(B,)``.

        Returns:
            Embeddings, shape ``(B, hidden_size)``.
        """
        t_freq = timestep_frequencies(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector, with one extra row for the null (unconditional) class.

    The null class id is ``num_classes`` (the last row), as in DiT/SiT/REPA. Label dropout is
    not done here (see :func:`drop_labels`) so the forward pass stays deterministic.
    """

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        """Create the table with ``num_classes + 1`` rows.

        Args:
            num_classes: number of real classes.
            hidden_size: embedding width.
        """
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Look up labels.

        Args:
            y: int64 labels in ``[0, num_classes]``, shape ``(B,)``.

        Returns:
            Embeddings, shape ``(B, hidden_size)``.
        """
        return self.embedding_table(y)


def drop_labels(
    y: torch.Tensor, prob: float, num_classes: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace labels by the null class with probability ``prob`` (classifier-free guidance).

    Args:
        y: int64 labels, shape ``(B,)``.
        prob: drop probability in ``[0, 1]``.
        num_classes: number of real classes; the null class id is ``num_classes``.
        generator: optional random generator (on ``y``'s device).

    Returns:
        Labels with some entries set to ``num_classes``, shape ``(B,)``.
    """
    if prob <= 0.0:
        return y
    drop = torch.rand(y.shape, device=y.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(y, num_classes), y)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding of a square patch grid (MAE/DiT/SiT layout).

    Tokens are in row-major order (row ``i``, column ``j`` at index ``i * grid_size + j``). The
    first half of the channels encodes the column, the second half the row; each half is
    ``[sin(pos * w), cos(pos * w)]`` with ``w_k = 10000 ** (-k / (embed_dim / 4))``.

    Args:
        embed_dim: token width, divisible by 4.
        grid_size: patches per side.

    Returns:
        The embedding, shape ``(grid_size ** 2, embed_dim)``, float32.

    Raises:
        ValueError: if ``embed_dim`` is not divisible by 4.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos positional embedding needs a width divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    # float64 like the numpy reference, rounded to float32 once at the end.
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)  # (G*G, D/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (G*G, D/2)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # (G*G, D)


def count_parameters(module: nn.Module) -> Tuple[int, int]:
    """Count parameters.

    Args:
        module: any module (works on the meta device).

    Returns:
        ``(trainable, total)`` element counts.
    """
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total
