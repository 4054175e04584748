"""Adaptive BA-solver: step-size control on the gap between the BA predictor and corrector.

Every BA step already yields two solutions of the same step (``bafm.solvers.bi_anchor``): the
predictor ``x_pred`` (SideNet nodes only) and the corrector ``x_corr`` (with the backbone anchor
at the step's end and the backward probe). Their gap estimates the local error at no extra
backbone call, the way an embedded Runge-Kutta pair does: the step is accepted when

``err = sqrt(mean(((x_corr - x_pred) / (atol + rtol max(|x|, |x_corr|)))^2)) <= 1``

(the corrector is kept, and its anchor velocity reused by the next step), rejected otherwise
(the anchor call is spent and counted); either way the next step size is
``h * clamp(safety * err^(-1 / (error_order + 1)), min_factor, max_factor)``, with no growth
right after a rejection.

Step sizes are per sample: each sample is accepted, rejected and advanced on its own, so its
result and its NFE do not depend on the other samples of the batch (per-sample seeds stay
meaningful). The velocity closure binds the batch's labels and guidance, so the backbone is
still called on the whole batch: samples that have finished (or wait) ride along unchanged.
``nfe`` (calls, as counted) is therefore the batch's cost, and ``nfe_per_sample`` the calls
each sample took part in until it reached the end (its own need).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from bafm.solvers.base import GridLike, SideFn, SolveResult, VelocityFn, check_grid, register
from bafm.solvers.bi_anchor import LOBATTO_ALPHA, LOBATTO_W_END, LOBATTO_W_IN, _require_side_fn
from bafm.solvers.counting import CallCounter, select_rows


def _rows(value: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` in ``like``'s dtype, to scale batch-first states."""
    return value.to(like.dtype).view(-1, *[1] * (like.dim() - 1))


