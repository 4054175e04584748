"""Classifier-free guidance (CFG) with a guidance interval, as solver closures.

``build_sampling_fns`` turns model methods into the ``velocity_fn(x, t)`` / ``side_fn(x, v, t, h)``
pair every solver takes, so solvers never see labels or guidance.

Guidance is ``v = v_u + s (v_c - v_u)`` for times ``t`` in ``(lo, hi]`` and ``v = v_c`` elsewhere.
The backbone runs once on the doubled batch ``(x, x)`` with labels ``(y, null)`` (one NFE). The
SideNet is applied to the raw conditional and unconditional velocities (doubled batch) and the
two estimates are combined afterwards at each node's own time ``t - h``. Solvers only pass the
guided ``v`` to ``side_fn``, so with a SideNet the velocity closure returns a ``GuidedVelocity``
tensor: the guided velocity that carries the raw pair it was combined from, which the side
closure reads. Any arithmetic on it gives a plain tensor.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# backbone.velocity(x, t, y) -> v; sidenet.velocity(x, v, t, h, y) -> v_hat at t - h.
BackboneVelocity = Callable[[Tensor, Tensor, Tensor], Tensor]
SideVelocity = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

def guidance_active(t: Tensor, interval: Optional[Tuple[float, float]]) -> Tensor:
    """Boolean mask of the times at which guidance applies: ``lo < t <= hi``.

    Args:
        t: times ``(B,)`` in ``[0, 1]``.
        interval: ``(lo, hi)``, or None for every time.

    Returns:
        ``(B,)`` bool tensor.
    """
    if interval is None:
        return torch.ones_like(t, dtype=torch.bool)
    lo, hi = interval
    return (t > lo) & (t <= hi)


def combine_guidance(
    v_cond: Tensor, v_uncond: Tensor, t: Tensor, scale: float, interval: Optional[Tuple[float, float]]
) -> Tensor:
    """``v_u + scale (v_c - v_u)`` where guidance is active at ``t``, else ``v_c``.

    Args:
        v_cond: conditional velocity ``(B, ...)``.
        v_uncond: unconditional velocity ``(B, ...)``.
        t: the time each row belongs to ``(B,)``.
        scale: guidance scale ``s``.
        interval: ``(lo, hi)`` or None (always).

    Returns:
        ``(B, ...)`` velocity.
    """
    mask = guidance_active(t, interval).view(-1, *([1] * (v_cond.dim() - 1)))
    return torch.where(mask, torch.lerp(v_uncond, v_cond, scale), v_cond)


class RawPairVelocity(Tensor):
    """A guided velocity ``(B, ...)`` with the raw ``v_cond`` and ``v_uncond`` it was combined from.

    What a guided ``velocity_fn`` paired with a SideNet returns: the solver uses it as the
    velocity, the side closure reads ``v_cond`` / ``v_uncond``. Operations on it return plain
    tensors (no ``__torch_function__`` override), so the solver's arithmetic costs the same.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl
    v_cond: Tensor
    v_uncond: Tensor

    @classmethod
    def attach(cls, v: Tensor, v_cond: Tensor, v_uncond: Tensor) -> "RawPairVelocity":
        """``v`` (no copy) with its raw pair attached."""
        out = v.as_subclass(cls)
        out.v_cond, out.v_uncond = v_cond, v_uncond
        return out


class GuidedVelocity:
    """``velocity_fn(x, t)`` for a fixed label batch, with optional CFG.

    Without guidance each call is ``backbone(x, t, y)`` on batch ``B``. With guidance the backbone
    sees the doubled batch whenever some row is guided, or always when ``keep_raw`` (a SideNet
    needs the raw pair at every anchor, since its nodes may fall inside the interval).
    """

    def __init__(
        self,
        backbone_velocity: BackboneVelocity,
        y: Tensor,
        null_class: int,
        cfg_scale: float,
        interval: Optional[Tuple[float, float]],
        keep_raw: bool,
    ) -> None:
        self.backbone_velocity = backbone_velocity
        self.y = y
        self.y_pair = torch.cat([y, torch.full_like(y, null_class)])
        self.cfg_scale = float(cfg_scale)
        self.interval = interval
        self.guided = self.cfg_scale != 1.0 and (interval is None or interval[0] < interval[1])
        self.keep_raw = keep_raw and self.guided

    def _labels(self, x: Tensor, doubled: bool) -> Tensor:
        batch = self.y.shape[0]
        if x.shape[0] != batch:
            raise ValueError(
                f"guided closure built for batch {batch} (len(y)), called with x of batch {x.shape[0]}"
            )
        labels = self.y_pair if doubled else self.y
        return labels if labels.device == x.device else labels.to(x.device)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """Velocity at ``(x, t)``: ``x`` ``(B, ...)``, ``t`` ``(B,)``; returns ``(B, ...)``.

        With ``keep_raw`` the result is a ``RawPairVelocity`` carrying ``(v_cond, v_uncond)``.
        """
        if not self.guided:
            return self.backbone_velocity(x, t, self._labels(x, doubled=False))
        if not self.keep_raw and not bool(guidance_active(t, self.interval).any()):
            return self.backbone_velocity(x, t, self._labels(x, doubled=False))
        out = self.backbone_velocity(torch.cat([x, x]), torch.cat([t, t]), self._labels(x, doubled=True))
        v_cond, v_uncond = out.chunk(2)
        v = combine_guidance(v_cond, v_uncond, t, self.cfg_scale, self.interval)
        return RawPairVelocity.attach(v, v_cond, v_uncond) if self.keep_raw else v

    @staticmethod
    def raw_pair(v: Tensor) -> Tuple[Tensor, Tensor]:
        """The raw ``(v_cond, v_uncond)`` a guided velocity was combined from.

        Raises:
            ValueError: ``v`` is not a ``RawPairVelocity`` as this closure returns (e.g. it was
                cast, cloned or computed from one).
        """
        if not isinstance(v, RawPairVelocity):
            raise ValueError(
                "guided side_fn received a velocity that did not come from its paired velocity_fn: "
                "with guidance on, the SideNet needs the raw conditional/unconditional pair the "
                "velocity_fn returns with its output, so pass that output unchanged"
            )
        return v.v_cond, v.v_uncond


