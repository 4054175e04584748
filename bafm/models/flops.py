"""FLOPs of one backbone call and one SideNet evaluation per sample, counted by PyTorch.

A sweep row's ``flops`` column is the work of a solve in units of one backbone forward on one
sample: the rows that passed through each network during the solve (counted by
``bafm.solvers.counting.NetworkRows``) times each network's FLOPs per row, measured here once
with ``torch.utils.flop_counter.FlopCounterMode`` on a small batch. Nothing is derived from a
formula of the architecture.

PyTorch's counter has no formula for the CPU kernel of ``scaled_dot_product_attention``; it is
added here (the same formula as for the CUDA kernels), so the counts agree across devices.
A SideNet that reads the backbone's tokens is measured with real tokens from the same small
batch: what it does with them is part of its FLOPs; reading them (a forward hook) costs none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils import flop_counter

from bafm.models.anchor_features import anchor_for, uses_backbone_features
from bafm.models.fast import FastVelocity
from bafm.solvers.counting import NetworkRows

# Rows of the probe batch; FLOPs of these networks are linear in the batch (checked by a test).
PROBE_ROWS = 2


def _attention_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: Any,
                     out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of fused attention from the shapes of ``q, k, v`` (``(B, heads, S, d)``), as for CUDA."""
    return int(flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape))


def _extra_formulas() -> Dict[Any, Callable[..., int]]:
    """Flop formulas PyTorch's table lacks: the CPU kernel of fused attention."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: _attention_flops}


def count_flops_by_op(fn: Callable[[], Any]) -> Dict[str, int]:
    """FLOPs of one call of ``fn()`` per operator (``"convolution"``, ``"addmm"``, attention, ...)."""
    with torch.no_grad(), flop_counter.FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as mode:
        fn()
    return {str(getattr(op, "__name__", op)).split(".")[0]: int(n)
            for op, n in mode.get_flop_counts().get("Global", {}).items()}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn()`` (matrix products, convolutions, attention), as PyTorch counts them."""
    return sum(count_flops_by_op(fn).values())


def eager_model(model: nn.Module) -> nn.Module:
    """The plain module inside a fast-path wrapper (``bafm.models.fast.FastVelocity``), else ``model``.

    Compiled code and CUDA-graph replays run no dispatch, so they cannot be counted; the eager
    module does the same arithmetic.
    """
    return model.module if isinstance(model, FastVelocity) else model


def _param_dtype(module: nn.Module) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


def _param_device(module: nn.Module, fallback: torch.device) -> torch.device:
    tensor = next(iter(list(module.parameters()) + list(module.buffers())), None)
    return tensor.device if tensor is not None else fallback


@dataclass(frozen=True)
class NetworkFlops:
    """FLOPs per row of each network, and the cost of counted rows in backbone calls.

    Attributes:
        backbone: FLOPs of one backbone forward on one sample.
        sidenet: FLOPs of one SideNet evaluation on one row (None without a SideNet).
        backbone_by_op: ``backbone`` split by operator (informative; not compared).
        sidenet_by_op: ``sidenet`` split by operator (informative; not compared).
    """

    backbone: float
    sidenet: Optional[float] = None
    backbone_by_op: Mapping[str, float] = field(default_factory=dict, compare=False)
    sidenet_by_op: Mapping[str, float] = field(default_factory=dict, compare=False)

    @property
    def side_ratio(self) -> float:
        """One SideNet evaluation in backbone calls (NaN when either count is missing or zero)."""
        if self.sidenet is None or not self.backbone > 0:
            return math.nan
        return self.sidenet / self.backbone

    def backbone_calls(self, rows: NetworkRows) -> float:
        """The FLOPs of ``rows`` in units of one backbone forward on one sample.

        Returns:
            ``(rows.backbone * backbone + rows.sidenet * sidenet) / backbone``; NaN when the
            backbone has no counted FLOPs (nothing to measure in), or the SideNet ran without
            a count.
        """
        if not self.backbone > 0:
            return math.nan
        side = 0.0
        if rows.sidenet:
            if self.sidenet is None:
                return math.nan
            side = rows.sidenet * self.sidenet
        return (rows.backbone * self.backbone + side) / self.backbone


@torch.no_grad()
def measure_flops(
    backbone: nn.Module,
    sidenet: Optional[nn.Module],
    shape: Sequence[int],
    device: torch.device | str = "cpu",
    rows: int = PROBE_ROWS,
) -> NetworkFlops:
    """Count each network's FLOPs per row on a small random batch.

    Args:
        backbone: module with ``velocity(x, t, y)`` and ``num_classes`` (a fast-path wrapper is
            measured through its eager module).
        sidenet: module with ``velocity(x, v, t, h, y[, features])``, or None.
        shape: one latent's shape ``(C, H, W)``.
        device: where to run the probe batch (the models' own device when they have weights).
        rows: probe batch size.

    Returns:
        ``NetworkFlops`` per row (the batch's counts divided by ``rows``).
    """
    bb = eager_model(backbone)
    dev = _param_device(bb, torch.device(device))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((rows, *shape), generator=gen).to(device=dev, dtype=_param_dtype(bb))
    t = torch.linspace(0.9, 0.3, rows, dtype=torch.float32, device=dev)
    y = torch.arange(rows, device=dev) % max(int(getattr(backbone, "num_classes", 1)), 1)
    side = eager_model(sidenet) if sidenet is not None else None
    anchor = anchor_for(bb, side)
    out: Dict[str, Any] = {}

    def run_backbone() -> None:
        out["v"], out["features"] = anchor(x, t, y)

    backbone_ops = {op: n / rows for op, n in count_flops_by_op(run_backbone).items()}
    side_ops: Dict[str, float] = {}
    if side is not None:
        sx = x.to(device=_param_device(side, dev), dtype=_param_dtype(side))
        sv = out["v"].to(sx)
        h = torch.full((rows,), 0.1, device=sx.device, dtype=torch.float32)
        extra = (out["features"].to(sx),) if uses_backbone_features(side) else ()
        counts = count_flops_by_op(lambda: side.velocity(sx, sv, t.to(sx.device), h, y.to(sx.device), *extra))
        side_ops = {op: n / rows for op, n in counts.items()}
    return NetworkFlops(backbone=sum(backbone_ops.values()),
                        sidenet=sum(side_ops.values()) if side is not None else None,
                        backbone_by_op=backbone_ops, sidenet_by_op=side_ops)


def describe(flops: NetworkFlops, side_evaluations_per_step: int = 4) -> Dict[str, float]:
    """Summary figures: MFLOP per backbone call and per SideNet evaluation, and one BA step's
    SideNet work (``side_evaluations_per_step`` evaluations: 3 forward nodes + 1 backward) in
    backbone calls."""
    ratio = flops.side_ratio
    return {
        "backbone_mflop_per_sample": flops.backbone / 1e6,
        "sidenet_mflop_per_evaluation": math.nan if flops.sidenet is None else flops.sidenet / 1e6,
        "sidenet_evaluation_in_backbone_calls": ratio,
        "ba_step_sidenet_in_backbone_calls": side_evaluations_per_step * ratio,
    }
