"""Time grids (schedules) and the step <-> NFE budget arithmetic of each solver.

Grids run from ``t = 1`` (noise) to ``t = 0`` (data), ``steps + 1`` points; ``grid.flip(0)``
gives the increasing grid of an inversion. Values are computed in float64 and then cast, so
every point is the correctly rounded value in the requested dtype and the endpoints are exact.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from bafm.solvers import get_solver

GRID_KINDS = ("uniform", "shift", "optimized")


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return steps


def uniform_grid(
    steps: int, dtype: Optional[torch.dtype] = None, device: Optional[torch.device | str] = None
) -> Tensor:
    """Uniform grid ``[1, 1 - 1/N, ..., 1/N, 0]``.

    Args:
        steps: number of intervals ``N >= 1``.
        dtype: floating dtype; None: float32.
        device: device of the result.

    Returns:
        ``(N + 1,)`` strictly decreasing tensor.
    """
    steps = _check_steps(steps)
    grid = torch.arange(steps, -1, -1, dtype=torch.float64) / steps
    return grid.to(dtype=dtype or torch.float32, device=device)


def shifted_grid(
    steps: int,
    shift: float,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """Time-shifted grid ``t' = s t / (1 + (s - 1) t)`` of the uniform grid (SD3 shift).

    ``s > 1`` spends more steps near the noise end, ``s < 1`` near the data end, ``s = 1`` is
    uniform; the endpoints stay exactly 1 and 0.

    Args:
        steps: number of intervals ``N >= 1``.
        shift: ``s > 0``.
        dtype: floating dtype; None: float32.
        device: device of the result.

    Returns:
        ``(N + 1,)`` strictly decreasing tensor.
    """
    steps = _check_steps(steps)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    t = torch.arange(steps, -1, -1, dtype=torch.float64) / steps
    grid = shift * t / (1.0 + (shift - 1.0) * t)
    return grid.to(dtype=dtype or torch.float32, device=device)


def make_grid(
    kind: str,
    steps: int,
    shift: float = 1.0,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """Grid by name (``sampling.grid`` / ``sampling.shift`` in the config).

    ``"optimized"`` grids are searched per solver and NFE and stored in a file; they are read with
    ``bafm.solvers.grid_store.load_grid_table(path).grid(solver, nfe)``, not built here.

    Args:
        kind: ``"uniform"`` or ``"shift"``.
        steps: number of intervals ``N >= 1``.
        shift: shift ``s`` for ``"shift"`` (ignored by ``"uniform"``).
        dtype: floating dtype; None: float32.
        device: device of the result.

    Returns:
        ``(N + 1,)`` strictly decreasing tensor from 1 to 0.
    """
    if kind == "uniform":
        return uniform_grid(steps, dtype=dtype, device=device)
    if kind == "shift":
        return shifted_grid(steps, shift, dtype=dtype, device=device)
    if kind == "optimized":
        raise ValueError(
            "grid 'optimized' is searched per solver and NFE (`bafm optimize-grid`) and read from its JSON "
            "file with bafm.solvers.grid_store.load_grid_table(path).grid(solver, nfe)"
        )
    raise ValueError(f"unknown grid kind {kind!r}, expected one of {GRID_KINDS}")


def _budget(solver_name: str, **options: Any) -> tuple[int, int]:
    """``(per_step, extra)`` such that ``nfe = per_step * steps + extra``."""
    solver = get_solver(solver_name)
    if solver.nfe_per_step is None:
        raise ValueError(
            f"solver '{solver_name}' is adaptive: its NFE is counted during the solve, not fixed by the steps"
        )
    return solver.nfe_per_step, solver.extra_nfe(options)


def nfe_for_steps(solver_name: str, steps: int, **options: Any) -> int:
    """Backbone calls a solver spends on ``steps`` grid intervals.

    Args:
        solver_name: registry name.
        steps: grid intervals ``N >= 1``.
        **options: solver options that change the count (``ab2``: ``start="heun"`` adds 1).

    Returns:
        The NFE.

    Raises:
        ValueError: unknown or adaptive solver, bad ``steps``.
    """
    per_step, extra = _budget(solver_name, **options)
    return per_step * _check_steps(steps) + extra


def steps_for_nfe(solver_name: str, nfe: int, **options: Any) -> int:
    """Grid intervals that spend exactly ``nfe`` backbone calls (e.g. Heun at 10 NFE: 5 steps).

    Args:
        solver_name: registry name.
        nfe: NFE budget.
        **options: solver options that change the count (``ab2``: ``start="heun"``).

    Returns:
        The number of steps.

    Raises:
        ValueError: unknown or adaptive solver, or a budget that cannot be met exactly; the
            message names the nearest feasible budgets (e.g. heun at 7: "nearest: 6 or 8").
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"budget {nfe!r} is not a positive integer")
    per_step, extra = _budget(solver_name, **options)
    steps, rest = divmod(nfe - extra, per_step)
    if steps >= 1 and rest == 0:
        return steps
    nearest = [per_step * s + extra for s in (steps, steps + 1) if s >= 1]
    raise ValueError(
        f"solver '{solver_name}' cannot spend exactly {nfe} NFE ({per_step} per step"
        f"{f' + {extra}' if extra else ''}); nearest: {' or '.join(map(str, nearest))}"
    )
