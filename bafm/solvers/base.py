"""What every solver shares: the result type, the registry and the checks on its inputs.

A solver is a pure function ``(velocity_fn, x, t_grid, **options) -> SolveResult``. It draws no
noise and knows nothing of models, labels or guidance; those live in the ``velocity_fn`` /
``side_fn`` closures (see ``bafm.models.guidance``). Time follows the project convention
(``t = 1`` noise, ``t = 0`` data); a decreasing grid generates, an increasing one inverts.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

# velocity_fn(x, t) -> v with x (B, ...) and t (B,).
VelocityFn = Callable[[Tensor, Tensor], Tensor]
# side_fn(x, v, t, h) -> estimated velocity at t - h, all batch-first, t and h (B,).
SideFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
Solver = Callable[..., "SolveResult"]
GridLike = Union[Tensor, Sequence[float]]


@dataclass
class SolveResult:
    """Outcome of one solve.

    Attributes:
        x: final state, same shape, dtype and device as the input ``x``.
        nfe: backbone calls made (counted by wrapping ``velocity_fn``; a CFG call on a doubled
            batch counts once).
        side_calls: SideNet calls made (a batched multi-node probe counts once).
        steps: grid intervals integrated (``len(t_grid) - 1``; adaptive solvers: steps taken).
        nfe_per_sample: int64 ``(B,)`` backbone calls each sample took part in, for solvers whose
            samples finish at different times (``ba-adaptive``); None when every sample took ``nfe``.
    """

    x: Tensor
    nfe: int
    side_calls: int = 0
    steps: int = 0
    nfe_per_sample: Optional[Tensor] = None

    def mean_nfe(self) -> float:
        """Mean backbone calls per sample (``nfe`` unless ``nfe_per_sample`` says otherwise)."""
        if self.nfe_per_sample is None:
            return float(self.nfe)
        return float(self.nfe_per_sample.double().mean())


@dataclass(frozen=True)
class SolverFacts:
    """What the rest of the package may ask about a registered solver, declared beside it.

    Attributes:
        name: registry key.
        order: global order of accuracy (SideNet solvers: with an exact SideNet).
        nfe_per_step: backbone calls per grid interval; None for an adaptive solver, whose calls
            are counted during the solve and which takes tolerances instead of an NFE budget.
        uses_side_fn: whether the solver takes (and requires) ``side_fn=``, i.e. a SideNet.
        reference: the name under which the solver can serve as the ground truth
            (``eval.reference_solver``), or None.
    """

    name: str
    order: Optional[int]
    nfe_per_step: Optional[int]
    uses_side_fn: bool = False
    reference: Optional[str] = None

    @property
    def adaptive(self) -> bool:
        """Whether the solver picks its own steps (no NFE budget, only the grid's endpoints matter)."""
        return self.nfe_per_step is None


# name -> solver; each solver also carries ``facts`` (a ``SolverFacts``), and, as plain attributes,
# ``order``, ``nfe_per_step``, ``uses_side_fn`` and ``extra_nfe``.
SOLVERS: Dict[str, Solver] = {}


def register(
    name: str,
    *,
    order: Optional[int],
    nfe_per_step: Optional[int],
    uses_side_fn: bool = False,
    reference: Optional[str] = None,
    extra_nfe: Optional[Callable[[Dict[str, Any]], int]] = None,
) -> Callable[[Solver], Solver]:
    """Add a solver to ``SOLVERS`` and declare its facts beside it.

    Args:
        name: registry key (``"euler"``, ``"dpm++2m"``, ...).
        order: global order of accuracy (for SideNet solvers: with an exact SideNet).
        nfe_per_step: backbone calls per grid interval, or None for adaptive solvers.
        uses_side_fn: whether the solver takes (and requires) ``side_fn=``.
        reference: the ``eval.reference_solver`` name under which it can be the ground truth.
        extra_nfe: backbone calls beyond ``nfe_per_step * steps`` for the given options
            (e.g. a Heun start of a multistep method).

    Returns:
        A decorator that sets ``facts``, ``solver_name``, ``order``, ``nfe_per_step``,
        ``uses_side_fn`` and ``extra_nfe`` on the function and registers it.
    """

    def decorate(fn: Solver) -> Solver:
        if name in SOLVERS:
            raise ValueError(f"solver '{name}' is registered twice")
        facts = SolverFacts(name, order, nfe_per_step, uses_side_fn, reference)
        fn.facts = facts  # type: ignore[attr-defined]
        fn.solver_name = name  # type: ignore[attr-defined]
        fn.order = order  # type: ignore[attr-defined]
        fn.nfe_per_step = nfe_per_step  # type: ignore[attr-defined]
        fn.uses_side_fn = uses_side_fn  # type: ignore[attr-defined]
        fn.extra_nfe = extra_nfe or (lambda options: 0)  # type: ignore[attr-defined]
        SOLVERS[name] = fn
        return fn

    return decorate


def solver_facts(name: str) -> SolverFacts:
    """The declared facts of a registered solver.

    Raises:
        ValueError: unknown name; the message lists the valid names.
    """
    if name not in SOLVERS:
        close = difflib.get_close_matches(str(name), list(SOLVERS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown solver '{name}'.{hint} Valid solvers: {', '.join(SOLVERS)}.")
    return SOLVERS[name].facts  # type: ignore[attr-defined]


def is_adaptive(name: str) -> bool:
    """Whether a registered solver picks its own steps (``reference``, ``ba-adaptive``): no NFE budget."""
    return solver_facts(name).adaptive


def uses_side_fn(name: str) -> bool:
    """Whether a registered solver needs a SideNet (``ba``, ``ba-single``, ``ba-adaptive``)."""
    return solver_facts(name).uses_side_fn


def fixed_grid_solvers() -> List[str]:
    """Registered solvers that spend a fixed NFE per grid interval, in registry order."""
    return [name for name in SOLVERS if not is_adaptive(name)]


def reference_solvers() -> Dict[str, str]:
    """``eval.reference_solver`` choice -> registry name of the solvers that can be the ground truth."""
    facts = [solver_facts(name) for name in SOLVERS]
    return {f.reference: f.name for f in facts if f.reference}


def check_state(x: Any, solver: str) -> None:
    """Raise if ``x`` is not a batch-first floating tensor."""
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        desc = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"solver '{solver}': x must be a floating tensor (B, ...), got {desc}")


def check_grid(t_grid: GridLike, x: Tensor, solver: str) -> List[float]:
    """Validate a time grid and return its values, rounded to ``x``'s dtype, as Python floats.

    Rounding the grid to the state's dtype first makes every time a solver passes to a model
    (``torch.full(..., t, dtype=x.dtype)``) exactly a grid value, and step sizes computed from
    these floats exact differences of representable times.

    Args:
        t_grid: 1-D, at least two points, strictly decreasing (generation, noise -> data) or
            strictly increasing (inversion, data -> noise), values in ``[0, 1]``.
        x: the state, whose dtype the grid is rounded to.
        solver: solver name for error messages.

    Returns:
        The grid as a list of floats.

    Raises:
        ValueError: wrong shape, fewer than two points, not strictly monotone, out of range.
    """
    check_state(x, solver)
    # Sequences of Python floats are read in float64 (torch's default would be float32).
    grid = t_grid if isinstance(t_grid, Tensor) else torch.as_tensor(t_grid, dtype=torch.float64)
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(
            f"solver '{solver}': t_grid must be a 1-D tensor with at least 2 points, "
            f"got shape {tuple(grid.shape)}"
        )
    if not grid.is_floating_point():
        grid = grid.to(torch.float64)
    values = grid.detach().to(dtype=x.dtype).tolist()
    if any(not math.isfinite(v) or v < 0.0 or v > 1.0 for v in values):
        raise ValueError(f"solver '{solver}': t_grid values must lie in [0, 1], got {values}")
    diffs = [b - a for a, b in zip(values[:-1], values[1:])]
    if not (all(d < 0 for d in diffs) or all(d > 0 for d in diffs)):
        raise ValueError(
            f"solver '{solver}': t_grid must be strictly decreasing (1 -> 0, generation) or strictly "
            f"increasing (0 -> 1, inversion) in {x.dtype}, got {values}"
        )
    return values


def time_vector(t: float, x: Tensor) -> Tensor:
    """A ``(B,)`` tensor filled with ``t`` in ``x``'s dtype and device."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
