"""UniPC (Zhao et al., 2023), B(h) = bh2 variant with data prediction, in flow-matching form.

With ``alpha = 1 - sigma``, the data prediction ``m = x - sigma dx/dsigma`` and the log-SNR
``lambda = log(alpha / sigma)``, one step ``s -> t`` (``h = lambda_t - lambda_s > 0``) is

- predictor UniP-p: ``x_t = (sigma_t / sigma_s) x_s + (1 - sigma_t / sigma_s) (m_s + sum_k rho_k D_k)``,
  ``D_k = (m_{s_k} - m_s) / r_k``, ``r_k = (lambda_{s_k} - lambda_s) / h`` over the ``p - 1``
  previous points ``s_k``;
- corrector UniC-p, once the model has been called at the predicted ``x_t`` (the call the next
  step needs anyway, so a step still costs one NFE): the same update from ``x_s`` with the extra
  difference ``D_t = m_t - m_s`` (``r = 1``).

``rho`` solves the UniPC order conditions (``R rho = b`` with ``R_ik = r_k^(i-1)`` and ``b`` from
the phi functions of ``-h`` divided by ``B(h) = e^(-h) - 1``); as in the reference implementation,
UniP-2 uses ``rho = 1/2`` and UniC-1 uses ``rho = 1/2``. ``(1 - sigma_t / sigma_s)`` is
``-alpha_t B(h)`` written so that it stays finite at both ends.

Endpoints, handled exactly rather than by moving ``t = 1`` inward: a point with ``sigma = 1``
has ``lambda = -inf``, so ``r_k = -inf`` and its difference ``D_k`` vanishes; its row and column
leave the order conditions, which is the limit of the finite-``lambda`` formulas as that point
tends to ``sigma = 1``. The first step (no history) is UniP-1, which equals the Euler step, and
with lower-order final steps the last step (to ``sigma = 0``, ``lambda = +inf``) is UniP-1 too.

Time frame: on a decreasing (generation) grid ``sigma = t`` and ``dx/dsigma = v``; on an
increasing (inversion) grid ``sigma = 1 - t`` and ``dx/dsigma = -v``, so inversion is the same
method run toward ``t = 1`` (there ``m = x + (1 - t) v`` is the noise prediction) and every
coefficient stays finite.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor

from bafm.solvers.base import GridLike, SolveResult, VelocityFn, check_grid, register, time_vector
from bafm.solvers.counting import CallCounter
from bafm.solvers.multistep import log_snr

UNIPC_ORDERS = (1, 2, 3)


def _order_conditions(h: float, order: int) -> List[float]:
    """``b_1 .. b_order`` of the bh2 order conditions for the data-prediction step ``h``.

    ``b_i = i! phi_{i+1}(-h) (-h)^i / B(h)`` computed by the recursion
    ``phi_{k+1}(z) z = phi_k(z) - 1/k!``; at ``h = inf`` every ``b_i`` is 1.
    """
    hh = -h
    b_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1.0
    factorial, out = 1, []
    for i in range(1, order + 1):
        out.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return out


def _solve(rks: Sequence[float], b: Sequence[float]) -> List[float]:
    """``rho`` with ``sum_k rho_k r_k^(i-1) = b_i`` for ``i = 1 .. len(rks)`` (float64)."""
    n = len(rks)
    r = torch.tensor(rks, dtype=torch.float64)
    matrix = torch.stack([r**i for i in range(n)])
    return torch.linalg.solve(matrix, torch.tensor(b[:n], dtype=torch.float64)).tolist()


def _differences(lambdas: List[float], ms: List[Tensor], idx: List[int], i0: int, h: float):
    """``(r_k, D_k)`` of the history points ``idx`` relative to point ``i0``; ``sigma = 1`` ones drop."""
    rks, ds = [], []
    for j in idx:
        if math.isinf(lambdas[j]):  # sigma = 1: r = -inf, D = 0
            continue
        r = (lambdas[j] - lambdas[i0]) / h
        rks.append(r)
        ds.append((ms[j] - ms[i0]) / r)
    return rks, ds


def _update(x: Tensor, m: Tensor, sig_s: float, sig_t: float, terms: Sequence[tuple]) -> Tensor:
    """``(sigma_t / sigma_s) x + (1 - sigma_t / sigma_s) (m + sum rho D)`` over ``terms = [(rho, D)]``."""
    target = m
    for rho, d in terms:
        target = torch.add(target, d, alpha=rho)
    ratio = sig_t / sig_s
    return torch.add(ratio * x, target, alpha=1.0 - ratio)


@register("unipc", order=2, nfe_per_step=1)
def unipc(velocity_fn: VelocityFn, x: Tensor, t_grid: GridLike, *, order: int = 2) -> SolveResult:
    """UniPC-p (bh2, data prediction) with lower-order start and final steps; N steps, N NFE.

    At grid point ``k`` the model is called once (``m_k``); for ``k > 0`` UniC corrects ``x_k``
    from ``x_{k-1}`` with the order of the previous predictor, then UniP predicts ``x_{k+1}`` with
    order ``min(order, k + 1, N - k)``. The final point gets no call and no correction.

    Declared ``order`` 2: the lower-order final step (UniP-1 into ``t = 0``) has a local error
    ``O(h^2)``, which bounds the global order at 2 for every ``order`` option.

    Args:
        velocity_fn: ``velocity_fn(x, t) -> v``, ``x`` ``(B, ...)``, ``t`` ``(B,)``.
        x: initial state ``(B, ...)`` at ``t_grid[0]``.
        t_grid: strictly monotone 1-D grid in ``[0, 1]``.
        order: predictor order ``p`` in ``1..3`` (UniPC-p; the corrector adds one).

    Returns:
        SolveResult with the state at ``t_grid[-1]``.
    """
    if isinstance(order, bool) or order not in UNIPC_ORDERS:
        raise ValueError(f"solver 'unipc': order must be one of {UNIPC_ORDERS}, got {order!r}")
    ts = check_grid(t_grid, x, "unipc")
    steps = len(ts) - 1
    sign = 1.0 if ts[-1] < ts[0] else -1.0  # dx/dsigma = sign * v
    sigmas = [t if sign > 0 else 1.0 - t for t in ts]
    lambdas = [log_snr(s) for s in sigmas]
    f = CallCounter(velocity_fn)
    ms: List[Tensor] = []
    x_prev, p_prev = x, 0
    for k in range(steps):
        # Data prediction at the model's input (for k > 0 the predicted, uncorrected x_k).
        ms.append(torch.add(x, f(x, time_vector(ts[k], x)), alpha=-sign * sigmas[k]))
        if k > 0:
            # UniC-p_prev: redo step k-1 -> k with m_k (model called at the predicted x_k).
            h = lambdas[k] - lambdas[k - 1]
            rks, ds = _differences(lambdas, ms, list(range(k - 2, k - 1 - p_prev, -1)), k - 1, h)
            b = _order_conditions(h, p_prev)
            rhos = [0.5] if p_prev == 1 else _solve(rks + [1.0], b)
            terms = list(zip(rhos[:-1], ds)) + [(rhos[-1], ms[k] - ms[k - 1])]
            x = _update(x_prev, ms[k - 1], sigmas[k - 1], sigmas[k], terms)
        p = min(order, k + 1, steps - k)
        h = lambdas[k + 1] - lambdas[k]
        rks, ds = _differences(lambdas, ms, list(range(k - 1, k - p, -1)), k, h)
        if not ds:
            rhos = []
        elif p == 2:
            rhos = [0.5]
        else:
            rhos = _solve(rks, _order_conditions(h, p))
        x_prev, p_prev = x, p
        x = _update(x, ms[k], sigmas[k], sigmas[k + 1], list(zip(rhos, ds)))
    return SolveResult(x=x, nfe=f.calls, steps=steps)
