"""ODE solvers for flow-matching sampling, one shared signature, one registry.

``get_solver(name)(velocity_fn, x, t_grid, **options) -> SolveResult``. Each registered solver
carries ``order``, ``nfe_per_step`` (None if adaptive) and ``uses_side_fn`` (True for the SideNet
solvers ``ba``, ``ba-single`` and ``ba-adaptive``, which require ``side_fn=``).
"""

from __future__ import annotations

import difflib

# Importing the solver modules registers them, in this (listing) order.
from bafm.solvers import fixed_step, multistep, unipc, bi_anchor, adaptive, reference  # noqa: F401,I001
from bafm.solvers.base import SOLVERS, SideFn, Solver, SolveResult, VelocityFn
from bafm.solvers.counting import CallCounter, probe

__all__ = ["SOLVERS", "SolveResult", "get_solver", "CallCounter", "probe", "VelocityFn", "SideFn"]


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
    if name not in SOLVERS:
        close = difflib.get_close_matches(str(name), list(SOLVERS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown solver '{name}'.{hint} Valid solvers: {', '.join(SOLVERS)}.")
    return SOLVERS[name]
