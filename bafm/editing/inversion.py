"""Inversion (data -> noise) and regeneration (noise -> data) on top of the registered solvers.

Inversion integrates the same ODE as sampling, ``dx/dt = v(x, t)``, but forward in time, from
``t = 0`` (data) to ``t = 1`` (noise), on the increasing version of the sampling grid. Every solver
of ``bafm.solvers.SOLVERS`` accepts such a grid; on it the bi-anchor solver's SideNet offsets
``c * h`` are negative, so it looks backward (toward noise) and still pays one NFE per anchor.
Nothing here re-implements a solver: these helpers only choose the grid and the step count.

Editing (``edit_latents``) inverts under the source class and regenerates the noise twice: under
the source class (a reconstruction, which measures the round-trip error) and under the target
class (the edit). Guidance, if any, lives in the closures of ``bafm.models.guidance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from bafm.models.guidance import BackboneVelocity, SideVelocity, build_sampling_fns
from bafm.solvers import SideFn, SolveResult, VelocityFn, get_solver
from bafm.solvers.grids import make_grid, nfe_for_steps, steps_for_nfe

GridSpec = Union[str, Tensor]


def is_adaptive(solver: str) -> bool:
    """Whether a registered solver picks its own steps (``reference``), so has no NFE budget."""
    return get_solver(solver).nfe_per_step is None


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


def solve_grid(
    solver: str,
    nfe: Optional[int],
    grid: GridSpec = "uniform",
    *,
    shift: float = 1.0,
    increasing: bool,
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """The time grid of one solve.

    Args:
        solver: registry name.
        nfe: NFE budget (None for an adaptive solver, or to take the steps from an explicit grid).
        grid: ``"uniform"`` / ``"shift"`` (built with ``steps_for_budget(solver, nfe)`` steps), or an
            explicit strictly monotone grid between 0 and 1 in either orientation.
        shift: time shift of ``"shift"`` grids.
        increasing: True for an inversion grid ``0 -> 1``, False for a generation grid ``1 -> 0``.
        dtype: dtype of a named grid (an explicit one keeps its own); the solver rounds it to the
            state's dtype.
        device: device of the grid.

    Returns:
        1-D grid from 0 to 1 (``increasing``) or from 1 to 0. Inversion and generation with the same
        arguments visit the same times, in opposite orders.

    Raises:
        ValueError: unknown grid kind, a budget that the explicit grid does not spend, bad budget.
    """
    if isinstance(grid, str):
        t_grid = make_grid(grid, steps_for_budget(solver, nfe), shift=shift, dtype=dtype, device=device)
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


def _solve(
    velocity_fn: VelocityFn,
    x: Tensor,
    solver: str,
    t_grid: Tensor,
    side_fn: Optional[SideFn],
    options: Dict[str, Any],
) -> SolveResult:
    """Call the solver, handing ``side_fn`` only to the solvers that take one."""
    fn = get_solver(solver)
    if fn.uses_side_fn:
        options = {**options, "side_fn": side_fn}
    return fn(velocity_fn, x, t_grid.to(device=x.device), **options)


def invert(
    velocity_fn: VelocityFn,
    x0: Tensor,
    solver: str,
    nfe: Optional[int] = None,
    side_fn: Optional[SideFn] = None,
    grid: GridSpec = "uniform",
    *,
    shift: float = 1.0,
    **solver_options: Any,
) -> SolveResult:
    """Map data to its noise: integrate ``dx/dt = v(x, t)`` from ``t = 0`` up to ``t = 1``.

    Args:
        velocity_fn: ``velocity_fn(x, t) -> v`` (guidance and labels in the closure); ``x``
            ``(B, ...)``, ``t`` ``(B,)``.
        x0: data (latents) ``(B, ...)`` at ``t = 0``.
        solver: registry name; ``ba`` probes its SideNet at negative (backward) offsets.
        nfe: backbone calls to spend (None for ``reference``, or with an explicit grid).
        side_fn: ``side_fn(x, v, t, h)`` for the SideNet solvers; ignored by the others.
        grid: grid kind or explicit grid (see ``solve_grid``); the same one as ``generate`` gets.
        shift: time shift of ``"shift"`` grids.
        **solver_options: passed to the solver (e.g. ``rtol``/``atol`` for ``reference``).

    Returns:
        The solver's ``SolveResult``; ``x`` is the noise ``(B, ...)`` at ``t = 1``.
    """
    t_grid = solve_grid(solver, nfe, grid, shift=shift, increasing=True)
    return _solve(velocity_fn, x0, solver, t_grid, side_fn, solver_options)


def generate(
    velocity_fn: VelocityFn,
    noise: Tensor,
    solver: str,
    nfe: Optional[int] = None,
    side_fn: Optional[SideFn] = None,
    grid: GridSpec = "uniform",
    *,
    shift: float = 1.0,
    **solver_options: Any,
) -> SolveResult:
    """Map noise to data: integrate from ``t = 1`` down to ``t = 0`` (ordinary sampling).

    Arguments as in ``invert``, with ``noise`` ``(B, ...)`` at ``t = 1``.

    Returns:
        The solver's ``SolveResult``; ``x`` is the data ``(B, ...)`` at ``t = 0``.
    """
    t_grid = solve_grid(solver, nfe, grid, shift=shift, increasing=False)
    return _solve(velocity_fn, noise, solver, t_grid, side_fn, solver_options)


@dataclass
class EditLatents:
    """Outcome of inverting a batch and regenerating it.

    Attributes:
        noise: inverted noise ``(B, ...)`` at ``t = 1`` (under the source class).
        reconstruction: noise regenerated under the source class ``(B, ...)``.
        edit: noise regenerated under the target class ``(B, ...)``.
        nfe: backbone calls of one direction, as counted by the inversion.
        side_calls: SideNet calls of the inversion.
    """

    noise: Tensor
    reconstruction: Tensor
    edit: Tensor
    nfe: int
    side_calls: int


def edit_latents(
    backbone_velocity: BackboneVelocity,
    x0: Tensor,
    source: Tensor,
    target: Tensor,
    solver: str,
    nfe: Optional[int],
    *,
    null_class: int,
    side_velocity: Optional[SideVelocity] = None,
    cfg_scale: float = 1.0,
    interval: Optional[Tuple[float, float]] = (0.0, 0.7),
    grid: GridSpec = "uniform",
    shift: float = 1.0,
    **solver_options: Any,
) -> EditLatents:
    """Invert under ``source``, regenerate under ``source`` (reconstruction) and ``target`` (edit).

    Args:
        backbone_velocity: ``backbone.velocity(x, t, y)`` in the project convention.
        x0: latents ``(B, C, H, W)`` at ``t = 0``.
        source: int64 source classes ``(B,)``.
        target: int64 target classes ``(B,)``.
        solver: registry name.
        nfe: NFE budget of each direction (None for ``reference``).
        null_class: unconditional label (``num_classes``).
        side_velocity: ``sidenet.velocity(x, v, t, h, y)``; required by ``ba`` / ``ba-single``.
        cfg_scale: guidance scale, the same for all three solves (1.0: none).
        interval: guidance interval ``(lo, hi)``; None: every ``t``.
        grid: grid kind or explicit grid, shared by the three solves.
        shift: time shift of ``"shift"`` grids.
        **solver_options: passed to the solver.

    Returns:
        The noise, the reconstruction and the edit.

    Raises:
        ValueError: a SideNet solver without ``side_velocity``, bad labels or budget.
    """
    uses_side = get_solver(solver).uses_side_fn
    if uses_side and side_velocity is None:
        raise ValueError(f"solver '{solver}' needs a SideNet (side_velocity=...)")
    # Only SideNet solvers get the side closure: with guidance it doubles every backbone batch.
    guidance = dict(null_class=null_class, cfg_scale=cfg_scale, interval=interval,
                    side_velocity=side_velocity if uses_side else None)
    v_src, s_src = build_sampling_fns(backbone_velocity, source, **guidance)
    v_tgt, s_tgt = build_sampling_fns(backbone_velocity, target, **guidance)
    common: Dict[str, Any] = dict(grid=grid, shift=shift, **solver_options)
    inverted = invert(v_src, x0, solver, nfe, s_src, **common)
    recon = generate(v_src, inverted.x, solver, nfe, s_src, **common)
    edited = generate(v_tgt, inverted.x, solver, nfe, s_tgt, **common)
    return EditLatents(inverted.x, recon.x, edited.x, inverted.nfe, inverted.side_calls)
