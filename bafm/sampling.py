"""The one sampling path: seeds and labels -> noise -> time grid -> solver -> samples, either way.

Sample ``i`` of a run with seed ``s`` always starts from the same noise
(``torch.Generator().manual_seed(s + i)`` on the CPU, then moved) and has label
``i % num_classes``, so a sample does not depend on the batch it lands in or on the number of
processes (for fixed-grid solvers; the adaptive ``reference`` solver picks one step size per
batch, so its samples agree across batchings to within its tolerances).

Generation integrates ``dx/dt = v(x, t)`` from ``t = 1`` (noise) down to ``t = 0`` (data);
inversion integrates the same ODE up, on the increasing version of the same grid. Every solver
of ``bafm.solvers.SOLVERS`` accepts either orientation; on an increasing grid the bi-anchor
solver's SideNet offsets ``c * h`` are negative, so it looks backward (toward noise) and still
pays one NFE per anchor. Guidance and labels live in the closures of ``bafm.models.guidance``;
only the solvers that use a SideNet get the side closure (with guidance it doubles every
backbone batch). The NFE sweep, the training callback, training and editing all sample here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from bafm.models.anchor_features import AnchorFn, anchor_for, uses_backbone_features
from bafm.models.guidance import DEFAULT_GUIDANCE_INTERVAL, BackboneVelocity, SideVelocity, build_sampling_fns
from bafm.solvers import SideFn, SolveResult, VelocityFn, get_solver, is_adaptive, uses_side_fn
from bafm.solvers.counting import NetworkRows
from bafm.solvers.grids import GridSpec, solve_grid
from bafm.solvers.ground_truth import Reference

# The name of the reference row of a sweep or an edit, whichever solver the ``Reference`` uses.
REFERENCE = "reference"


@dataclass(frozen=True)
class SamplingSettings:
    """How a batch is sampled: the time grid and classifier-free guidance.

    Attributes:
        grid: grid kind, ``"uniform"``, ``"shift"``, ``"sd3"`` or ``"flux"``.
        shift: time shift of ``"shift"`` and ``"sd3"`` grids.
        cfg_scale: guidance scale; 1.0 disables guidance.
        guidance_interval: guidance only for ``lo < t <= hi``; None: at every ``t``.
        mu: log shift of ``"flux"`` grids (None: from the image size, where the caller knows it).
    """

    grid: str = "uniform"
    shift: float = 1.0
    cfg_scale: float = 1.0
    guidance_interval: Optional[Tuple[float, float]] = DEFAULT_GUIDANCE_INTERVAL
    mu: Optional[float] = None


def latent_shape(backbone: nn.Module) -> Tuple[int, ...]:
    """Shape ``(C, H, W)`` of one latent, read from the backbone's attributes.

    Looks for ``latent_shape`` or ``data_shape``, then ``in_channels`` with ``input_size``
    (attribute or ``config["input_size"]``) or ``grid_size * patch_size``.

    Raises:
        ValueError: none of these attributes exists.
    """
    for attr in ("latent_shape", "data_shape"):
        shape = getattr(backbone, attr, None)
        if shape is not None:
            return tuple(int(s) for s in shape)
    channels = getattr(backbone, "in_channels", None)
    size = getattr(backbone, "input_size", None)
    if size is None and isinstance(getattr(backbone, "config", None), dict):
        size = backbone.config.get("input_size")
    if size is None and hasattr(backbone, "grid_size") and hasattr(backbone, "patch_size"):
        size = backbone.grid_size * backbone.patch_size
    if channels is None or size is None:
        raise ValueError(
            f"cannot tell the latent shape of {type(backbone).__name__}: it has no 'latent_shape' nor "
            "'in_channels' + 'input_size' attributes; pass latent_shape= explicitly."
        )
    return (int(channels), int(size), int(size))


def sample_noise(
    indices: Sequence[int] | Tensor,
    shape: Sequence[int],
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-sample Gaussian noise, independent of batching.

    Args:
        indices: global sample indices ``(B,)``.
        shape: one sample's shape, e.g. ``(C, H, W)``.
        seed: base seed; sample ``i`` uses ``seed + i``.
        device: destination device (the noise is drawn on the CPU).
        dtype: destination dtype.

    Returns:
        ``(B, *shape)`` standard normal noise.
    """
    idx = torch.as_tensor(indices).tolist()
    noise = torch.empty((len(idx), *shape), dtype=torch.float32)
    for row, i in enumerate(idx):
        gen = torch.Generator().manual_seed(int(seed) + int(i))
        noise[row] = torch.randn(tuple(shape), generator=gen)
    return noise.to(device=device, dtype=dtype)


