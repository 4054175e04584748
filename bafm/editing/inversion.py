"""Editing latents by inversion: data -> noise under one class, noise -> data under another.

``edit_latents`` inverts under the source class and regenerates the noise twice: under the
source class (a reconstruction, which measures the round-trip error) and under the target class
(the edit), all three with ``bafm.sampling.solve_batch`` (the sampling path of the sweep, in both
directions); guidance, if any, lives in the closures of ``bafm.models.guidance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn

from bafm.sampling import SamplingSettings, solve_batch


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
    backbone: nn.Module,
    sidenet: Optional[nn.Module],
    x0: Tensor,
    source: Tensor,
    target: Tensor,
    solver: str,
    sampling: SamplingSettings,
    **solve_options: Any,
) -> EditLatents:
    """Invert under ``source``, regenerate under ``source`` (reconstruction) and ``target`` (edit).

    Args:
        backbone: module with ``velocity(x, t, y)`` in the project convention and ``num_classes``.
        sidenet: module with ``velocity(x, v, t, h, y)``; required by the SideNet solvers (``uses_side_fn``).
        x0: latents ``(B, C, H, W)`` at ``t = 0``.
        source: int64 source classes ``(B,)``.
        target: int64 target classes ``(B,)``.
        solver: registry name, or ``"reference"`` with ``reference=`` (see ``solve_batch``).
        sampling: guidance (the same for all three solves) and the grid kind.
        **solve_options: ``solve_batch``'s keywords, shared by the three solves: ``nfe`` (of each
            direction), ``grid`` (a kind or an explicit grid, run backwards by the inversion),
            ``reference``, solver options.

    Returns:
        The noise, the reconstruction and the edit.

    Raises:
        ValueError: a SideNet solver without a SideNet, bad labels or budget.
    """
    inverted = solve_batch(backbone, sidenet, solver, x0, source, sampling, increasing=True, **solve_options)
    recon = solve_batch(backbone, sidenet, solver, inverted.x, source, sampling, **solve_options)
    edited = solve_batch(backbone, sidenet, solver, inverted.x, target, sampling, **solve_options)
    return EditLatents(inverted.x, recon.x, edited.x, inverted.nfe, inverted.side_calls)
