"""One-step Runge-Kutta solvers on a given grid: Euler, Heun, midpoint, classic RK4.

All integrate ``dx/dt = v(x, t)`` with the signed step ``dt = t_{i+1} - t_i`` (negative when
generating, ``t: 1 -> 0``; positive when inverting, ``t: 0 -> 1``).

Every solver here takes the shared arguments, documented once: ``velocity_fn(x, t) -> v`` with
``x`` ``(B, ...)`` and ``t`` ``(B,)``; ``x``, the initial state ``(B, ...)`` at ``t_grid[0]``;
``t_grid``, a strictly monotone 1-D grid in ``[0, 1]``. Each returns a ``SolveResult`` with the
state at ``t_grid[-1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bafm.solvers.base import GridLike, SolveResult, VelocityFn, check_grid, register, time_vector
from bafm.solvers.counting import CallCounter


@register("euler", order=1, nfe_per_step=1)
def euler(velocity_fn: VelocityFn, x: Tensor, t_grid: GridLike) -> SolveResult:
    """Explicit Euler: ``x_{i+1} = x_i + dt * v(x_i, t_i)``; 1 NFE per step.

    Args and returns: the shared signature (module docstring).
    """
    ts = check_grid(t_grid, x, "euler")
    f = CallCounter(velocity_fn)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = torch.add(x, f(x, time_vector(t, x)), alpha=t_next - t)
    return SolveResult(x=x, nfe=f.calls, steps=len(ts) - 1)


def _two_stage(velocity_fn: VelocityFn, x: Tensor, t_grid: GridLike, name: str, c: float) -> SolveResult:
    """Explicit two-stage Runge-Kutta with ``c2 = a21 = c`` and weights ``(1 - 1/(2c), 1/(2c))``.

    ``k1 = v(x_i, t_i)``, ``k2 = v(x_i + c dt k1, t_i + c dt)``,
    ``x_{i+1} = x_i + dt ((1 - b) k1 + b k2)`` with ``b = 1/(2c)``: second order for every ``c``.
    """
    ts = check_grid(t_grid, x, name)
    f = CallCounter(velocity_fn)
    b = 0.5 / c
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t
        k1 = f(x, time_vector(t, x))
        # c = 1 ends on the grid point itself (t + dt can round away from t_next).
        k2 = f(torch.add(x, k1, alpha=c * dt), time_vector(t_next if c == 1.0 else t + c * dt, x))
        x = torch.add(x, k2 if b == 1.0 else (1.0 - b) * k1 + b * k2, alpha=dt)
    return SolveResult(x=x, nfe=f.calls, steps=len(ts) - 1)


@register("heun", order=2, nfe_per_step=2)
def heun(velocity_fn: VelocityFn, x: Tensor, t_grid: GridLike) -> SolveResult:
    """Heun's method (explicit trapezoid, ``c = 1``); 2 NFE per step, including the last.

    ``k1 = v(x_i, t_i)``, ``k2 = v(x_i + dt k1, t_{i+1})``, ``x_{i+1} = x_i + dt (k1 + k2) / 2``.

    Args and returns: the shared signature (module docstring).
    """
    return _two_stage(velocity_fn, x, t_grid, "heun", 1.0)


@register("midpoint", order=2, nfe_per_step=2)
def midpoint(velocity_fn: VelocityFn, x: Tensor, t_grid: GridLike) -> SolveResult:
    """Explicit midpoint method (``c = 1/2``); 2 NFE per step.

    ``k1 = v(x_i, t_i)``, ``k2 = v(x_i + dt/2 k1, t_i + dt/2)``, ``x_{i+1} = x_i + dt k2``.

    Args and returns: the shared signature (module docstring).
    """
    return _two_stage(velocity_fn, x, t_grid, "midpoint", 0.5)


@register("rk4", order=4, nfe_per_step=4, reference="rk4")
def rk4(velocity_fn: VelocityFn, x: Tensor, t_grid: GridLike) -> SolveResult:
    """Classic fourth-order Runge-Kutta (1/6, 1/3, 1/3, 1/6 weights); 4 NFE per step.

    Args and returns: the shared signature (module docstring).
    """
    ts = check_grid(t_grid, x, "rk4")
    f = CallCounter(velocity_fn)
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t
        t_mid = time_vector(t + 0.5 * dt, x)
        k1 = f(x, time_vector(t, x))
        k2 = f(torch.add(x, k1, alpha=0.5 * dt), t_mid)
        k3 = f(torch.add(x, k2, alpha=0.5 * dt), t_mid)
        k4 = f(torch.add(x, k3, alpha=dt), time_vector(t_next, x))
        x = torch.add(x, k1 + 2.0 * (k2 + k3) + k4, alpha=dt / 6.0)
    return SolveResult(x=x, nfe=f.calls, steps=len(ts) - 1)
