"""The BA chain-rollout loss (DESIGN.md, "SideNet and its training").

One chain per sample: start at ``x_t`` with the backbone velocity ``v``; each of the K links
draws a signed offset ``h``, moves the state to ``t - h`` with a 3-node Gauss-Legendre step
that uses the SideNet's own estimates (no gradient), evaluates the backbone there as the
target, and regresses ``S(x, v, t, h) = v + h * offset`` onto it. The new state and its backbone
velocity start the next link, so the SideNet is trained on states its own rollouts reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from bafm.models.anchor_features import AnchorFn, plain_anchor
from bafm.models.text_condition import Condition, repeat_condition
from bafm.solvers.bi_anchor import gauss_legendre
from bafm.solvers.counting import stack_rows

# The conditioning (class labels (B,), or a TextCondition) is passed through opaquely.
BackboneVelocity = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]
SideVelocity = Callable[..., torch.Tensor]  # (x, v, t, h, y[, features]) -> velocity at t - h

# 3-point Gauss-Legendre rule on [0, 1]: nodes 1/2 -+ sqrt(15)/10, weights 5/18, 8/18, 5/18.
GL3_NODES, GL3_WEIGHTS = gauss_legendre(3)


@dataclass(frozen=True)
class ChainLossConfig:
    """Knobs of the chain rollout (mirrors ``bafm.schema.LossConfig``)."""

    links: int = 8
    offset_rate: float = 50.0
    p_backward: float = 0.5


def sample_signed_offsets(
    t: torch.Tensor, rate: float, p_backward: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Signed offsets ``h`` for a step from ``t`` to ``t - h``.

    The sign is negative (toward noise) with probability ``p_backward``; the magnitude follows an
    exponential with ``rate`` truncated to the distance to the boundary the step moves toward
    (``t`` for forward steps, ``1 - t`` for backward ones), sampled by the inverse CDF.

    Args:
        t: current times, shape ``(B,)``, in ``[0, 1]``.
        rate: exponential rate (the paper uses 50, mean offset ~0.02).
        p_backward: probability of a backward offset.
        generator: random generator on ``t``'s device.

    Returns:
        ``h`` of shape ``(B,)`` with ``0 <= t - h <= 1``.
    """
    u_sign, u_mag = torch.rand((2, t.shape[0]), generator=generator, device=t.device, dtype=t.dtype)
    backward = u_sign < p_backward
    limit = torch.where(backward, 1.0 - t, t).clamp_min(0.0)
    # Inverse CDF of Exp(rate) truncated to [0, limit].
    magnitude = -torch.log1p(-u_mag * (-torch.expm1(-rate * limit))) / rate
    magnitude = torch.minimum(magnitude, limit)
    return torch.where(backward, -magnitude, magnitude)


def _per_sample(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return h.view(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def gauss_legendre_step(
    side_velocity: SideVelocity,
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    h: torch.Tensor,
    y: Condition,
    features: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Move ``x`` from ``t`` to ``t - h`` with the SideNet's estimates at the 3 GL nodes.

    The three node estimates are one SideNet call on a stacked batch.

    Args:
        side_velocity: ``(x, v, t, h, y[, features]) -> velocity at t - h``.
        x, v: state and its backbone velocity at ``t``, shape ``(B, ...)``.
        t, h: times and signed offsets, shape ``(B,)``.
        y: conditioning of batch ``B`` (labels ``(B,)`` or a ``TextCondition``).
        features: the backbone's tokens at ``(x, t)`` for a SideNet that reads them, else None.

    Returns:
        The state at ``t - h``, shape ``(B, ...)``.
    """
    n = len(GL3_NODES)
    offsets = torch.cat([c * h for c in GL3_NODES])
    xs, vs, ts, fs = stack_rows(n, x, v, t, features)
    estimates = _side(side_velocity, xs, vs, ts, offsets, repeat_condition(y, n), fs)  # y may be a TextCondition
    v_bar = sum(w * e for w, e in zip(GL3_WEIGHTS, estimates.chunk(n)))
    return x - _per_sample(h, x) * v_bar


def _side(side_velocity: SideVelocity, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
          y: Condition, features: Optional[torch.Tensor]) -> torch.Tensor:
    """One SideNet call; ``features=`` only for a SideNet that reads the backbone's tokens."""
    if features is None:
        return side_velocity(x, v, t, h, y)
    return side_velocity(x, v, t, h, y, features)


def chain_loss(
    backbone_velocity: BackboneVelocity,
    side_velocity: SideVelocity,
    x0: torch.Tensor,
    y: Condition,
    cfg: ChainLossConfig,
    generator: Optional[torch.Generator] = None,
    *,
    anchor: Optional[AnchorFn] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """BA loss of one batch: mean over K links of the SideNet's velocity MSE.

    Args:
        backbone_velocity: frozen backbone ``(x, t, y) -> v`` (called without gradient).
        side_velocity: trainable SideNet ``(x, v, t, h, y[, features]) -> v_hat at t - h``.
        x0: clean latents, shape ``(B, C, H, W)``.
        y: conditioning after dropout: labels ``(B,)`` (null class = unconditional) or a
            ``TextCondition`` of batch ``B`` (dropped rows hold the empty prompt's encoding).
        cfg: chain knobs.
        generator: random generator on ``x0``'s device (per-step seeding makes resumes exact).
        anchor: ``(x, t, y) -> (v, features)`` used for every backbone call instead of
            ``backbone_velocity`` when the SideNet reads the backbone's tokens
            (``bafm.models.anchor_features``); each link's features come from the call that gave
            its ``v``, so they cost no extra backbone call.

    Returns:
        ``(loss, stats)``: the scalar loss and detached diagnostics (``mse_identity``: the same
        MSE for the untrained estimate ``v``, i.e. how much the SideNet improves on reusing ``v``;
        ``offset_abs``: mean ``|h|``).
    """
    b = x0.shape[0]
    t = torch.rand(b, generator=generator, device=x0.device, dtype=x0.dtype)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    tb = _per_sample(t, x0)
    x = (1.0 - tb) * x0 + tb * noise
    anchor = anchor or plain_anchor(backbone_velocity)
    with torch.no_grad():
        v, features = anchor(x, t, y)
    losses, identity, offsets = [], [], []
    for _ in range(cfg.links):
        h = sample_signed_offsets(t, cfg.offset_rate, cfg.p_backward, generator)
        x_next = gauss_legendre_step(side_velocity, x, v, t, h, y, features)
        t_next = t - h
        with torch.no_grad():
            target, next_features = anchor(x_next, t_next, y)
        prediction = _side(side_velocity, x, v, t, h, y, features)
        losses.append(F.mse_loss(prediction.float(), target.float()))
        identity.append(F.mse_loss(v.float(), target.float()).detach())
        offsets.append(h.abs().mean())
        x, v, t, features = x_next, target, t_next, next_features
    loss = torch.stack(losses).mean()
    stats = {
        "mse_identity": torch.stack(identity).mean(),
        "offset_abs": torch.stack(offsets).mean().detach(),
    }
    return loss, stats
