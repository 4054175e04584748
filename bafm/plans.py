"""Every plan of an experiment, checked when its config is loaded, before any command does work.

A plan is what a command will run, read from the config alone: the NFE sweep's points
(``eval.solvers`` x ``eval.budgets`` / ``eval.tolerances``), the training callback's
(``eval.callback_solvers`` x ``eval.callback_budgets``), the edit's (``edit.*``) and the grid
search's (``optimize_grid.*``). Each is checked against the solver registry here, so a bad solver,
budget or tolerance stops with one line before a model is loaded or a training step is spent.
Files (SideNet, grids, weights) are each command's own checks.
"""

from __future__ import annotations

from typing import Any, Dict, List

from bafm.editing.plan import edit_plan
from bafm.eval.grid_plan import plan_search
from bafm.eval.plan import SweepPoint, plan_sweep


def sweep_plan(eval_section: Any) -> List[SweepPoint]:
    """The NFE sweep's points (``eval.solvers``, ``eval.budgets``, ``eval.tolerances``); no file is looked at."""
    return plan_sweep(list(eval_section.solvers), _budgets(eval_section.budgets), sidenet_available=True,
                      tolerances=_tolerances(eval_section))


def callback_plan(eval_section: Any) -> List[SweepPoint]:
    """The training callback's points: every ``eval.callback_solvers`` at every ``eval.callback_budgets``
    (adaptive solvers at their ``eval.tolerances``)."""
    solvers = list(eval_section.callback_solvers)
    return plan_sweep(solvers, list(eval_section.callback_budgets), sidenet_available=True,
                      tolerances=_tolerances(eval_section), keys=("eval.callback_solvers", "eval.callback_budgets"))


def check_plans(cfg: Any) -> None:
    """Check the sweep, callback, edit and grid-search plans of a config.

    Raises:
        ValueError: the first bad plan's error (``SweepInputError``, ``EditInputError`` or
            ``GridSearchError``), naming the key, the value and what was expected.
    """
    sweep_plan(cfg.eval)
    callback_plan(cfg.eval)
    edit_plan(cfg.edit, cfg.eval)
    plan_search(cfg.optimize_grid, cfg.eval)


def _budgets(section: Any) -> Dict[str, List[int]]:
    return {str(k): list(v) for k, v in section.items()}


def _tolerances(eval_section: Any) -> Dict[str, List[float]]:
    return {str(k): [float(t) for t in v] for k, v in eval_section.tolerances.items()}
