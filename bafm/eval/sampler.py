"""Seeds and labels -> samples, for one solver and step count.

Sample ``i`` of a run with seed ``s`` always starts from the same noise
(``torch.Generator().manual_seed(s + i)`` on the CPU, then moved) and has label
``i % num_classes``, so a sample does not depend on the batch it lands in or on the number of
processes (for fixed-grid solvers; the adaptive ``reference`` solver picks one step size per
batch, so its samples agree across batchings to within its tolerances).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from bafm.solvers import SOLVERS, SolveResult, get_solver
from bafm.solvers.grids import make_grid

REFERENCE = "reference"


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


def uses_side_fn(solver: str) -> bool:
    """Whether a registered solver needs a SideNet (``ba``, ``ba-single``)."""
    return bool(getattr(SOLVERS[solver], "uses_side_fn", False))


def time_grid(solver: str, steps: int, sampling_cfg: Any, device: torch.device | str) -> Tensor:
    """The time grid ``1 -> 0`` for a solve: ``sampling.grid``/``shift``; ``[1, 0]`` for the reference.

    Args:
        solver: solver name.
        steps: grid intervals (ignored by the adaptive reference solver).
        sampling_cfg: object with ``grid`` and ``shift`` (``cfg.sampling``).
        device: grid device.

    Returns:
        Strictly decreasing float64 tensor from 1 to 0.
    """
    if solver == REFERENCE:
        return torch.tensor([1.0, 0.0], dtype=torch.float64, device=device)
    return make_grid(str(sampling_cfg.grid), int(steps), shift=float(sampling_cfg.shift),
                     dtype=torch.float64, device=device)


@torch.no_grad()
def solve_batch(
    backbone: nn.Module,
    sidenet: Optional[nn.Module],
    solver: str,
    steps: int,
    noise: Tensor,
    labels: Tensor,
    sampling_cfg: Any,
    t_grid: Optional[Tensor] = None,
    **solver_opts: Any,
) -> SolveResult:
    """Integrate one batch from noise (``t = 1``) to data (``t = 0``).

    Args:
        backbone: module with ``velocity(x, t, y)`` and ``num_classes`` (null class id).
        sidenet: module with ``velocity(x, v, t, h, y)``; required by ``ba`` and ``ba-single``.
        solver: name in ``SOLVERS``.
        steps: grid intervals.
        noise: ``(B, C, H, W)`` starting state.
        labels: ``(B,)`` int64 class labels.
        sampling_cfg: object with ``cfg_scale``, ``guidance_interval``, ``grid``, ``shift``.
        t_grid: an explicit grid (e.g. an optimized one) instead of ``time_grid(...)``.
        **solver_opts: passed to the solver (e.g. ``rtol``/``atol`` for ``reference``).

    Returns:
        The solver's ``SolveResult`` (``x``: ``(B, C, H, W)`` latents at ``t = 0``).
    """
    from bafm.models.guidance import build_sampling_fns

    needs_side = uses_side_fn(solver)
    if needs_side and sidenet is None:
        raise ValueError(f"solver '{solver}' needs a SideNet, got none.")
    interval = tuple(float(v) for v in sampling_cfg.guidance_interval)
    velocity_fn, side_fn = build_sampling_fns(
        backbone.velocity,
        labels,
        null_class=int(backbone.num_classes),
        cfg_scale=float(sampling_cfg.cfg_scale),
        interval=interval,
        side_velocity=sidenet.velocity if needs_side else None,
    )
    if t_grid is None:
        t_grid = time_grid(solver, steps, sampling_cfg, noise.device)
    kwargs = dict(solver_opts)
    if needs_side:
        kwargs["side_fn"] = side_fn
    return get_solver(solver)(velocity_fn, noise, t_grid, **kwargs)


def generate(
    backbone: nn.Module,
    sidenet: Optional[nn.Module],
    solver: str,
    steps: int,
    indices: Sequence[int] | Tensor,
    seed: int,
    sampling_cfg: Any,
    device: torch.device | str = "cpu",
    shape: Optional[Sequence[int]] = None,
    **solver_opts: Any,
) -> SolveResult:
    """Samples for given global indices: per-sample noise, cyclic labels, one solve.

    Args:
        backbone: see ``solve_batch``.
        sidenet: see ``solve_batch``.
        solver: name in ``SOLVERS``.
        steps: grid intervals.
        indices: global sample indices ``(B,)``.
        seed: base seed.
        sampling_cfg: ``cfg.sampling``.
        device: where to sample.
        shape: latent shape ``(C, H, W)``; read from the backbone when None.
        **solver_opts: passed to the solver.

    Returns:
        The ``SolveResult``; ``x`` is ``(B, C, H, W)``.
    """
    shape = tuple(shape) if shape is not None else latent_shape(backbone)
    noise = sample_noise(indices, shape, seed, device=device)
    labels = sample_labels(indices, int(backbone.num_classes), device=device)
    return solve_batch(backbone, sidenet, solver, steps, noise, labels, sampling_cfg, **solver_opts)