def sample_labels(indices: Sequence[int] | Tensor, num_classes: int, device: torch.device | str = "cpu") -> Tensor:
    """Cyclic labels ``i % num_classes`` (balanced classes for any prefix of the samples).

    Args:
        indices: global sample indices ``(B,)``.
        num_classes: real classes of the backbone; 0 for an unconditional model, whose only
            label is the null class 0.
        device: destination device.

    Returns:
        int64 labels ``(B,)``.
    """
    idx = torch.as_tensor(indices, dtype=torch.int64)
    if int(num_classes) < 1:
        return torch.zeros_like(idx).to(device)
    return (idx % int(num_classes)).to(device)


def sample_inputs(
    indices: Sequence[int] | Tensor, shape: Sequence[int], seed: int, num_classes: int,
    device: torch.device | str = "cpu",
) -> Tuple[Tensor, Tensor]:
    """Noise ``(B, *shape)`` (``sample_noise``) and labels ``(B,)`` (``sample_labels``) of global sample indices."""
    return sample_noise(indices, shape, seed, device=device), sample_labels(indices, num_classes, device=device)


def grid_label(solver: str, sampling: SamplingSettings) -> str:
    """A result row's ``grid`` column: ``adaptive`` for a solver that picks its own steps, else
    ``sampling.grid``, with its shift for ``shift`` (``"shift:3"``)."""
    if is_adaptive(solver):
        return "adaptive"
    if sampling.grid in ("shift", "sd3"):
        return f"{sampling.grid}:{sampling.shift:g}"
    if sampling.grid == "flux" and getattr(sampling, "mu", None) is not None:
        return f"flux:{sampling.mu:g}"
    return sampling.grid


def sampling_fns(
    solver: str,
    backbone_velocity: BackboneVelocity,
    labels: Tensor,
    *,
    null_class: int,
    side_velocity: Optional[SideVelocity] = None,
    cfg_scale: float = 1.0,
    interval: Optional[Tuple[float, float]] = DEFAULT_GUIDANCE_INTERVAL,
    anchor: Optional[AnchorFn] = None,
) -> Tuple[VelocityFn, Optional[SideFn]]:
    """The solver closures for one batch of labels; the side closure only for SideNet solvers.

    ``anchor`` (``bafm.models.anchor_features.anchor_for``) is used, for SideNet solvers only,
    when the SideNet reads the backbone's tokens.

    Raises:
        ValueError: a SideNet solver without ``side_velocity``, bad labels, interval or scale.
    """
    needs_side = uses_side_fn(solver)
    if needs_side and side_velocity is None:
        raise ValueError(f"solver '{solver}' needs a SideNet, got none.")
    return build_sampling_fns(backbone_velocity, labels, null_class=null_class, cfg_scale=cfg_scale,
                              interval=interval, side_velocity=side_velocity if needs_side else None,
                              anchor=anchor if needs_side else None)


def solve(
    velocity_fn: VelocityFn, x: Tensor, solver: str, t_grid: Tensor, side_fn: Optional[SideFn] = None,
    **solver_options: Any,
) -> SolveResult:
    """Run a registered solver on ``t_grid``, handing ``side_fn`` only to the solvers that take one."""
    fn = get_solver(solver)
    if uses_side_fn(solver):
        solver_options = {**solver_options, "side_fn": side_fn}
    return fn(velocity_fn, x, t_grid.to(device=x.device), **solver_options)


