"""Time grids (schedules) and the step <-> NFE budget arithmetic of each solver.

Grids run from ``t = 1`` (noise) to ``t = 0`` (data), ``steps + 1`` points; ``grid.flip(0)``
gives the increasing grid of an inversion. Values are computed in float64 and then cast, so
every point is the correctly rounded value in the requested dtype and the endpoints are exact.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from bafm.solvers import get_solver

GRID_KINDS = ("uniform", "shift", "optimized", "sd3", "flux")
# Training timesteps of diffusers' FlowMatchEulerDiscreteScheduler (SD3, Flux): the pipelines'
# sigma schedules are defined on them.
PIPELINE_TRAIN_TIMESTEPS = 1000


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


def sd3_grid(
    steps: int,
    shift: float = 3.0,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """The schedule of diffusers' SD3 pipeline: its static shift on its own unshifted grid.

    ``StableDiffusion3Pipeline`` spaces ``N`` unshifted times evenly from 1 down to the scheduler's
    smallest training sigma ``shift(1 / 1000)`` (not down to ``1 / N``), applies
    ``t' = s t / (1 + (s - 1) t)`` and appends 0. SD3-medium and SD3.5 use ``s = 3``.

    Args:
        steps: number of intervals ``N >= 1``.
        shift: static shift ``s > 0`` (the scheduler's ``shift``).
        dtype: floating dtype; None: float32.
        device: device of the result.

    Returns:
        ``(N + 1,)`` strictly decreasing tensor from 1 to 0.
    """
    steps = _check_steps(steps)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")

    def shifted(t: Tensor | float) -> Tensor | float:
        return shift * t / (1.0 + (shift - 1.0) * t)

    t_min = shifted(1.0 / PIPELINE_TRAIN_TIMESTEPS)
    unshifted = torch.linspace(1.0, t_min, steps, dtype=torch.float64)
    grid = torch.cat([shifted(unshifted), unshifted.new_zeros(1)])
    return grid.to(dtype=dtype or torch.float32, device=device)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent shift ``mu``: linear in the number of packed image tokens.

    Defaults are FLUX.1's scheduler config (``mu = 1.15`` at 1024x1024: 4096 tokens).

    Args:
        image_seq_len: packed image tokens, ``(H / 2) * (W / 2)`` for ``(C, H, W)`` latents.
        base_seq_len: tokens at which ``mu = base_shift``.
        max_seq_len: tokens at which ``mu = max_shift``.
        base_shift: ``mu`` at ``base_seq_len``.
        max_shift: ``mu`` at ``max_seq_len``.

    Returns:
        ``mu`` (extrapolated linearly outside the two anchors, as the pipeline does).
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(base_shift + slope * (int(image_seq_len) - base_seq_len))


def flux_grid(
    steps: int,
    mu: float,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """The schedule of diffusers' Flux pipeline: exponential time shift by ``mu``.

    ``FluxPipeline`` passes ``sigmas = linspace(1, 1/N, N)`` and the scheduler maps them to
    ``e^mu / (e^mu + 1/t - 1)`` (a shift ``s = e^mu`` of the same form as SD3's), then appends 0.

    Args:
        steps: number of intervals ``N >= 1``.
        mu: log shift (``flux_mu`` of the image size).
        dtype: floating dtype; None: float32.
        device: device of the result.

    Returns:
        ``(N + 1,)`` strictly decreasing tensor from 1 to 0.
    """
    steps = _check_steps(steps)
    if mu is None or not math.isfinite(float(mu)):
        raise ValueError(f"grid 'flux' needs a finite mu (sampling.mu, or the image size), got {mu!r}")
    unshifted = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    # e^mu / (e^mu + 1/t - 1), written so that t = 1 maps to exactly 1.
    grid = torch.cat([1.0 / (1.0 + math.exp(-float(mu)) * (1.0 / unshifted - 1.0)), unshifted.new_zeros(1)])
    return grid.to(dtype=dtype or torch.float32, device=device)


def make_grid(
    kind: str,
    steps: int,
    shift: float = 1.0,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
    *,
    mu: Optional[float] = None,
) -> Tensor:
    """Grid by name (``sampling.grid`` / ``sampling.shift`` / ``sampling.mu`` in the config).

    ``"optimized"`` grids are searched per solver and NFE and stored in a file; they are read with
    ``bafm.solvers.grid_store.load_grid_table(path).grid(solver, nfe)``, not built here.

    Args:
        kind: ``"uniform"``, ``"shift"``, ``"sd3"`` (SD3 pipeline's schedule) or ``"flux"``
            (Flux pipeline's schedule).
        steps: number of intervals ``N >= 1``.
        shift: shift ``s`` for ``"shift"`` and ``"sd3"`` (ignored by the others).
        dtype: floating dtype; None: float32.
        device: device of the result.
        mu: ``"flux"``'s log shift (``flux_mu``); ignored by the others.

    Returns:
        ``(N + 1,)`` strictly decreasing tensor from 1 to 0.
    """
    if kind == "uniform":
        return uniform_grid(steps, dtype=dtype, device=device)
    if kind == "shift":
        return shifted_grid(steps, shift, dtype=dtype, device=device)
    if kind == "sd3":
        return sd3_grid(steps, shift, dtype=dtype, device=device)
    if kind == "flux":
        return flux_grid(steps, mu, dtype=dtype, device=device)
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
