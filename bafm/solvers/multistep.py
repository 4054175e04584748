"""Multistep solvers: Adams-Bashforth 2, DPM-Solver++(2M) in flow-matching form and iPNDM.

All spend one NFE per step and keep their history (previous velocity / data prediction) in
local variables.

Every solver here takes the shared arguments, documented once: ``velocity_fn(x, t) -> v`` with
``x`` ``(B, ...)`` and ``t`` ``(B,)``; ``x``, the initial state ``(B, ...)`` at ``t_grid[0]``;
``t_grid``, a strictly monotone 1-D grid in ``[0, 1]``. Each returns a ``SolveResult`` with the
state at ``t_grid[-1]``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np

import torch
from torch import Tensor

from bafm.solvers.base import GridLike, SolveResult, VelocityFn, check_grid, register, time_vector
from bafm.solvers.counting import CallCounter

_AB2_STARTS = ("euler", "heun")


def _ab2_extra_nfe(options: Dict[str, Any]) -> int:
    # A Heun first step costs one call more than the Euler one.
    return 1 if options.get("start", "euler") == "heun" else 0


@register("ab2", order=2, nfe_per_step=1, extra_nfe=_ab2_extra_nfe)
def ab2(velocity_fn: VelocityFn, x: Tensor, t_grid: GridLike, *, start: str = "euler") -> SolveResult:
    """Variable-step Adams-Bashforth 2.

    With ``dt_i = t_{i+1} - t_i`` and ``r = dt_i / (2 dt_{i-1})``:
    ``x_{i+1} = x_i + dt_i ((1 + r) v_i - r v_{i-1})``. The first step has no history and is an
    Euler step (N steps = N NFE) or a Heun step (N + 1 NFE); either keeps global order 2.

    Args:
        velocity_fn: ``velocity_fn(x, t) -> v``, ``x`` ``(B, ...)``, ``t`` ``(B,)``.
        x: initial state ``(B, ...)`` at ``t_grid[0]``.
        t_grid: strictly monotone 1-D grid in ``[0, 1]``.
        start: ``"euler"`` or ``"heun"``, the first step.

    Returns:
        SolveResult with the state at ``t_grid[-1]``.
    """
    if start not in _AB2_STARTS:
        raise ValueError(f"solver 'ab2': start must be one of {_AB2_STARTS}, got {start!r}")
    ts = check_grid(t_grid, x, "ab2")
    f = CallCounter(velocity_fn)
    v_prev, dt_prev = None, 0.0
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t
        v = f(x, time_vector(t, x))
        if v_prev is None and start == "heun":
            v_end = f(torch.add(x, v, alpha=dt), time_vector(t_next, x))
            x_next = torch.add(x, v + v_end, alpha=0.5 * dt)
        elif v_prev is None:
            x_next = torch.add(x, v, alpha=dt)
        else:
            r = dt / (2.0 * dt_prev)
            x_next = torch.add(x, torch.add(v, v - v_prev, alpha=r), alpha=dt)
        x, v_prev, dt_prev = x_next, v, dt
    return SolveResult(x=x, nfe=f.calls, steps=len(ts) - 1)


def log_snr(t: float) -> float:
    """``lambda(t) = log((1 - t) / t)``, with ``+inf`` at ``t = 0`` and ``-inf`` at ``t = 1``."""
    if t <= 0.0:
        return math.inf
    if t >= 1.0:
        return -math.inf
    return math.log1p(-t) - math.log(t)


@register("dpm++2m", order=2, nfe_per_step=1)
def dpmpp_2m(velocity_fn: VelocityFn, x: Tensor, t_grid: GridLike) -> SolveResult:
    """DPM-Solver++(2M) for flow matching (the "Flow-DPM" baseline).

    With ``alpha_t = 1 - t``, ``sigma_t = t``, the data prediction ``x0 = x - t v`` and the
    log-SNR ``lambda = log((1 - t) / t)``, one step ``t -> s`` with ``h = lambda_s - lambda_t`` is
    (DPM-Solver++ Alg. 2):
    ``x_s = (s / t) x + alpha_s (1 - e^{-h}) D = (s / t) x + (1 - s / t) D``,
    ``D = x0_t + (x0_t - x0_prev) / (2 r)``, ``r = h_prev / h``.
    With ``D = x0_t`` (first order) this is exactly the Euler step ``x + (s - t) v``, which is
    the form used for first-order steps since it stays finite at ``t = 0`` and ``t = 1``.

    A step is first order when its log-SNR extrapolation is undefined, i.e. when any of the
    previous, current or next time is an endpoint ``0`` or ``1`` (``lambda = +-inf``): the first
    step (no history), the step right after ``t = 1`` (``r = inf``, the correction's limit is 0),
    and a step that ends at ``t = 0`` (``r = 0``; the data prediction is taken as is). An
    increasing (inversion) grid is handled the same way: the step from ``t = 0`` is the Euler step
    ``x + s v`` and the step that ends at ``t = 1`` is first order. Global order stays 2.

    Args and returns: the shared signature (module docstring).
    """
    ts = check_grid(t_grid, x, "dpm++2m")
    lambdas = [log_snr(t) for t in ts]
    f = CallCounter(velocity_fn)
    x0_prev = None
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        v = f(x, time_vector(t, x))
        x0 = torch.add(x, v, alpha=-t)  # data prediction at t
        x_next = torch.add(x, v, alpha=t_next - t)  # first-order (DDIM = Euler) update
        if x0_prev is not None:
            h, h_prev = lambdas[i + 1] - lambdas[i], lambdas[i] - lambdas[i - 1]
            if math.isfinite(h) and math.isfinite(h_prev):
                r = h_prev / h
                # Second-order term (1 - s/t) (x0 - x0_prev) / (2r) of the 2M update.
                x_next = torch.add(x_next, x0 - x0_prev, alpha=(1.0 - t_next / t) / (2.0 * r))
        x, x0_prev = x_next, x0
    return SolveResult(x=x, nfe=f.calls, steps=len(ts) - 1)


IPNDM_ORDERS = (1, 2, 3, 4)


def adams_bashforth_weights(times: Sequence[float], t_next: float) -> List[float]:
    """Variable-step Adams-Bashforth weights: ``x_next = x + (t_next - t) sum_j w_j v(times[j])``.

    The velocity is replaced by its interpolating polynomial through ``times`` (oldest first, the
    current time ``t = times[-1]`` last) and integrated exactly over ``[t, t_next]``. On a uniform
    grid these are the classic coefficients (order 4: ``55/24, -59/24, 37/24, -9/24``, newest first).

    Args:
        times: the ``q >= 1`` distinct times of the velocity history, oldest first.
        t_next: the end of the step.

    Returns:
        ``q`` weights (summing to 1), in the order of ``times``.
    """
    if len(times) == 1:
        return [1.0]  # Euler
    dt = t_next - times[-1]
    nodes = [(t - times[-1]) / dt for t in times]  # the step is [0, 1] in these units
    weights = []
    for j, node in enumerate(nodes):
        others = nodes[:j] + nodes[j + 1 :]
        basis = np.polynomial.Polynomial.fromroots(others) / np.prod([node - o for o in others])
        antiderivative = basis.integ()
        weights.append(float(antiderivative(1.0) - antiderivative(0.0)))
    return weights


@register("ipndm", order=2, nfe_per_step=1)
def ipndm(velocity_fn: VelocityFn, x: Tensor, t_grid: GridLike, *, order: int = 4) -> SolveResult:
    """Improved PNDM: explicit Adams-Bashforth on the velocity, its order growing with the history.

    Step ``i`` uses the last ``min(order, i + 1)`` velocities: Euler, then AB2, AB3, AB4; no
    Runge-Kutta warm-up, so N steps cost N NFE. Non-uniform grids use the variable-step weights
    of ``adams_bashforth_weights`` (the classic ones on a uniform grid).

    Declared ``order`` 2: the Euler first step has a local error ``O(h^2)``, which bounds the
    global order at 2 for ``order >= 2`` (the later AB steps are more accurate, and at few steps
    the higher-order terms dominate).

    Args:
        velocity_fn: ``velocity_fn(x, t) -> v``, ``x`` ``(B, ...)``, ``t`` ``(B,)``.
        x: initial state ``(B, ...)`` at ``t_grid[0]``.
        t_grid: strictly monotone 1-D grid in ``[0, 1]``.
        order: highest Adams-Bashforth order, ``1..4``.

    Returns:
        SolveResult with the state at ``t_grid[-1]``.
    """
    if isinstance(order, bool) or order not in IPNDM_ORDERS:
        raise ValueError(f"solver 'ipndm': order must be one of {IPNDM_ORDERS}, got {order!r}")
    ts = check_grid(t_grid, x, "ipndm")
    f = CallCounter(velocity_fn)
    history: List[Tensor] = []
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        history = (history + [f(x, time_vector(t, x))])[-order:]
        weights = adams_bashforth_weights(ts[i + 1 - len(history) : i + 1], t_next)
        slope = weights[-1] * history[-1]
        for w, v in zip(weights[:-1], history[:-1]):
            slope = torch.add(slope, v, alpha=w)
        x = torch.add(x, slope, alpha=t_next - t)
    return SolveResult(x=x, nfe=f.calls, steps=len(ts) - 1)
