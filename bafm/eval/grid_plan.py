"""``bafm optimize-grid``'s plan: the (solver, NFE) pairs to search, checked against the registry.

Needs no model, file or whole config (``optimize_grid`` and ``eval`` sections only), so the config
loader checks it before any command starts (``bafm.plans``).
"""

from __future__ import annotations

from typing import Any, List, Tuple

from bafm.solvers import SOLVERS, fixed_grid_solvers
from bafm.solvers.grids import steps_for_nfe

# optimize_grid.method choices (scipy.optimize.minimize's derivative-free methods).
SEARCH_METHODS = ("nelder-mead", "powell")


class GridSearchError(ValueError):
    """Bad optimize-grid input, detected before any sampling."""


def plan_search(search_section: Any, eval_section: Any) -> List[Tuple[str, int]]:
    """The (solver, NFE) pairs to search.

    Args:
        search_section: the ``optimize_grid`` config section (solvers, budgets, max_nfe, seed,
            num_samples, method).
        eval_section: the ``eval`` section (its budgets stand in for missing ones; its seeds must not
            overlap the calibration seeds).

    Raises:
        GridSearchError: unknown or adaptive solver, infeasible budget, bad method, calibration
            seeds overlapping the evaluation seeds.
    """
    oc, ec = search_section, eval_section
    if oc.method not in SEARCH_METHODS:
        raise GridSearchError(f"optimize_grid.method is '{oc.method}', expected one of: {', '.join(SEARCH_METHODS)}.")
    lo, hi = int(oc.seed), int(oc.seed) + int(oc.num_samples)
    if lo < int(ec.seed) + int(ec.num_samples) and int(ec.seed) < hi:
        raise GridSearchError(
            f"calibration seeds [{lo}, {hi}) (optimize_grid.seed, optimize_grid.num_samples) overlap the evaluation "
            f"seeds [{ec.seed}, {int(ec.seed) + int(ec.num_samples)}) (eval.seed, eval.num_samples); pick another "
            "optimize_grid.seed."
        )
    pairs = []
    fixed = fixed_grid_solvers()
    for solver in oc.solvers:
        if solver not in fixed:
            what = "an unknown solver" if solver not in SOLVERS else "not a fixed-grid solver"
            raise GridSearchError(f"optimize_grid.solvers: '{solver}' is {what}; one of: {', '.join(fixed)}.")
        budgets = oc.budgets.get(solver) if solver in oc.budgets else [
            n for n in ec.budgets.get(solver, []) if n <= int(oc.max_nfe)]
        if not budgets:
            raise GridSearchError(f"no budgets to search for '{solver}': set optimize_grid.budgets.{solver}=[...] "
                                  f"(or eval.budgets.{solver} with entries <= optimize_grid.max_nfe).")
        for nfe in budgets:
            try:
                steps_for_nfe(solver, int(nfe))
            except ValueError as err:
                raise GridSearchError(f"optimize_grid budgets for '{solver}': {err}") from None
            pairs.append((solver, int(nfe)))
    return pairs
