"""The ground truth that trajectory errors are measured against: a registry solver plus its options.

One ``Reference`` serves the NFE sweep (``traj_rmse``, ``fd_ref``), the grid search (its objective)
and ``bafm edit`` (the ``reference`` row). The solvers that can be it declare so in the registry
(``register(..., reference=...)``): ``dopri5`` is the adaptive ``reference`` solver at
``rtol``/``atol`` (its NFE is counted, not bounded in advance), ``rk4`` the classic RK4 at
``steps`` uniform steps (exactly ``4 * steps`` NFE per sample: bounded, for paper-scale backbones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from bafm.solvers.base import is_adaptive, reference_solvers
from bafm.solvers.grids import uniform_grid


@dataclass(frozen=True)
class Reference:
    """Which solver gives the ground truth, and with which options.

    Attributes:
        kind: an ``eval.reference_solver`` choice, a key of ``reference_solvers()``
            (``"dopri5"`` or ``"rk4"``).
        steps: uniform steps of a fixed-step reference (ignored by an adaptive one).
        rtol: relative tolerance of an adaptive reference (ignored by a fixed-step one).
        atol: absolute tolerance of an adaptive reference.

    Raises:
        ValueError: unknown ``kind``, or a fixed-step reference with ``steps < 1``.
    """

    kind: str = "dopri5"
    steps: int = 0
    rtol: float = 1e-5
    atol: float = 1e-5

    def __post_init__(self) -> None:
        choices = reference_solvers()
        if self.kind not in choices:
            raise ValueError(f"reference solver is '{self.kind}', expected one of: {', '.join(choices)}.")
        if not self.adaptive and int(self.steps) < 1:
            raise ValueError(f"reference solver '{self.kind}' needs reference_steps >= 1, got {self.steps}.")

    @classmethod
    def from_eval(cls, eval_section: Any) -> "Reference":
        """The reference an ``eval`` config section names (``reference_solver``, ``_steps``, ``_rtol``, ``_atol``)."""
        return cls(str(eval_section.reference_solver), int(eval_section.reference_steps),
                   float(eval_section.reference_rtol), float(eval_section.reference_atol))

    @property
    def solver(self) -> str:
        """Registry name of the solver (``"reference"`` for dopri5)."""
        return reference_solvers()[self.kind]

    @property
    def adaptive(self) -> bool:
        """Whether the reference picks its own steps (registry fact of ``solver``)."""
        return is_adaptive(reference_solvers()[self.kind])

    @property
    def grid_label(self) -> str:
        """The ``grid`` column of its rows: ``adaptive``, or ``uniform`` for a fixed-step reference."""
        return "adaptive" if self.adaptive else "uniform"

    def grid(self, dtype: torch.dtype = torch.float64, device: Optional[torch.device | str] = None) -> Tensor:
        """Its generation grid: the endpoints ``[1, 0]`` (adaptive), else ``steps`` uniform steps.

        Uniform, whatever grid is being evaluated: the ground truth must not depend on it.
        """
        if self.adaptive:
            return torch.tensor([1.0, 0.0], dtype=dtype, device=device)
        return uniform_grid(int(self.steps), dtype=dtype, device=device)

    def options(self) -> Dict[str, float]:
        """Keyword options for the solver: the tolerances of an adaptive reference, else none."""
        return {"rtol": float(self.rtol), "atol": float(self.atol)} if self.adaptive else {}

    def describe(self, nfe: Optional[float] = None) -> str:
        """One line, e.g. ``rk4, 50 steps, 200 NFE per sample`` or ``dopri5 (rtol 1e-05, atol 1e-05)``."""
        if self.adaptive:
            what = f"{self.kind} (rtol {self.rtol:g}, atol {self.atol:g})"
        else:
            what = f"{self.kind}, {self.steps} steps"
        return what + ("" if nfe is None else f", {nfe:.6g} NFE per sample")

    def as_dict(self) -> Dict[str, Any]:
        """What a result file records: the kind, the registry solver and its options."""
        options = {"rtol": float(self.rtol), "atol": float(self.atol)} if self.adaptive else {"steps": int(self.steps)}
        return {"kind": self.kind, "solver": self.solver, **options}
