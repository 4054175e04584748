"""Text-conditional solver closures: prompt embeddings and guidance live here, not in solvers.

The parallel of ``bafm.models.guidance.build_sampling_fns`` for text-to-image backbones. The
condition is a ``TextCondition`` (prompt embeddings and pooled embedding) instead of class
labels, and the unconditional branch of classifier-free guidance is the negative prompt's
encoding (the empty prompt's by default), as in SD3's pipeline, instead of a null class. The
backbone runs once on the doubled batch ``(x, x)`` with conditions ``(cond, negative)`` (one
NFE); with a SideNet it sees the raw conditional and unconditional velocities with the same
doubled condition, and the two estimates are combined at each node's own time ``t - h``, as
``GuidedSide`` does for class labels.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from bafm.models.guidance import AnchorMemo, AnchorRecord, combine_guidance, guidance_active
from bafm.models.text_condition import TextCondition, concat_conditions, condition_batch_size, repeat_condition
from bafm.solvers.counting import stack_rows

# backbone.velocity(x, t, cond) -> v; sidenet.velocity(x, v, t, h, cond) -> v_hat at t - h.
TextBackboneVelocity = Callable[[Tensor, Tensor, TextCondition], Tensor]
TextSideVelocity = Callable[[Tensor, Tensor, Tensor, Tensor, TextCondition], Tensor]


class TextGuidedVelocity:
    """``velocity_fn(x, t)`` for one batch of prompt embeddings, with optional CFG.

    Without guidance each call is ``backbone(x, t, cond)``. With guidance the backbone sees the
    doubled batch with ``(cond, negative)`` whenever some row is guided, or always when a SideNet
    is paired (its nodes may fall inside the interval); then every call's ``AnchorRecord`` (the
    raw pair) goes to ``memo``, as ``bafm.models.guidance.GuidedVelocity`` does.
    """

    def __init__(
        self,
        backbone_velocity: TextBackboneVelocity,
        cond: TextCondition,
        negative: Optional[TextCondition],
        cfg_scale: float,
        interval: Optional[Tuple[float, float]],
        memo: Optional[AnchorMemo],
    ) -> None:
        self.backbone_velocity = backbone_velocity
        self.cond = cond
        self.batch = condition_batch_size(cond)
        self.cfg_scale = float(cfg_scale)
        self.interval = interval
        self.guided = self.cfg_scale != 1.0 and (interval is None or interval[0] < interval[1])
        self.cond_pair = concat_conditions([cond, negative]) if self.guided else None
        self.memo = memo

    def condition(self, x: Tensor, doubled: bool) -> TextCondition:
        """The condition of a call on ``x`` (batch ``B``): ``cond``, or ``(cond, negative)`` doubled."""
        if x.shape[0] != self.batch:
            raise ValueError(
                f"text closure built for batch {self.batch} (prompts), called with x of batch {x.shape[0]}"
            )
        return self.cond_pair if doubled else self.cond

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """Velocity at ``(x, t)``: ``x`` ``(B, C, H, W)``, ``t`` ``(B,)``; returns ``(B, C, H, W)``."""
        doubled = self.guided and (self.memo is not None or bool(guidance_active(t, self.interval).any()))
        if not doubled:
            v = self.backbone_velocity(x, t, self.condition(x, doubled=False))
            return v if self.memo is None else self.memo.remember(AnchorRecord(v))
        out = self.backbone_velocity(torch.cat([x, x]), torch.cat([t, t]), self.condition(x, doubled=True))
        v_cond, v_uncond = out.chunk(2)
        v = combine_guidance(v_cond, v_uncond, t, self.cfg_scale, self.interval)
        return v if self.memo is None else self.memo.remember(AnchorRecord(v, (v_cond, v_uncond)))


class TextGuidedSide:
    """``side_fn(x, v, t, h)`` paired with a ``TextGuidedVelocity``.

    ``probe`` evaluates ``K`` offsets in ONE SideNet call: ``K * B`` rows without guidance,
    ``2 K * B`` (cond/uncond per offset, offset-major) with. ``select`` merges two velocities row
    by row with the raw pairs they carry (``AnchorMemo.select``), for ``ba-adaptive``.
    """

    def __init__(self, side_velocity: TextSideVelocity, velocity: TextGuidedVelocity) -> None:
        self.side_velocity = side_velocity
        self.velocity = velocity
        self.memo: Optional[AnchorMemo] = velocity.memo  # None without guidance: v is all it needs

    def __call__(self, x: Tensor, v: Tensor, t: Tensor, h: Tensor) -> Tensor:
        """Estimate at ``t - h``: ``x``, ``v`` ``(B, C, H, W)``, ``t``, ``h`` ``(B,)``."""
        return self.probe(x, v, t, [h])[0]

    def select(self, keep: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``a`` where ``keep`` else ``b`` (``(B,)`` bool), raw pairs merged alike."""
        if self.memo is None:
            return torch.where(keep.view(-1, *[1] * (a.dim() - 1)), a, b)
        return self.memo.select(keep, a, b)

    def probe(self, x: Tensor, v: Tensor, t: Tensor, offsets: Sequence[Tensor]) -> List[Tensor]:
        """Estimates at ``t - h`` for each ``h`` in ``offsets`` (each ``(B,)``), one SideNet call."""
        k, batch, vel = len(offsets), x.shape[0], self.velocity
        record = AnchorRecord(v) if self.memo is None else self.memo.recall(v)
        if record.raw is None:
            xs, vs, ts = stack_rows(k, x, v, t)
            cond = repeat_condition(vel.condition(x, doubled=False), k)
            return list(self.side_velocity(xs, vs, ts, torch.cat(list(offsets)), cond).split(batch))
        v_cond, v_uncond = record.raw
        # Rows: [x | x] per offset, offset-major, so chunk 2j is cond and 2j+1 uncond of offset j.
        xs, vs, ts = stack_rows(k, torch.cat([x, x]), torch.cat([v_cond, v_uncond]), torch.cat([t, t]))
        cond = repeat_condition(vel.condition(x, doubled=True), k)  # (cond, negative) per offset
        chunks = self.side_velocity(xs, vs, ts, torch.cat([h for h in offsets for _ in range(2)]), cond).split(batch)
        return [
            combine_guidance(chunks[2 * j], chunks[2 * j + 1], t - h, vel.cfg_scale, vel.interval)
            for j, h in enumerate(offsets)
        ]


