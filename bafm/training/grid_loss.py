"""Grid-aware SideNet loss (beyond the paper): train on exactly the probes a BA step makes.

The chain loss (``bafm.training.ba_loss``) draws offsets from a truncated exponential (mean about
0.02), while BA sampled on an ``N``-step grid asks the SideNet for the velocity at offsets
``alpha H``, ``(1 - alpha) H`` and ``H`` forward from each anchor and ``-alpha H`` backward from
the next one, with ``H`` the grid step (0.1-0.33 at 3-10 NFE). Here each chain walks down a
uniform grid of a budget drawn per sample: it starts at a random grid time ``t_i`` on the
interpolation path, and every link regresses the SideNet's four probes of one BA step onto the
backbone's velocities at the points its own 3-node Gauss-Legendre transport reaches (as the
chain loss does for its single offset), then moves to ``t_{i+1}``. Meant as a fine-tuning stage
after the chain loss (``loss.grid_steps``).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from bafm.models.anchor_features import AnchorFn
from bafm.models.text_condition import Condition, repeat_condition
from bafm.solvers.bi_anchor import LOBATTO_ALPHA
from bafm.solvers.counting import stack_rows
from bafm.training.ba_loss import SideVelocity, _per_sample, _side, gauss_legendre_step

FORWARD_FRACTIONS = (LOBATTO_ALPHA, 1.0 - LOBATTO_ALPHA, 1.0)


def grid_chain_loss(
    anchor: AnchorFn,
    side_velocity: SideVelocity,
    x0: torch.Tensor,
    y: Condition,
    budgets: Sequence[int],
    links: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Mean squared error of the four BA probes per grid step, over up to ``links`` steps per chain.

    Args:
        anchor: ``(x, t, y) -> (v, features)``: the frozen backbone (features None unless the
            SideNet reads them); called without gradient.
        side_velocity: trainable SideNet ``(x, v, t, h, y[, features]) -> v_hat at t - h``.
        x0: clean latents ``(B, C, H, W)``.
        y: conditioning after dropout: labels ``(B,)`` or a ``TextCondition`` of batch ``B``.
        budgets: step counts ``N`` of the uniform grids, one drawn per sample.
        links: grid steps per chain (fewer when the chain reaches ``t = 0`` first).
        generator: random generator on ``x0``'s device.

    Returns:
        ``(loss, stats)``; ``stats["mse_identity"]`` is the same error for reusing ``v``.
    """
    b, device, dtype = x0.shape[0], x0.device, x0.dtype
    choice = torch.randint(len(budgets), (b,), generator=generator, device=device)
    n = torch.as_tensor([int(k) for k in budgets], device=device)[choice]  # (B,) steps of each grid
    step = torch.floor(torch.rand(b, generator=generator, device=device, dtype=torch.float64) * n).long()
    grid_h = (1.0 / n).to(dtype)
    t = (1.0 - step.to(dtype) * grid_h).clamp(0.0, 1.0)  # a grid time of each sample's grid
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=dtype)
    x = (1.0 - _per_sample(t, x0)) * x0 + _per_sample(t, x0) * noise
    with torch.no_grad():
        v, features = anchor(x, t, y)
    errors, identity, weights = [], [], []
    for _ in range(links):
        active = (t > 1e-6).to(dtype)  # chains that reached t = 0 contribute nothing more
        if not bool(active.any()):
            break
        h = torch.minimum(grid_h, t)
        offsets = [c * h for c in FORWARD_FRACTIONS]
        with torch.no_grad():
            # Where each forward probe should land: the GL transport with the SideNet's own estimates.
            xs, vs, ts, fs = stack_rows(3, x, v, t, features)
            ys = repeat_condition(y, 3)  # labels or a TextCondition alike
            landed = gauss_legendre_step(side_velocity, xs, vs, ts, torch.cat(offsets), ys, fs)
            targets, target_features = anchor(landed, ts - torch.cat(offsets), ys)
        pred = _side(side_velocity, xs, vs, ts, torch.cat(offsets), ys, fs)
        pred_a, pred_b, pred_e = pred.chunk(3)
        v_a, v_b, v_e = targets.chunk(3)
        x_next = landed.chunk(3)[2]
        f_next = None if target_features is None else target_features.chunk(3)[2]
        t_next = t - h
        # Backward probe from the next anchor, onto the velocity at the interior node it targets.
        pred_back = _side(side_velocity, x_next, v_e, t_next, -LOBATTO_ALPHA * h, y, f_next)
        probes = ((pred_a, v, v_a), (pred_b, v, v_b), (pred_e, v, v_e), (pred_back, v_e, v_b))
        for p, start, target in probes:  # start: the velocity a probe starts from (its identity estimate)
            errors.append(((p.float() - target.float()).pow(2).flatten(1).mean(dim=1) * active).sum())
            identity.append(((start.float() - target.float()).pow(2).flatten(1).mean(dim=1) * active).sum().detach())
            weights.append(active.sum())
        x, v, t, features = x_next, v_e, t_next, f_next
    total = torch.stack(weights).sum().clamp_min(1.0)
    loss = torch.stack(errors).sum() / total
    stats = {"mse_identity": torch.stack(identity).sum() / total, "offset_abs": grid_h.mean()}
    return loss, stats
