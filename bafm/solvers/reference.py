"""Ground-truth solver: adaptive Dormand-Prince (torchdiffeq) with tight tolerances."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bafm.solvers.base import GridLike, SolveResult, VelocityFn, check_grid, register
from bafm.solvers.counting import CallCounter

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
# Tight in float64; float32 round-off (~1e-7 relative) would stall the step-size control there.
DEFAULT_TOL_FLOAT64 = 1e-7
DEFAULT_TOL_OTHER = 1e-5


@register("reference", order=5, nfe_per_step=None, reference="dopri5")
def reference(
    velocity_fn: VelocityFn,
    x: Tensor,
    t_grid: GridLike,
    *,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    method: str = "dopri5",
    max_num_steps: int = 100_000,
) -> SolveResult:
    """Adaptive solve from ``t_grid[0]`` to ``t_grid[-1]`` (inner grid points are ignored).

    Args:
        velocity_fn: ``velocity_fn(x, t) -> v``, ``x`` ``(B, ...)``, ``t`` ``(B,)``.
        x: initial state ``(B, ...)`` at ``t_grid[0]``.
        t_grid: strictly monotone 1-D grid in ``[0, 1]``; only its endpoints matter.
        rtol: relative tolerance; None: 1e-7 for float64 states, 1e-5 otherwise.
        atol: absolute tolerance; None: as ``rtol``.
        method: a torchdiffeq adaptive method, one of ``ADAPTIVE_METHODS``.
        max_num_steps: torchdiffeq's cap on accepted + rejected steps.

    Returns:
        SolveResult with the state at ``t_grid[-1]``; ``nfe`` as counted (the whole batch is one
        ODE system, so the step size is shared by all samples).
    """
    from torchdiffeq import odeint  # local: only the reference solver needs it

    if method not in ADAPTIVE_METHODS:
        raise ValueError(f"solver 'reference': method must be one of {ADAPTIVE_METHODS}, got {method!r}")
    ts = check_grid(t_grid, x, "reference")
    default_tol = DEFAULT_TOL_FLOAT64 if x.dtype == torch.float64 else DEFAULT_TOL_OTHER
    rtol = default_tol if rtol is None else rtol
    atol = rtol if atol is None else atol
    f = CallCounter(velocity_fn)
    batch = x.shape[0]

    def rhs(t: Tensor, y: Tensor) -> Tensor:
        return f(y, t.to(dtype=y.dtype).expand(batch))

    span = torch.tensor([ts[0], ts[-1]], dtype=torch.float64, device=x.device)
    out = odeint(rhs, x, span, rtol=rtol, atol=atol, method=method, options={"max_num_steps": max_num_steps})
    return SolveResult(x=out[-1], nfe=f.calls, steps=len(ts) - 1)