def _check_options(rtol: float, atol: float, max_nfe: int, first_step: float, safety: float,
                   min_factor: float, max_factor: float, error_order: int) -> None:
    checks = [
        (rtol > 0 and atol >= 0, f"rtol must be > 0 and atol >= 0, got rtol={rtol!r}, atol={atol!r}"),
        (isinstance(max_nfe, int) and not isinstance(max_nfe, bool) and max_nfe >= 2,
         f"max_nfe must be an int >= 2 (the call at the start and one step), got {max_nfe!r}"),
        (0 < first_step <= 1, f"first_step must be in (0, 1], got {first_step!r}"),
        (0 < safety <= 1, f"safety must be in (0, 1], got {safety!r}"),
        (0 < min_factor <= 1 <= max_factor, f"need 0 < min_factor <= 1 <= max_factor, got {min_factor!r}, {max_factor!r}"),
        (isinstance(error_order, int) and error_order >= 1, f"error_order must be an int >= 1, got {error_order!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"solver 'ba-adaptive': {message}")


@register("ba-adaptive", order=6, nfe_per_step=None, uses_side_fn=True)
def ba_adaptive(
    velocity_fn: VelocityFn,
    x: Tensor,
    t_grid: GridLike,
    *,
    side_fn: Optional[SideFn] = None,
    rtol: float = 1e-3,
    atol: float = 1e-3,
    max_nfe: int = 50,
    first_step: float = 0.05,
    safety: float = 0.9,
    min_factor: float = 0.2,
    max_factor: float = 4.0,
    error_order: int = 3,
    trace: Optional[List[dict]] = None,
) -> SolveResult:
    """BA steps of adaptive size from ``t_grid[0]`` to ``t_grid[-1]`` (inner grid points are ignored).

    One attempt costs one backbone call (the anchor at the step's end) and two SideNet calls;
    the solve starts with one call at ``t_grid[0]``. A sample whose next attempt would use its
    ``max_nfe``-th call jumps to the end and accepts that step whatever its error, so no sample
    takes part in more than ``max_nfe`` calls.

    Args:
        velocity_fn: ``velocity_fn(x, t) -> v``, ``x`` ``(B, ...)``, ``t`` ``(B,)`` (per-sample times).
        x: initial state ``(B, ...)`` at ``t_grid[0]``.
        t_grid: strictly monotone 1-D grid in ``[0, 1]``; only its endpoints matter.
        side_fn: ``side_fn(x, v, t, h) -> v_hat`` at ``t - h``; required.
        rtol: relative tolerance of the error norm.
        atol: absolute tolerance of the error norm.
        max_nfe: most backbone calls one sample takes part in (start included), ``>= 2``.
        first_step: size of the first attempted step, in ``(0, 1]``. Small by default: a step the
            controller grows (at most ``max_factor`` per step) costs less than a rejected one
            (the defaults' measurements: README, "Adaptive BA against fixed grids").
        safety: factor on the optimal step-size ratio.
        min_factor: smallest step-size ratio from one attempt to the next.
        max_factor: largest step-size ratio (1 right after a rejection).
        error_order: ``q`` with the gap taken as ``O(h^(q+1))``. 1 is the identity-SideNet limit
            (predictor Euler, corrector Heun); a trained SideNet's predictor is better than Euler, so
            the default is 3 (it rejects fewer steps than 1 or 2 on the embedded default).
        trace: if a list, one dict per attempt is appended (``t``, ``h``, ``err``, ``accepted``,
            ``active``: ``(B,)`` tensors), for diagnostics and tests.

    Returns:
        SolveResult: ``x`` at ``t_grid[-1]``; ``nfe`` batch calls; ``nfe_per_sample`` int64
        ``(B,)``; ``steps`` the most accepted steps of any sample; ``side_calls`` as counted.
    """
    _check_options(rtol, atol, max_nfe, first_step, safety, min_factor, max_factor, error_order)
    side = CallCounter(_require_side_fn(side_fn, "ba-adaptive"))
    ts = check_grid(t_grid, x, "ba-adaptive")
    t_end, direction = ts[-1], (1.0 if ts[-1] > ts[0] else -1.0)
    f = CallCounter(velocity_fn)
    batch = x.shape[0]
    # Times in float64 (step sizes accumulate); the model sees them in x's dtype.
    t = torch.full((batch,), ts[0], dtype=torch.float64, device=x.device)
    size = torch.full_like(t, min(first_step, abs(t_end - ts[0])))
    nfe = torch.ones(batch, dtype=torch.int64, device=x.device)
    accepted = torch.zeros_like(nfe)
    done = torch.zeros(batch, dtype=torch.bool, device=x.device)
    v = f(x, t.to(x.dtype))
    while not bool(done.all()):
        active = ~done
        remaining = (t_end - t).abs()
        last_call = nfe + 1 >= max_nfe
        step = torch.where(last_call, remaining, torch.minimum(size, remaining))
        step = torch.where(active, step, torch.zeros_like(step))
        lands = step >= remaining
        t_next = torch.where(lands, torch.full_like(t, t_end), t + direction * step)
        h = t - t_next  # > 0 toward data, as in the BA step
        t_x, h_x, t_next_x = t.to(x.dtype), h.to(x.dtype), t_next.to(x.dtype)
        # Forward probe, predictor, anchor (the only backbone call), backward probe, corrector.
        v_a, v_b, v_e = side.probe(x, v, t_x, [LOBATTO_ALPHA * h_x, (1.0 - LOBATTO_ALPHA) * h_x, h_x])
        shared = LOBATTO_W_END * v + LOBATTO_W_IN * v_a
        x_pred = x - _rows(h, x) * (shared + LOBATTO_W_IN * v_b + LOBATTO_W_END * v_e)
        v_next = f(x_pred, t_next_x)
        nfe += active.long()
        v_b = side(x_pred, v_next, t_next_x, -LOBATTO_ALPHA * h_x)
        x_corr = x - _rows(h, x) * (shared + LOBATTO_W_IN * v_b + LOBATTO_W_END * v_next)
        # Error norm per sample (RMS over its coordinates), in float64.
        scale = atol + rtol * torch.maximum(x.abs(), x_corr.abs()).double()
        err = ((x_corr - x_pred).double() / scale).pow(2).flatten(1).mean(dim=1).sqrt()
        ok = active & ((err <= 1.0) | last_call)
        factor = (safety * err.clamp_min(1e-12).pow(-1.0 / (error_order + 1))).clamp(min_factor, max_factor)
        factor = torch.where(ok, factor, factor.clamp(max=1.0))
        if trace is not None:
            trace.append({"t": t.clone(), "h": h.clone(), "err": err.clone(), "accepted": ok.clone(),
                          "active": active.clone()})
        keep = _rows(ok, x).bool()
        x = torch.where(keep, x_corr, x)
        v = select_rows(side, ok, v_next, v)  # the closure selects what the SideNet reads with it
        t = torch.where(ok, t_next, t)
        size = torch.where(active, step * factor, size)
        accepted += ok.long()
        done = done | (ok & lands)
    return SolveResult(x=x, nfe=f.calls, side_calls=side.calls, steps=int(accepted.max()), nfe_per_sample=nfe)
