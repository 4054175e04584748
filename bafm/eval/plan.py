"""What a sweep is made of, before anything runs: its points, settings, row columns and input errors.

The leaf of ``bafm.eval``: the engine, its inputs and its reports all build on these types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from bafm.sampling import REFERENCE, SamplingSettings
from bafm.solvers import SOLVERS, is_adaptive, uses_side_fn
from bafm.solvers.grid_store import GridTable
from bafm.solvers.ground_truth import Reference
from bafm.solvers.grids import steps_for_nfe

# sfid, precision, recall: None (a blank cell) where the extractor or reference lacks their inputs.
# nfe: backbone calls per sample, a guided call on the doubled batch counted once (as in papers).
# flops: FLOPs per sample in units of one backbone forward on one sample, counted: the rows that
#   passed through the backbone and the SideNet during the solves, times each network's FLOPs per
#   row (measured with torch.utils.flop_counter, bafm.models.flops), over the backbone's. FLOPs
#   are real work, so a guided call on the doubled batch costs 2 here, and BA's SideNet
#   evaluations (three forward nodes and one backward per step, on doubled rows with guidance)
#   add their share. NaN when the backbone has no counted FLOPs.
COLUMNS = ("solver", "grid", "tol", "nfe", "flops", "steps", "fid", "fd_ref", "sfid", "is", "precision", "recall",
           "traj_rmse", "seconds", "n_samples")
Row = Dict[str, Any]
Grids = Dict[Tuple[str, int], Tensor]
# sample_sink(solver, nfe, images): all samples of one sweep point, uint8 (N, H, W, C), rank 0.
SampleSink = Callable[[str, int, Tensor], None]


@dataclass(frozen=True)
class SweepPoint:
    """One row of the sweep: a solver at a budget (``steps`` grid intervals), or an adaptive
    solver at a tolerance (``nfe`` and ``steps`` 0: they are measured)."""

    solver: str
    nfe: int
    steps: int
    tol: Optional[float] = None

    @property
    def label(self) -> str:
        """``solver``, or ``solver-tol<tol>`` for a tolerance level (image grids, progress bar)."""
        return self.solver if self.tol is None else f"{self.solver}-tol{self.tol:g}"


@dataclass(frozen=True)
class SweepSettings:
    """The fixed settings of a sweep, shared by every point.

    Attributes:
        sampling: time grid and guidance.
        seed: base seed; sample ``i`` starts from noise seeded with ``seed + i``.
        batch_size: samples per solve on each rank.
        reference: the ground truth's solver and options (``bafm.solvers.ground_truth``).
        reference_batch_size: the reference solves fixed groups of this many consecutive samples
            (its adaptive step size is shared by a solve), so its samples, too, are the same for
            any ``batch_size`` and number of processes.
        include_reference: evaluate the reference solver (needed for ``traj_rmse``).
        grid_images: the first this-many samples of each point form its image grid.
        is_splits: splits of the inception score (torch-fidelity convention).
        metrics_convention: ``torch-fidelity`` or ``adm`` (``bafm.eval.metrics.METRICS_CONVENTIONS``).
        sidenet_hint: the SideNet path expected, for the missing-SideNet error.
    """

    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    seed: int = 0
    batch_size: int = 250
    reference: Reference = field(default_factory=Reference)
    reference_batch_size: int = 64
    include_reference: bool = True
    grid_images: int = 64
    is_splits: int = 10
    metrics_convention: str = "torch-fidelity"
    sidenet_hint: str = ""


class SweepInputError(ValueError):
    """Bad sweep input (solver, budget, missing file), detected before any sampling."""


def partition(num_samples: int, group: int, rank: int, world: int) -> List[Tensor]:
    """This rank's share of the sample indices: groups ``[g G, (g + 1) G)`` with ``g % world == rank``.

    Args:
        num_samples: total samples ``N``.
        group: group size ``G``.
        rank: this process's rank.
        world: number of processes.

    Returns:
        The rank's groups, each an int64 ``(<= G,)`` tensor of consecutive indices (possibly none).
    """
    return [torch.arange(g * group, min((g + 1) * group, num_samples), dtype=torch.int64)
            for g in range(rank, math.ceil(num_samples / group), world)]


def plan_sweep(
    solvers: Sequence[str],
    budgets: Mapping[str, Sequence[int]] | Sequence[int],
    *,
    sidenet_available: bool,
    sidenet_hint: str = "",
    tolerances: Optional[Mapping[str, Sequence[float]]] = None,
    keys: Tuple[str, str] = ("eval.solvers", "eval.budgets"),
) -> List[SweepPoint]:
    """Check solver names, budgets and the SideNet, and list the sweep points.

    Called before anything is sampled, so that bad input fails at once.

    Args:
        solvers: solver names (``reference`` is skipped here: it is always its own row).
        budgets: NFE budgets per solver (``{"euler": [5, 10]}``) or one list for all.
        sidenet_available: whether a SideNet is loaded or its file exists.
        sidenet_hint: the SideNet checkpoint path expected, for the error message.
        tolerances: tolerance levels per adaptive solver (``{"ba-adaptive": [1e-2, 1e-3]}``); each
            level is one point solved with ``rtol = atol = level``.
        keys: the config keys of ``solvers`` and ``budgets``, for the messages (the training
            callback's are ``eval.callback_solvers`` and ``eval.callback_budgets``).

    Returns:
        The sweep points in the order given.

    Raises:
        SweepInputError: unknown solver (lists the valid ones), missing or infeasible budget (names
            the nearest feasible ones), or a SideNet solver without a SideNet (names the path).
    """
    solvers_key, budgets_key = keys
    valid = sorted(SOLVERS)
    points: List[SweepPoint] = []
    for name in solvers:
        if name not in SOLVERS:
            raise SweepInputError(f"unknown solver '{name}' in {solvers_key}; valid solvers: {', '.join(valid)}.")
    for name in solvers:
        if name == REFERENCE:
            continue
        if uses_side_fn(name) and not sidenet_available:
            where = f" at '{sidenet_hint}'" if sidenet_hint else ""
            raise SweepInputError(
                f"solver '{name}' needs a trained SideNet, none found{where}. Train one with `make train` "
                "(it exports the EMA SideNet into runs/<experiment>/, used from then on), point sidenet.path "
                "at one, or drop "
                f"'{name}' from {solvers_key}."
            )
        if is_adaptive(name):
            levels = (tolerances or {}).get(name)
            if not levels:
                raise SweepInputError(f"no tolerances for adaptive solver '{name}': set eval.tolerances.{name}=[...].")
            for tol in levels:
                if isinstance(tol, bool) or not float(tol) > 0:
                    raise SweepInputError(f"eval.tolerances.{name}: tolerance {tol!r} is not a positive number.")
                points.append(SweepPoint(name, 0, 0, tol=float(tol)))
            continue
        if isinstance(budgets, Mapping):
            if name not in budgets:
                raise SweepInputError(f"no NFE budgets for solver '{name}': set {budgets_key}.{name}=[...].")
            wanted = list(budgets[name])
        else:
            wanted = list(budgets)
        for nfe in wanted:
            try:  # steps_for_nfe also rejects budgets that are not positive integers
                steps = steps_for_nfe(name, nfe)
            except ValueError as err:
                where = f"{budgets_key}.{name}" if isinstance(budgets, Mapping) else budgets_key
                raise SweepInputError(f"{where}: {err}") from None
            points.append(SweepPoint(name, int(nfe), int(steps)))
    return points


def check_optimized_grids(points: Sequence[SweepPoint], table: Optional[GridTable]) -> None:
    """Raise ``SweepInputError`` unless ``table`` holds a grid for every fixed-grid point."""
    if table is None:
        raise SweepInputError("sampling.grid is 'optimized' but no optimized grid file was loaded.")
    for point in points:
        if not is_adaptive(point.solver) and not table.has(point.solver, point.nfe):
            try:
                table.grid(point.solver, point.nfe)
            except ValueError as err:
                raise SweepInputError(str(err)) from None
