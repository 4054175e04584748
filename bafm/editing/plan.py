"""``bafm edit``'s plan: the (solver, budget or tolerance) points to run, checked against the registry.

Needs no model, file or whole config (``edit`` and ``eval`` sections only), so the config loader
checks it before any command starts (``bafm.plans``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence

from bafm.solvers import SOLVERS, is_adaptive
from bafm.solvers.grids import steps_for_budget

# The row of the ground truth: solved by the sweep's reference (``bafm.solvers.ground_truth``).
REFERENCE = "reference"


class EditInputError(ValueError):
    """Bad ``bafm edit`` input (class, solver, budget, file, image size), found before sampling."""


@dataclass(frozen=True)
class EditPoint:
    """One row of an edit: a solver at an NFE budget, an adaptive solver at a tolerance, or the reference.

    Attributes:
        solver: registry name, or ``"reference"`` (solved by the configured ``Reference``).
        nfe: NFE budget of each direction; None for adaptive solvers and the reference.
        tol: ``rtol = atol`` of an adaptive solver other than the reference (``eval.tolerances``).
    """

    solver: str
    nfe: Optional[int] = None
    tol: Optional[float] = None

    @property
    def label(self) -> str:
        """``solver``, or ``solver-tol<tol>`` for a tolerance level."""
        return self.solver if self.tol is None else f"{self.solver}-tol{self.tol:g}"


def plan_edit(
    solvers: Sequence[str], budgets: Mapping[str, Sequence[int]], tolerances: Mapping[str, Sequence[float]]
) -> List[EditPoint]:
    """The edit's points from ``edit.solvers``, ``edit.budgets`` and ``eval.tolerances``.

    Args:
        solvers: solver names (``edit.solvers``); ``reference`` is the sweep's reference.
        budgets: NFE budgets per fixed-grid solver (``edit.budgets``).
        tolerances: tolerance levels per adaptive solver (``eval.tolerances``, as the sweep uses).

    Returns:
        The points, in the order given.

    Raises:
        EditInputError: empty, unknown or repeated solver, missing or infeasible budget, missing
            or non-positive tolerance.
    """
    solvers = list(solvers)
    if not solvers:
        raise EditInputError("edit.solvers is empty; name at least one solver, e.g. edit.solvers=[ba,euler].")
    points: List[EditPoint] = []
    for name in solvers:
        if name not in SOLVERS:
            raise EditInputError(f"unknown solver '{name}' in edit.solvers; valid solvers: {', '.join(SOLVERS)}.")
        if solvers.count(name) > 1:
            raise EditInputError(f"edit.solvers lists '{name}' {solvers.count(name)} times.")
        if name == REFERENCE:
            points.append(EditPoint(name))
        elif is_adaptive(name):  # counted NFE: one point per tolerance level, as in the sweep
            levels = list(tolerances.get(name, []))
            if not levels:
                raise EditInputError(f"no tolerances for adaptive solver '{name}': set eval.tolerances.{name}=[...].")
            for tol in levels:
                if isinstance(tol, bool) or not float(tol) > 0:
                    raise EditInputError(f"eval.tolerances.{name}: tolerance {tol!r} is not a positive number.")
                points.append(EditPoint(name, None, float(tol)))
        else:
            if name not in budgets or not list(budgets[name]):
                raise EditInputError(f"no NFE budgets for solver '{name}': set edit.budgets.{name}=[...].")
            for nfe in budgets[name]:
                try:  # also rejects budgets that are not positive integers
                    steps_for_budget(name, nfe)
                except ValueError as err:
                    raise EditInputError(f"edit.budgets.{name}: {err}.") from None
                points.append(EditPoint(name, int(nfe)))
    return points


def edit_plan(edit_section: Any, eval_section: Any) -> List[EditPoint]:
    """``plan_edit`` of an ``edit`` config section and the ``eval`` section's tolerances."""
    return plan_edit(list(edit_section.solvers), {k: list(v) for k, v in edit_section.budgets.items()},
                     {k: [float(t) for t in v] for k, v in eval_section.tolerances.items()})
