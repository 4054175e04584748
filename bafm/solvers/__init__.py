"""ODE solvers for flow-matching sampling, one shared signature, one registry.

``get_solver(name)(velocity_fn, x, t_grid, **options) -> SolveResult``. Each registered solver
carries its ``SolverFacts`` (``order``, ``nfe_per_step`` (None if adaptive), ``uses_side_fn`` (True
for the SideNet solvers ``ba``, ``ba-single`` and ``ba-adaptive``, which require ``side_fn=``) and
``reference``); every other module asks these (``solver_facts``, ``is_adaptive``, ``uses_side_fn``,
``fixed_grid_solvers``, ``reference_solvers``) instead of deciding for itself.
"""

from __future__ import annotations

# Importing the solver modules registers them, in this (listing) order.
from bafm.solvers import fixed_step, multistep, unipc, bi_anchor, adaptive, reference  # noqa: F401,I001
from bafm.solvers.base import (SOLVERS, SideFn, Solver, SolverFacts, SolveResult, VelocityFn, fixed_grid_solvers,
                               is_adaptive, reference_solvers, solver_facts, uses_side_fn)
from bafm.solvers.counting import CallCounter, probe

__all__ = ["SOLVERS", "SolveResult", "SolverFacts", "get_solver", "solver_facts", "is_adaptive", "uses_side_fn",
           "fixed_grid_solvers", "reference_solvers", "CallCounter", "probe", "VelocityFn", "SideFn"]


def get_solver(name: str) -> Solver:
    """Look a solver up by name.

    Args:
        name: a key of ``SOLVERS`` (``"euler"``, ``"heun"``, ``"midpoint"``, ``"rk4"``, ``"ab2"``,
            ``"dpm++2m"``, ``"ipndm"``, ``"unipc"``, ``"ba"``, ``"ba-single"``, ``"ba-adaptive"``,
            ``"reference"``).

    Returns:
        The solver function.

    Raises:
        ValueError: unknown name; the message lists the valid names.
    """
    solver_facts(name)  # raises for an unknown name
    return SOLVERS[name]
