"""Time grids (schedules), the grid of one solve, and the step <-> NFE budget arithmetic of each solver.

Grids run from ``t = 1`` (noise) to ``t = 0`` (data), ``steps + 1`` points; ``grid.flip(0)``
gives the increasing grid of an inversion. Values are computed in float64 and then cast, so
every point is the correctly rounded value in the requested dtype and the endpoints are exact.
Whether a solver has a budget at all (adaptive solvers do not) is the registry's fact
(``bafm.solvers.is_adaptive``), asked here and nowhere else by the grid builders.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor

from bafm.solvers.base import SOLVERS, is_adaptive, solver_facts

# sampling.grid choices: built here ("uniform", "shift", and the SD3 / Flux pipelines' own "sd3",
# "flux") or searched and stored per solver and NFE ("optimized").
GRID_KINDS = ("uniform", "shift", "optimized", "sd3", "flux")
# A named grid kind or an explicit 1-D grid.
GridSpec = Union[str, Tensor]
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
    facts = solver_facts(solver_name)
    if facts.adaptive:
        raise ValueError(
            f"solver '{solver_name}' is adaptive: its NFE is counted during the solve, not fixed by the steps"
        )
    return int(facts.nfe_per_step), SOLVERS[solver_name].extra_nfe(options)  # type: ignore[attr-defined]


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


def steps_for_budget(solver: str, nfe: Optional[int]) -> int:
    """Grid intervals that spend exactly ``nfe`` backbone calls in one direction.

    Args:
        solver: registry name.
        nfe: NFE budget; must be None for an adaptive solver (its calls are counted, not set).

    Returns:
        The number of steps (1 for an adaptive solver, which only uses the endpoints).

    Raises:
        ValueError: unknown solver, budget given to an adaptive solver, missing or infeasible
            budget (naming the nearest feasible ones).
    """
    if is_adaptive(solver):
        if nfe is not None:
            raise ValueError(f"solver '{solver}' is adaptive: it takes no NFE budget (got {nfe}); pass nfe=None")
        return 1
    if nfe is None:
        raise ValueError(f"solver '{solver}' needs an NFE budget (nfe=...)")
    return steps_for_nfe(solver, nfe)


def time_grid(
    solver: str,
    steps: int,
    grid: str = "uniform",
    *,
    shift: float = 1.0,
    increasing: bool = False,
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device | str] = None,
    mu: Optional[float] = None,
) -> Tensor:
    """The time grid of a solve with ``steps`` intervals; ``[1, 0]`` for adaptive solvers.

    Args:
        solver: solver name.
        steps: grid intervals (ignored by adaptive solvers: ``reference``, ``ba-adaptive``).
        grid: grid kind (``GRID_KINDS`` but ``"optimized"``).
        shift: time shift of ``"shift"`` and ``"sd3"`` grids.
        increasing: True for an inversion grid ``0 -> 1``, False for a generation grid ``1 -> 0``.
        dtype: grid dtype; the solver rounds it to the state's dtype.
        device: grid device.
        mu: log shift of ``"flux"`` grids.

    Returns:
        Strictly monotone 1-D grid between 1 and 0; inversion and generation with the same
        arguments visit the same times, in opposite orders.
    """
    if is_adaptive(solver):
        t_grid = torch.tensor([1.0, 0.0], dtype=dtype, device=device)
    else:
        t_grid = make_grid(str(grid), int(steps), shift=float(shift), dtype=dtype, device=device, mu=mu)
    return t_grid.flip(0) if increasing else t_grid


def solve_grid(
    solver: str,
    nfe: Optional[int],
    grid: GridSpec = "uniform",
    *,
    shift: float = 1.0,
    increasing: bool,
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device | str] = None,
    mu: Optional[float] = None,
) -> Tensor:
    """The time grid of one solve that spends an NFE budget.

    Args:
        solver: registry name.
        nfe: NFE budget (None for an adaptive solver, or to take the steps from an explicit grid).
        grid: ``"uniform"`` / ``"shift"`` (built with ``steps_for_budget(solver, nfe)`` steps), or an
            explicit strictly monotone grid between 0 and 1 in either orientation.
        shift: time shift of ``"shift"`` and ``"sd3"`` grids.
        increasing: True for an inversion grid ``0 -> 1``, False for a generation grid ``1 -> 0``.
        dtype: dtype of a named grid (an explicit one keeps its own).
        device: device of the grid.
        mu: log shift of ``"flux"`` grids.

    Returns:
        1-D grid from 0 to 1 (``increasing``) or from 1 to 0.

    Raises:
        ValueError: unknown grid kind, a budget that the explicit grid does not spend, bad budget.
    """
    if isinstance(grid, str):
        t_grid = make_grid(grid, steps_for_budget(solver, nfe), shift=shift, dtype=dtype, device=device, mu=mu)
    else:
        t_grid = torch.as_tensor(grid, device=device)
        if t_grid.dim() != 1 or t_grid.numel() < 2:
            raise ValueError(f"grid must be a 1-D tensor with at least 2 points, got shape {tuple(t_grid.shape)}")
        if t_grid[0] < t_grid[-1]:
            t_grid = t_grid.flip(0)  # store decreasing; flipped back below for inversions
        if nfe is not None and not is_adaptive(solver):
            spent = nfe_for_steps(solver, t_grid.numel() - 1)
            if spent != nfe:
                raise ValueError(
                    f"solver '{solver}' spends {spent} NFE on the given {t_grid.numel() - 1}-step grid, not {nfe}"
                )
    if not (float(t_grid[0]) == 1.0 and float(t_grid[-1]) == 0.0):
        ends = (float(t_grid[-1]), float(t_grid[0]))
        raise ValueError(f"grid must run between t = 0 and t = 1, got endpoints {ends}")
    return t_grid.flip(0) if increasing else t_grid
