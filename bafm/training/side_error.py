"""How much of the velocity change the SideNet captures, on states the sampler visits.

For held-out noises the exact ODE is solved once (RK4 with small substeps) from ``t = 1`` down
through every time the uniform grids of the chosen budgets visit. At each grid time ``t`` of a
budget with step ``h`` the SideNet's forward probe is compared, at the offsets the BA step uses
(``alpha h``, ``(1 - alpha) h``, ``h``), with the backbone's velocity at the exact ODE point
``x*(t - c h)``:

``rel_err(t, ch) = |S(x_t, v_t, t, ch) - v*(t - ch)| / |v_t - v*(t - ch)|`` (per sample; median)

0 is an exact SideNet, 1 no better than reusing ``v_t``. The backbone is frozen, so the states,
velocities and targets are computed once and only the SideNet runs at each validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from bafm.models.anchor_features import anchor_for
from bafm.sampling import sample_labels, sample_noise
from bafm.solvers.bi_anchor import LOBATTO_ALPHA

# Held-out noises: evaluation sweeps use seeds 0.. and 100000.., grid searches 1000000...
SIDE_ERROR_SEED = 2_000_000


@dataclass
class ProbeSet:
    """Exact-ODE anchors and targets for the relative-error metric (all on one device).

    Attributes:
        pairs: ``(t, c h)`` per probe, in the order of the tensors below.
        x, v: anchor states and backbone velocities, each ``(P, N, C, H, W)``.
        features: the backbone's tokens at the anchors ``(P, N, T, D)``, or None.
        target: backbone velocities at the exact points ``x*(t - c h)``, ``(P, N, C, H, W)``.
        labels: ``(N,)`` class labels.
    """

    pairs: List[Tuple[float, float]]
    x: Tensor
    v: Tensor
    features: Optional[Tensor]
    target: Tensor
    labels: Tensor


def probe_pairs(budgets: Sequence[int]) -> List[Tuple[float, float]]:
    """``(t, offset)`` of every forward probe of the uniform ``N``-step grids, ``N`` in ``budgets``."""
    pairs = []
    for n in budgets:
        h = 1.0 / int(n)
        for i in range(int(n)):
            t = 1.0 - i * h
            pairs += [(round(t, 12), c * h) for c in (LOBATTO_ALPHA, 1.0 - LOBATTO_ALPHA, 1.0)]
    return pairs


@torch.no_grad()
def build_probe_set(
    backbone: nn.Module,
    sidenet: nn.Module,
    shape: Sequence[int],
    *,
    num_samples: int = 128,
    budgets: Sequence[int] = (5, 10),
    max_substep: float = 0.02,
    seed: int = SIDE_ERROR_SEED,
    device: torch.device | str = "cpu",
) -> ProbeSet:
    """Solve the exact ODE once and collect anchors and targets for ``side_relative_error``.

    Args:
        backbone: frozen backbone (``velocity(x, t, y)``, ``num_classes``).
        sidenet: the SideNet to be measured (only read to know whether it takes backbone features).
        shape: one latent's shape ``(C, H, W)``.
        num_samples: held-out noises ``N``.
        budgets: NFE budgets whose uniform grids' probes are measured.
        max_substep: largest RK4 step between two needed times.
        seed: noise seed (sample ``i`` uses ``seed + i``).
        device: where to solve.

    Returns:
        The ``ProbeSet``.
    """
    pairs = probe_pairs(budgets)
    times = sorted({1.0} | {t for t, _ in pairs} | {max(t - ch, 0.0) for t, ch in pairs}, reverse=True)
    idx = torch.arange(num_samples)
    labels = sample_labels(idx, int(backbone.num_classes), device=device)
    x = sample_noise(idx, shape, seed, device=device)
    anchor = anchor_for(backbone, sidenet)

    def velocity(x: Tensor, t: float) -> Tensor:
        return backbone.velocity(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype), labels)

    states: Dict[float, Tensor] = {1.0: x}
    for t0, t1 in zip(times[:-1], times[1:]):
        steps = max(1, int(torch.ceil(torch.tensor((t0 - t1) / max_substep)).item()))
        dt = (t0 - t1) / steps
        for k in range(steps):  # classic RK4 toward data
            t = t0 - k * dt
            k1 = velocity(x, t)
            k2 = velocity(x - 0.5 * dt * k1, t - 0.5 * dt)
            k3 = velocity(x - 0.5 * dt * k2, t - 0.5 * dt)
            k4 = velocity(x - dt * k3, t - dt)
            x = x - dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        states[t1] = x
    at: Dict[float, Tuple[Tensor, Optional[Tensor]]] = {}
    for t in times:
        at[t] = anchor(states[t], torch.full((num_samples,), t, device=x.device, dtype=x.dtype), labels)
    xs = torch.stack([states[t] for t, _ in pairs])
    vs = torch.stack([at[t][0] for t, _ in pairs])
    feats = None if at[1.0][1] is None else torch.stack([at[t][1] for t, _ in pairs])  # type: ignore[misc]
    targets = torch.stack([at[max(t - ch, 0.0)][0] for t, ch in pairs])
    return ProbeSet(pairs, xs, vs, feats, targets, labels)


@torch.no_grad()
def side_relative_error(sidenet: nn.Module, probes: ProbeSet) -> Dict[Tuple[float, float], float]:
    """Median relative error of the SideNet at each ``(t, offset)`` of ``probes``.

    Args:
        sidenet: module with ``velocity(x, v, t, h, y[, features])``.
        probes: from ``build_probe_set``.

    Returns:
        ``(t, offset) -> median over samples of |S - v*| / |v_t - v*|``.
    """
    out = {}
    n = probes.labels.shape[0]
    for p, (t, ch) in enumerate(probes.pairs):
        x, v, target = probes.x[p], probes.v[p], probes.target[p]
        tt = torch.full((n,), t, device=x.device, dtype=x.dtype)
        hh = torch.full((n,), ch, device=x.device, dtype=x.dtype)
        extra = () if probes.features is None else (probes.features[p],)
        estimate = sidenet.velocity(x, v, tt, hh, probes.labels, *extra)
        err = (estimate - target).flatten(1).norm(dim=1)
        change = (v - target).flatten(1).norm(dim=1).clamp_min(1e-12)
        out[(t, ch)] = float((err / change).median())
    return out


def summarize(errors: Dict[Tuple[float, float], float], max_offset: float = 0.2) -> Dict[str, float]:
    """``mean`` and ``worst`` of the medians over probes with ``offset <= max_offset``."""
    kept = [e for (t, ch), e in errors.items() if ch <= max_offset + 1e-12]
    return {"mean": sum(kept) / len(kept), "worst": max(kept)}