def integrate(
    velocity_fn: VelocityFn,
    x: Tensor,
    solver: str,
    nfe: Optional[int] = None,
    side_fn: Optional[SideFn] = None,
    grid: GridSpec = "uniform",
    *,
    shift: float = 1.0,
    increasing: bool = False,
    mu: Optional[float] = None,
    **solver_options: Any,
) -> SolveResult:
    """Integrate ``dx/dt = v(x, t)`` between noise and data on an NFE budget.

    Args:
        velocity_fn: ``velocity_fn(x, t) -> v`` (guidance and labels in the closure); ``x``
            ``(B, ...)``, ``t`` ``(B,)``.
        x: start state ``(B, ...)``: noise at ``t = 1``, or data at ``t = 0`` when ``increasing``.
        solver: registry name.
        nfe: backbone calls to spend (None for an adaptive solver, or with an explicit grid).
        side_fn: ``side_fn(x, v, t, h)`` for the SideNet solvers; ignored by the others.
        grid: grid kind or explicit grid (see ``solve_grid``).
        shift: time shift of ``"shift"`` and ``"sd3"`` grids.
        increasing: False generates (``t`` from 1 down to 0), True inverts (0 up to 1).
        mu: log shift of ``"flux"`` grids.
        **solver_options: passed to the solver (e.g. ``rtol``/``atol`` of an adaptive one).

    Returns:
        The solver's ``SolveResult``; ``x`` is the state ``(B, ...)`` at the grid's end.
    """
    t_grid = solve_grid(solver, nfe, grid, shift=shift, increasing=increasing, mu=mu)
    return solve(velocity_fn, x, solver, t_grid, side_fn, **solver_options)


def invert(velocity_fn: VelocityFn, x0: Tensor, solver: str, nfe: Optional[int] = None,
           side_fn: Optional[SideFn] = None, grid: GridSpec = "uniform", *, shift: float = 1.0,
           **solver_options: Any) -> SolveResult:
    """Map data ``x0`` at ``t = 0`` to its noise at ``t = 1``: ``integrate(..., increasing=True)``."""
    return integrate(velocity_fn, x0, solver, nfe, side_fn, grid, shift=shift, increasing=True, **solver_options)


