"""Precision/recall and the inception score as the ADM evaluation suite computes them.

The reference tables of ImageNet generation (guided-diffusion's ``evaluations/evaluator.py``, "ADM")
differ from torch-fidelity in two places that move the numbers (README, "Metric conventions"):

- **Distances in float16.** ADM casts both feature batches to float16 and expands
  ``|u - v|^2 = |u|^2 - 2 u.v + |v|^2`` there, clamped at 0 (a block falls back to float32 only when
  a value overflows). The k-NN radii and the "inside a ball" tests of precision/recall both use
  these rounded squared distances, over blocks of 10 000 x 10 000.
- **IS splits.** ADM cuts the samples, in their order, into consecutive chunks of 5000 (the last may
  be shorter) and averages ``exp(E KL(p(y|x) || p(y)))`` over the chunks; torch-fidelity shuffles
  (seed 2020) and cuts ``N / splits``.

FID (and sFID) agree between the two to round-off and need no variant.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

ADM_BLOCK = 10_000  # rows and columns of one block of pairwise distances
ADM_IS_SPLIT = 5_000  # samples per inception-score chunk


def squared_distances_fp16(rows: Tensor, cols: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances computed in float16, as ADM's distance block does.

    The inputs are rounded to float16; the squared norms and the dot products are accumulated in
    float32 and rounded to float16 (a float16 GEMM's output); ``(|u|^2 - 2 u.v) + |v|^2`` is then
    evaluated in float16 and clamped at 0. When any value of the block overflows float16 the block
    is computed in float32 instead.

    Args:
        rows: ``(N, D)`` features.
        cols: ``(M, D)`` features.

    Returns:
        ``(N, M)`` float32 squared distances.
    """
    u, v = rows.to(torch.float16).float(), cols.to(torch.float16).float()
    norm_u, norm_v = u.square().sum(1).half(), v.square().sum(1).half()
    dot = (u @ v.T).half()
    block = ((norm_u[:, None] - 2 * dot) + norm_v[None, :]).clamp_min(0)
    if bool(torch.isfinite(block).all()):
        return block.float()
    u32, v32 = rows.float(), cols.float()
    return ((u32.square().sum(1)[:, None] - 2 * (u32 @ v32.T)) + v32.square().sum(1)[None, :]).clamp_min(0)


def manifold_radii(features: Tensor, neighborhood: int, block: int = ADM_BLOCK) -> Tensor:
    """Squared distance of each point to its ``neighborhood``-th nearest neighbour in its own set.

    The point itself is its 0-th neighbour (at distance 0, or float16 round-off of it).

    Returns:
        ``(N,)`` float32 squared radii.
    """
    radii = []
    for lo in range(0, features.shape[0], block):
        row = features[lo : lo + block]
        dist = torch.cat([squared_distances_fp16(row, features[c : c + block])
                          for c in range(0, features.shape[0], block)], dim=1)
        radii.append(torch.kthvalue(dist, neighborhood + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall_adm(
    generated: Tensor, real: Tensor, *, neighborhood: int, device: torch.device | str | None = None,
    block: int = ADM_BLOCK,
) -> Tuple[float, float]:
    """ADM's improved precision and recall: float16 squared distances, ``<=`` against squared radii.

    Args:
        generated: ``(N, D)`` features of generated samples.
        real: ``(M, D)`` features of real samples.
        neighborhood: k of the k-NN manifolds.
        device: where the distances are computed (default: where ``generated`` is).
        block: rows and columns of one block of distances (ADM's is 10 000; it only decides which
            blocks fall back to float32).

    Returns:
        ``(precision, recall)``: the fraction of generated points inside the real manifold and of
        real points inside the generated one.
    """
    device = torch.device(device) if device is not None else generated.device
    gen, ref = generated.detach().to(device, torch.float32), real.detach().to(device, torch.float32)
    radii_ref, radii_gen = manifold_radii(ref, neighborhood, block), manifold_radii(gen, neighborhood, block)
    ref_inside = torch.zeros(ref.shape[0], dtype=torch.bool, device=device)
    gen_inside = torch.zeros(gen.shape[0], dtype=torch.bool, device=device)
    # The real set is the row side of every block, as in ADM's evaluate_pr(ref, ..., sample, ...).
    for r in range(0, ref.shape[0], block):
        for g in range(0, gen.shape[0], block):
            dist = squared_distances_fp16(ref[r : r + block], gen[g : g + block])  # (R, G)
            ref_inside[r : r + block] |= (dist <= radii_gen[None, g : g + block]).any(dim=1)
            gen_inside[g : g + block] |= (dist <= radii_ref[r : r + block, None]).any(dim=0)
    n, m = int(gen.shape[0]), int(ref.shape[0])
    return int(gen_inside.sum()) / n, int(ref_inside.sum()) / m


def inception_score_adm(logits: Tensor, split_size: int = ADM_IS_SPLIT) -> Tuple[float, float]:
    """ADM's inception score: consecutive chunks of ``split_size`` samples, in the order given.

    Args:
        logits: ``(N, K)`` class logits, in sample order.
        split_size: samples per chunk (the last chunk holds the rest).

    Returns:
        ``(mean, std)`` over the chunks of ``exp(mean KL(p(y|x) || p(y)))`` (ADM reports the mean).
    """
    probs = logits.detach().to("cpu", torch.float64).softmax(dim=1)
    scores = []
    for chunk in probs.split(int(split_size)):
        marginal = chunk.mean(dim=0, keepdim=True)
        kl = (torch.special.xlogy(chunk, chunk) - chunk * marginal.log()).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    values = torch.tensor(scores, dtype=torch.float64)
    return float(values.mean()), (float(values.std(unbiased=False)) if len(scores) > 1 else 0.0)