def build_text_sampling_fns(
    backbone_velocity: TextBackboneVelocity,
    cond: TextCondition,
    *,
    negative: Optional[TextCondition] = None,
    cfg_scale: float = 1.0,
    interval: Optional[Tuple[float, float]] = None,
    side_velocity: Optional[TextSideVelocity] = None,
) -> Tuple[TextGuidedVelocity, Optional[TextGuidedSide]]:
    """Build the solver closures for one batch of prompts.

    Args:
        backbone_velocity: ``backbone.velocity(x, t, cond) -> v`` in the project convention.
        cond: the prompts' embeddings, batch ``B``.
        negative: the negative prompts' embeddings (the unconditional branch), batch ``B`` and
            the same shapes as ``cond``; needed when ``cfg_scale != 1``.
        cfg_scale: guidance scale (SD3's ``guidance_scale``); 1.0 disables guidance.
        interval: ``(lo, hi)``: guidance only for ``lo < t <= hi``; None: at every ``t``, as the
            pipelines do.
        side_velocity: ``sidenet.velocity(x, v, t, h, cond) -> v_hat`` at ``t - h``, or None for
            solvers without a SideNet.

    Returns:
        ``(velocity_fn, side_fn)``; ``side_fn`` is None when ``side_velocity`` is None.

    Raises:
        ValueError: guidance without a negative condition, mismatched shapes, bad interval or scale.
    """
    if not isinstance(cond, TextCondition):
        raise ValueError(f"cond must be a TextCondition(prompt_embeds, pooled), got {type(cond).__name__}")
    if not float(cfg_scale) >= 0.0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale!r}")
    if interval is not None:
        lo, hi = (float(v) for v in interval)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {tuple(interval)}")
        interval = (lo, hi)
    if float(cfg_scale) != 1.0:
        if negative is None:
            raise ValueError("classifier-free guidance (cfg_scale != 1) needs the negative prompt's embeddings")
        shapes = [tuple(c.shape) for c in cond], [tuple(c.shape) for c in negative]
        if shapes[0] != shapes[1]:
            raise ValueError(f"negative prompt embeddings {shapes[1]} must match the prompts' {shapes[0]}")
    guided = float(cfg_scale) != 1.0 and (interval is None or interval[0] < interval[1])
    memo = AnchorMemo() if side_velocity is not None and guided else None
    velocity = TextGuidedVelocity(backbone_velocity, cond, negative, cfg_scale, interval, memo)
    side = TextGuidedSide(side_velocity, velocity) if side_velocity is not None else None
    return velocity, side
