"""Text-conditional solver closures: prompt embeddings and guidance live here, not in solvers.

The parallel of ``bafm.models.guidance.build_sampling_fns`` for text-to-image backbones. The
condition is a ``TextCondition`` (prompt embeddings and pooled embedding) instead of class
labels, and the unconditional branch of classifier-free guidance is the negative prompt's
encoding (the empty prompt's by default), as in SD3's pipeline, instead of a null class. The
backbone runs once on the doubled batch ``(x, x)`` with conditions ``(cond, negative)`` (one
NFE); with a SideNet it sees the raw conditional and unconditional velocities with the same
doubled condition, and the two estimates are combined at each node's own time ``t - h``: the
closures are ``bafm.models.guidance``'s ``GuidedVelocity`` / ``GuidedSide``, which take any
condition the ``text_condition`` helpers handle.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from torch import Tensor

from bafm.models.anchor_features import plain_anchor
from bafm.models.guidance import AnchorMemo, GuidedSide, GuidedVelocity
from bafm.models.text_condition import TextCondition

# backbone.velocity(x, t, cond) -> v; sidenet.velocity(x, v, t, h, cond) -> v_hat at t - h.
TextBackboneVelocity = Callable[[Tensor, Tensor, TextCondition], Tensor]
TextSideVelocity = Callable[[Tensor, Tensor, Tensor, Tensor, TextCondition], Tensor]


def build_text_sampling_fns(
    backbone_velocity: TextBackboneVelocity,
    cond: TextCondition,
    *,
    negative: Optional[TextCondition] = None,
    cfg_scale: float = 1.0,
    interval: Optional[Tuple[float, float]] = None,
    side_velocity: Optional[TextSideVelocity] = None,
) -> Tuple[GuidedVelocity, Optional[GuidedSide]]:
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
    velocity = GuidedVelocity(plain_anchor(backbone_velocity), cond, negative, cfg_scale, interval, memo, "prompts")
    side = GuidedSide(side_velocity, velocity) if side_velocity is not None else None
    return velocity, side