class GuidedSide:
    """``side_fn(x, v, t, h)`` for a fixed label batch, paired with a ``GuidedVelocity``.

    ``probe`` evaluates several offsets in ONE SideNet call: ``K`` offsets on batch ``B`` become
    one call on ``K * B`` rows without guidance, or ``2 K * B`` rows (cond/uncond per offset) with.
    """

    def __init__(self, side_velocity: SideVelocity, velocity: GuidedVelocity) -> None:
        self.side_velocity = side_velocity
        self.velocity = velocity

    def __call__(self, x: Tensor, v: Tensor, t: Tensor, h: Tensor) -> Tensor:
        """Estimate at ``t - h``: ``x``, ``v`` ``(B, ...)``, ``t``, ``h`` ``(B,)``."""
        return self.probe(x, v, t, [h])[0]

    def probe(self, x: Tensor, v: Tensor, t: Tensor, offsets: Sequence[Tensor]) -> List[Tensor]:
        """Estimates at ``t - h`` for each ``h`` in ``offsets`` (each ``(B,)``), one SideNet call."""
        k, batch, vel = len(offsets), x.shape[0], self.velocity
        if not vel.guided:
            labels = vel._labels(x, doubled=False)
            if k == 1:
                return [self.side_velocity(x, v, t, offsets[0], labels)]
            out = self.side_velocity(
                torch.cat([x] * k), torch.cat([v] * k), t.repeat(k), torch.cat(list(offsets)), labels.repeat(k)
            )
            return list(out.split(batch))
        v_cond, v_uncond = vel.raw_pair(v)
        labels = vel._labels(x, doubled=True)  # (y, null)
        # Rows: [x | x] per offset, offset-major, so chunk 2j is cond and 2j+1 uncond of offset j.
        out = self.side_velocity(
            torch.cat([x] * (2 * k)),
            torch.cat([v_cond, v_uncond] * k),
            t.repeat(2 * k),
            torch.cat([h for h in offsets for _ in range(2)]),
            labels.repeat(k),
        )
        chunks = out.split(batch)
        return [
            combine_guidance(chunks[2 * j], chunks[2 * j + 1], t - h, vel.cfg_scale, vel.interval)
            for j, h in enumerate(offsets)
        ]


def build_sampling_fns(
    backbone_velocity: BackboneVelocity,
    y: Tensor,
    *,
    null_class: int,
    cfg_scale: float = 1.0,
    interval: Optional[Tuple[float, float]] = (0.0, 0.7),
    side_velocity: Optional[SideVelocity] = None,
) -> Tuple[GuidedVelocity, Optional[GuidedSide]]:
    """Build the solver closures for one batch of labels.

    Args:
        backbone_velocity: ``backbone.velocity(x, t, y) -> v`` in the project convention.
        y: class labels, int64 ``(B,)``.
        null_class: the unconditional label (``num_classes``).
        cfg_scale: guidance scale ``s``; 1.0 disables guidance (plain conditional calls).
        interval: ``(lo, hi)``: guidance only for ``lo < t <= hi``; None: at every ``t``.
            ``lo == hi`` disables guidance.
        side_velocity: ``sidenet.velocity(x, v, t, h, y) -> v_hat`` at ``t - h``, or None for
            solvers without a SideNet. With guidance on, giving it makes every backbone call use
            the doubled batch (so leave it out for solvers that do not use it).

    Returns:
        ``(velocity_fn, side_fn)``; ``side_fn`` is None when ``side_velocity`` is None.

    Raises:
        ValueError: bad labels, interval or scale.
    """
    if not isinstance(y, Tensor) or y.dim() != 1 or y.dtype != torch.int64:
        desc = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y must be an int64 tensor of labels (B,), got {desc}")
    if interval is not None:
        lo, hi = (float(v) for v in interval)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(
                f"guidance interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {tuple(interval)}"
            )
        interval = (lo, hi)
    if not float(cfg_scale) >= 0.0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale!r}")
    velocity = GuidedVelocity(
        backbone_velocity, y, int(null_class), cfg_scale, interval, keep_raw=side_velocity is not None
    )
    side = GuidedSide(side_velocity, velocity) if side_velocity is not None else None
    return velocity, side
