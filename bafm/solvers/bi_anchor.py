"""SideNet solvers: the bi-anchor BA-solver and its single-anchor ablation.

Both spend one backbone call (NFE) per step and let the SideNet ``side_fn(x, v, t, h)``
estimate the velocity at the other quadrature nodes of the step. With ``h = t_i - t_{i+1}``
(negative on an increasing, inversion grid) the offsets ``c * h`` look toward the step's end,
so inversion uses backward-looking (toward noise) SideNet offsets with no special case.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Optional, Tuple

import numpy as np
from torch import Tensor

from bafm.solvers.base import GridLike, SideFn, SolveResult, VelocityFn, check_grid, register, time_vector
from bafm.solvers.counting import CallCounter

# 4-point Gauss-Lobatto rule on [0, 1]: nodes 0, alpha, 1 - alpha, 1.
LOBATTO_ALPHA = (1.0 - 1.0 / math.sqrt(5.0)) / 2.0
LOBATTO_W_END = 1.0 / 12.0
LOBATTO_W_IN = 5.0 / 12.0
MAX_GL_NODES = 5


def _require_side_fn(side_fn: Optional[SideFn], solver: str) -> SideFn:
    if side_fn is None:
        raise ValueError(
            f"solver '{solver}' needs side_fn=: a SideNet closure side_fn(x, v, t, h) -> velocity "
            "estimate at t - h (see bafm.models.guidance.build_sampling_fns)"
        )
    if not callable(side_fn):
        raise TypeError(f"solver '{solver}': side_fn must be callable, got {type(side_fn).__name__}")
    return side_fn


@register("ba", order=6, nfe_per_step=1, uses_side_fn=True)
def bi_anchor(
    velocity_fn: VelocityFn, x: Tensor, t_grid: GridLike, *, side_fn: Optional[SideFn] = None
) -> SolveResult:
    """Bi-anchor interpolation solver (BA-solver); N steps cost N NFE.

    Per step on ``[t_i, t_{i+1}]`` with ``h = t_i - t_{i+1}`` and the 4-point Lobatto rule
    (nodes ``0, a, 1 - a, 1``, ``a = (1 - 1/sqrt(5)) / 2``; weights ``1/12, 5/12, 5/12, 1/12``):

    1. forward probe (one SideNet call): ``v_a, v_b, v_e = S(x_i, v_i, t_i, (a h, (1-a) h, h))``;
    2. predictor ``x_pred = x_i - h (v_i/12 + 5 v_a/12 + 5 v_b/12 + v_e/12)``, returned on the
       last step;
    3. anchor ``v_{i+1} = v(x_pred, t_{i+1})`` (1 NFE, reused as the next step's ``v_i``);
    4. backward probe ``v_b' = S(x_pred, v_{i+1}, t_{i+1}, -a h)``;
    5. corrector ``x_{i+1} = x_i - h (v_i/12 + 5 v_a/12 + 5 v_b'/12 + v_{i+1}/12)``.

    ``order`` (6) is that of the Lobatto rule, reached with an exact SideNet; with the identity
    SideNet ``S(x, v, t, h) = v`` the method is a Heun variant of order 2.

    Args:
        velocity_fn: ``velocity_fn(x, t) -> v``, ``x`` ``(B, ...)``, ``t`` ``(B,)``.
        x: initial state ``(B, ...)`` at ``t_grid[0]``.
        t_grid: strictly monotone 1-D grid in ``[0, 1]``.
        side_fn: ``side_fn(x, v, t, h) -> v_hat`` at ``t - h``; required. A ``probe`` method, if
            present, takes over the batched multi-offset call (see ``counting.probe``).

    Returns:
        SolveResult with the state at ``t_grid[-1]``; ``side_calls`` is ``2 N - 1``.
    """
    side = CallCounter(_require_side_fn(side_fn, "ba"))
    ts = check_grid(t_grid, x, "ba")
    f = CallCounter(velocity_fn)
    steps = len(ts) - 1
    v = f(x, time_vector(ts[0], x))
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        h = t - t_next
        t_vec = time_vector(t, x)
        offsets = [time_vector(c * h, x) for c in (LOBATTO_ALPHA, 1.0 - LOBATTO_ALPHA, 1.0)]
        v_a, v_b, v_e = side.probe(x, v, t_vec, offsets)
        # Weighted nodes shared by the predictor and the corrector.
        shared = LOBATTO_W_END * v + LOBATTO_W_IN * v_a
        x_pred = x - h * (shared + LOBATTO_W_IN * v_b + LOBATTO_W_END * v_e)
        if i == steps - 1:
            x = x_pred
            break
        t_next_vec = time_vector(t_next, x)
        v_next = f(x_pred, t_next_vec)
        v_b = side(x_pred, v_next, t_next_vec, time_vector(-LOBATTO_ALPHA * h, x))
        x = x - h * (shared + LOBATTO_W_IN * v_b + LOBATTO_W_END * v_next)
        v = v_next
    return SolveResult(x=x, nfe=f.calls, side_calls=side.calls, steps=steps)


@lru_cache(maxsize=None)
def gauss_legendre(nodes: int) -> Tuple[List[float], List[float]]:
    """Gauss-Legendre nodes and weights on ``[0, 1]``.

    Args:
        nodes: number of nodes ``K`` in ``1..5``.

    Returns:
        ``(c, w)``: ``K`` increasing fractions in ``(0, 1)`` and weights summing to 1.
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= MAX_GL_NODES:
        raise ValueError(f"solver 'ba-single': nodes must be an int in 1..{MAX_GL_NODES}, got {nodes!r}")
    c, w = np.polynomial.legendre.leggauss(nodes)
    return [float(v) for v in (c + 1.0) / 2.0], [float(v) for v in w / 2.0]


@register("ba-single", order=6, nfe_per_step=1, uses_side_fn=True)
def single_anchor(
    velocity_fn: VelocityFn,
    x: Tensor,
    t_grid: GridLike,
    *,
    side_fn: Optional[SideFn] = None,
    nodes: int = 3,
) -> SolveResult:
    """Single-anchor ablation: backbone at the step start, SideNet at Gauss-Legendre nodes.

    Per step: ``v_i = v(x_i, t_i)`` (1 NFE), one batched probe
    ``v_k = S(x_i, v_i, t_i, c_k h)`` at the ``K`` Gauss-Legendre fractions ``c_k``, and
    ``x_{i+1} = x_i - h sum_k w_k v_k``. ``order`` is ``2 K`` with an exact SideNet (6 at the
    default ``K = 3``).

    Args:
        velocity_fn: ``velocity_fn(x, t) -> v``, ``x`` ``(B, ...)``, ``t`` ``(B,)``.
        x: initial state ``(B, ...)`` at ``t_grid[0]``.
        t_grid: strictly monotone 1-D grid in ``[0, 1]``.
        side_fn: ``side_fn(x, v, t, h) -> v_hat`` at ``t - h``; required.
        nodes: Gauss-Legendre nodes ``K`` per step, 1..5.

    Returns:
        SolveResult with the state at ``t_grid[-1]``; ``side_calls`` is ``N``.
    """
    side = CallCounter(_require_side_fn(side_fn, "ba-single"))
    fractions, weights = gauss_legendre(nodes)
    ts = check_grid(t_grid, x, "ba-single")
    f = CallCounter(velocity_fn)
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t - t_next
        v = f(x, time_vector(t, x))
        estimates = side.probe(x, v, time_vector(t, x), [time_vector(c * h, x) for c in fractions])
        v_bar = weights[0] * estimates[0]
        for w, est in zip(weights[1:], estimates[1:]):
            v_bar = v_bar + w * est
        x = x - h * v_bar
    return SolveResult(x=x, nfe=f.calls, side_calls=side.calls, steps=len(ts) - 1)