@torch.no_grad()
def solve_batch(
    backbone: nn.Module,
    sidenet: Optional[nn.Module],
    solver: str,
    x: Tensor,
    labels: Tensor,
    sampling: SamplingSettings,
    *,
    nfe: Optional[int] = None,
    grid: Optional[GridSpec] = None,
    increasing: bool = False,
    reference: Optional[Reference] = None,
    work: Optional[NetworkRows] = None,
    **solver_opts: Any,
) -> SolveResult:
    """Integrate one batch of a backbone (and SideNet) between noise and data, either way.

    The closures of ``sampling_fns`` (labels, guidance, SideNet) on the grid of ``integrate``: the
    one path that the sweep, the training callback, the grid search and edit sample on.

    Args:
        backbone: module with ``velocity(x, t, y)`` and ``num_classes`` (null class id).
        sidenet: module with ``velocity(x, v, t, h, y)``; required by the SideNet solvers (``uses_side_fn``).
        solver: registry name, or ``"reference"`` with ``reference`` (the configured ground truth).
        x: ``(B, C, H, W)`` noise at ``t = 1``, or data at ``t = 0`` when ``increasing``.
        labels: ``(B,)`` int64 class labels.
        sampling: guidance, and the grid kind (``sampling.grid``, ``sampling.shift``, ``sampling.mu``) when
            ``grid`` is None.
        nfe: NFE budget of the solve (None for an adaptive solver, or to take the steps from ``grid``).
        grid: an explicit grid in either orientation (e.g. an optimized one), or a grid kind.
        increasing: False generates (``t`` from 1 down to 0), True inverts (0 up to 1).
        reference: the ground truth's solver and options, used when ``solver`` is ``"reference"``.
        work: when given, the rows that pass through the backbone and the SideNet are added to it
            (a guided call counts its doubled batch).
        **solver_opts: passed to the solver (e.g. ``rtol``/``atol`` of an adaptive one).

    Returns:
        The solver's ``SolveResult`` (``x``: ``(B, C, H, W)`` at the grid's end).
    """
    if solver == REFERENCE and reference is not None:
        solver, grid, nfe = reference.solver, reference.grid(device=x.device), None
        solver_opts = {**reference.options(), **solver_opts}
    backbone_velocity = backbone.velocity
    side_velocity = sidenet.velocity if sidenet is not None else None
    anchor = anchor_for(backbone, sidenet) if uses_backbone_features(sidenet) else None
    if work is not None:
        backbone_velocity = work.backbone_fn(backbone_velocity)
        side_velocity = work.sidenet_fn(side_velocity) if side_velocity is not None else None
        anchor = work.backbone_fn(anchor) if anchor is not None else None
    velocity_fn, side_fn = sampling_fns(
        solver, backbone_velocity, labels, null_class=int(backbone.num_classes), side_velocity=side_velocity,
        cfg_scale=float(sampling.cfg_scale), interval=sampling.guidance_interval, anchor=anchor,
    )
    # Duck-typed settings without a flux grid may not carry ``mu``.
    return integrate(velocity_fn, x, solver, nfe, side_fn, sampling.grid if grid is None else grid,
                     shift=sampling.shift, increasing=increasing, mu=getattr(sampling, "mu", None), **solver_opts)


def reference_solve(
    backbone: nn.Module, noise: Tensor, labels: Tensor, sampling: SamplingSettings, reference: Reference,
    work: Optional[NetworkRows] = None,
) -> SolveResult:
    """The ground truth that ``traj_rmse`` is measured against, for one batch.

    Args:
        backbone: see ``solve_batch``.
        noise: ``(B, C, H, W)`` starting state at ``t = 1``.
        labels: ``(B,)`` int64 class labels.
        sampling: guidance (its grid is not used: the reference's own grid is).
        reference: the solver and its options (see ``bafm.solvers.ground_truth``).
        work: counts the backbone rows (see ``solve_batch``).

    Returns:
        The ``SolveResult``; ``nfe`` as counted.
    """
    return solve_batch(backbone, None, REFERENCE, noise, labels, sampling, reference=reference, work=work)


def generate(
    backbone: nn.Module,
    sidenet: Optional[nn.Module],
    solver: str,
    indices: Sequence[int] | Tensor,
    seed: int,
    sampling: SamplingSettings,
    *,
    device: torch.device | str = "cpu",
    shape: Optional[Sequence[int]] = None,
    **solve_options: Any,
) -> SolveResult:
    """Samples for given global indices: per-sample noise, cyclic labels, one ``solve_batch``.

    Args:
        backbone: see ``solve_batch``.
        sidenet: see ``solve_batch``.
        solver: see ``solve_batch``.
        indices: global sample indices ``(B,)``.
        seed: base seed.
        sampling: grid and guidance.
        device: where to sample.
        shape: latent shape ``(C, H, W)``; read from the backbone when None.
        **solve_options: ``solve_batch``'s keywords (``nfe``, ``grid``, ``reference``, solver options).

    Returns:
        The ``SolveResult``; ``x`` is ``(B, C, H, W)``.
    """
    shape = tuple(shape) if shape is not None else latent_shape(backbone)
    noise, labels = sample_inputs(indices, shape, seed, int(backbone.num_classes), device=device)
    return solve_batch(backbone, sidenet, solver, noise, labels, sampling, **solve_options)
