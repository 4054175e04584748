"""Editing latents by inversion: data -> noise under one class, noise -> data under another.

``edit_latents`` inverts under the source class and regenerates the noise twice: under the
source class (a reconstruction, which measures the round-trip error) and under the target class
(the edit). Grids, solvers and both directions are ``bafm.sampling``'s; guidance, if any, lives in
the closures of ``bafm.models.guidance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from torch import Tensor

from bafm.models.anchor_features import AnchorFn
from bafm.models.guidance import DEFAULT_GUIDANCE_INTERVAL, BackboneVelocity, SideVelocity
from bafm.sampling import integrate, invert, sampling_fns
from bafm.solvers.grids import GridSpec


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
    interval: Optional[Tuple[float, float]] = DEFAULT_GUIDANCE_INTERVAL,
    grid: GridSpec = "uniform",
    shift: float = 1.0,
    anchor: Optional[AnchorFn] = None,
    **solver_options: Any,
) -> EditLatents:
    """Invert under ``source``, regenerate under ``source`` (reconstruction) and ``target`` (edit).

    Args:
        backbone_velocity: ``backbone.velocity(x, t, y)`` in the project convention.
        x0: latents ``(B, C, H, W)`` at ``t = 0``.
        source: int64 source classes ``(B,)``.
        target: int64 target classes ``(B,)``.
        solver: registry name.
        nfe: NFE budget of each direction (None for an adaptive solver, or to take the steps from an explicit grid).
        null_class: unconditional label (``num_classes``).
        side_velocity: ``sidenet.velocity(x, v, t, h, y)``; required by the SideNet solvers (``uses_side_fn``).
        cfg_scale: guidance scale, the same for all three solves (1.0: none).
        interval: guidance interval ``(lo, hi)``; None: every ``t``.
        grid: grid kind or explicit grid, shared by the three solves.
        shift: time shift of ``"shift"`` grids.
        anchor: ``(x, t, y) -> (v, features)`` for a SideNet that reads the backbone's tokens.
        **solver_options: passed to the solver.

    Returns:
        The noise, the reconstruction and the edit.

    Raises:
        ValueError: a SideNet solver without ``side_velocity``, bad labels or budget.
    """
    guidance: Dict[str, Any] = dict(null_class=null_class, side_velocity=side_velocity, cfg_scale=cfg_scale,
                                    interval=interval, anchor=anchor)  # fmt: skip
    v_src, s_src = sampling_fns(solver, backbone_velocity, source, **guidance)
    v_tgt, s_tgt = sampling_fns(solver, backbone_velocity, target, **guidance)
    common: Dict[str, Any] = dict(grid=grid, shift=shift, **solver_options)
    inverted = invert(v_src, x0, solver, nfe, s_src, **common)
    recon = integrate(v_src, inverted.x, solver, nfe, s_src, **common)
    edited = integrate(v_tgt, inverted.x, solver, nfe, s_tgt, **common)
    return EditLatents(inverted.x, recon.x, edited.x, inverted.nfe, inverted.side_calls)
