"""Classifier-free guidance (CFG) with a guidance interval, as solver closures.

``build_sampling_fns`` turns model methods into the ``velocity_fn(x, t)`` / ``side_fn(x, v, t, h)``
pair every solver takes, so solvers never see labels or guidance.

Guidance is ``v = v_u + s (v_c - v_u)`` for times ``t`` in ``(lo, hi]`` and ``v = v_c`` elsewhere.
The backbone runs once on the doubled batch ``(x, x)`` with labels ``(y, null)`` (one NFE). The
SideNet is applied to the raw conditional and unconditional velocities (doubled batch) and the
two estimates are combined afterwards at each node's own time ``t - h``. Solvers only pass the
guided ``v`` to ``side_fn``; what the SideNet needs besides (the raw pair, the backbone's tokens
for a SideNet that reads them) is handed over explicitly through an ``AnchorMemo`` that both
closures share, keyed by the velocity tensor the backbone call returned.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from bafm.models.anchor_features import AnchorFn, plain_anchor
from bafm.models.text_condition import Condition, concat_conditions, condition_batch_size, repeat_condition
from bafm.solvers.counting import stack_rows

# backbone.velocity(x, t, y) -> v; sidenet.velocity(x, v, t, h, y[, features=]) -> v_hat at t - h.
BackboneVelocity = Callable[[Tensor, Tensor, Tensor], Tensor]
SideVelocity = Callable[..., Tensor]
# The guidance interval of the paper's release: CFG only for 0 < t <= 0.7.
DEFAULT_GUIDANCE_INTERVAL: Tuple[float, float] = (0.0, 0.7)

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


@dataclass
class AnchorRecord:
    """What one backbone call leaves for the SideNet calls made from its velocity.

    Attributes:
        v: the velocity the call returned (guided, if guidance was on), ``(B, ...)``.
        raw: ``(v_cond, v_uncond)`` with guidance on, each ``(B, ...)``, else None.
        features: the backbone's tokens, ``(B, T, D)`` (``(2B, T, D)`` with guidance on: conditional
            rows first), for a SideNet that reads them; else None.
    """

    v: Tensor
    raw: Optional[Tuple[Tensor, Tensor]] = None
    features: Optional[Tensor] = None


class AnchorMemo:
    """The explicit hand-over from the velocity closure to the side closure.

    Solvers pass only ``v`` to ``side_fn``; the velocity closure records, for each velocity it
    returns, what the SideNet needs with it (``AnchorRecord``), and the side closure looks the
    record up by that very tensor. A solver that merges velocities row by row (``ba-adaptive``)
    does so through ``select`` (see ``bafm.solvers.counting.select_rows``), which merges the
    records alike. Only the last few records are kept: a SideNet call always uses the velocity of
    a recent backbone call.
    """

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._records: "OrderedDict[int, AnchorRecord]" = OrderedDict()

    def remember(self, record: AnchorRecord) -> Tensor:
        """Store a record (keyed by its velocity's identity) and return that velocity."""
        self._records[id(record.v)] = record
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)
        return record.v

    def recall(self, v: Tensor) -> AnchorRecord:
        """The record of the call that returned ``v``.

        Raises:
            ValueError: ``v`` did not come from the paired velocity closure (e.g. it was cast,
                cloned or computed from one), or came from a call too long ago.
        """
        record = self._records.get(id(v))
        if record is None or record.v is not v:
            raise ValueError(
                "side_fn received a velocity that did not come from its paired velocity_fn: with guidance "
                "or backbone features, the SideNet needs what the backbone call left with that velocity, so "
                "pass the velocity_fn's output unchanged (merge rows with bafm.solvers.counting.select_rows)"
            )
        return record

    def select(self, keep: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """Rows of ``a`` where ``keep`` (``(B,)`` bool), else of ``b``, with their records merged alike."""
        ra, rb = self.recall(a), self.recall(b)

        def pick(u: Optional[Tensor], w: Optional[Tensor], repeat: int = 1) -> Optional[Tensor]:
            if u is None or w is None:
                return None
            mask = keep.repeat(repeat).view(-1, *[1] * (u.dim() - 1))
            return torch.where(mask, u, w)

        raw = None
        if ra.raw is not None and rb.raw is not None:
            raw = (pick(ra.raw[0], rb.raw[0]), pick(ra.raw[1], rb.raw[1]))
        rows = 1 if ra.features is None or ra.features.shape[0] == a.shape[0] else 2
        merged = AnchorRecord(pick(a, b), raw, pick(ra.features, rb.features, rows))  # type: ignore[arg-type]
        return self.remember(merged)


class GuidedVelocity:
    """``velocity_fn(x, t)`` for a fixed batch of conditions, with optional CFG.

    A condition is class labels ``(B,)`` (unconditional: the null class) or a text condition
    (``bafm.models.text_condition``; unconditional: the negative prompt's encoding): anything the
    ``text_condition`` helpers repeat and join along the batch axis.

    Without guidance each call is ``backbone(x, t, cond)`` on batch ``B``. With guidance the backbone
    sees the doubled batch ``(cond, uncond)`` whenever some row is guided, or always when a SideNet
    is paired (it needs the raw pair at every anchor, since its nodes may fall inside the interval).
    With a SideNet, every call's ``AnchorRecord`` goes to ``memo``.
    """

    def __init__(
        self,
        anchor: AnchorFn,
        cond: Condition,
        uncond: Optional[Condition],
        cfg_scale: float,
        interval: Optional[Tuple[float, float]],
        memo: Optional[AnchorMemo],
        what: str = "len(y)",
    ) -> None:
        self.anchor = anchor
        self.cond = cond
        self.batch = condition_batch_size(cond)
        self.cfg_scale = float(cfg_scale)
        self.interval = interval
        self.guided = self.cfg_scale != 1.0 and (interval is None or interval[0] < interval[1])
        self.pair = concat_conditions([cond, uncond]) if self.guided else None
        self.memo = memo
        self.what = what  # what the batch size counts, for the error message

    def labels(self, x: Tensor, doubled: bool) -> Condition:
        """The condition of a call on ``x``: ``cond``, or ``(cond, uncond)`` for the doubled batch."""
        if x.shape[0] != self.batch:
            raise ValueError(
                f"guided closure built for batch {self.batch} ({self.what}), called with x of batch {x.shape[0]}"
            )
        cond = self.pair if doubled else self.cond
        if isinstance(cond, Tensor) and cond.device != x.device:
            cond = cond.to(x.device)
        return cond

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """Velocity at ``(x, t)``: ``x`` ``(B, ...)``, ``t`` ``(B,)``; returns ``(B, ...)``."""
        doubled = self.guided and (self.memo is not None or bool(guidance_active(t, self.interval).any()))
        if not doubled:
            v, features = self.anchor(x, t, self.labels(x, doubled=False))
            return v if self.memo is None else self.memo.remember(AnchorRecord(v, None, features))
        out, features = self.anchor(torch.cat([x, x]), torch.cat([t, t]), self.labels(x, doubled=True))
        v_cond, v_uncond = out.chunk(2)
        v = combine_guidance(v_cond, v_uncond, t, self.cfg_scale, self.interval)
        return v if self.memo is None else self.memo.remember(AnchorRecord(v, (v_cond, v_uncond), features))


class GuidedSide:
    """``side_fn(x, v, t, h)`` for a fixed label batch, paired with a ``GuidedVelocity``.

    ``probe`` evaluates several offsets in ONE SideNet call: ``K`` offsets on batch ``B`` become
    one call on ``K * B`` rows without guidance, or ``2 K * B`` rows (cond/uncond per offset) with.
    ``select`` merges two velocities row by row with what the SideNet reads with them.
    """

    def __init__(self, side_velocity: SideVelocity, velocity: GuidedVelocity) -> None:
        self.side_velocity = side_velocity
        self.velocity = velocity
        # Without guidance or features a velocity is all the SideNet needs: no records kept.
        self.memo: Optional[AnchorMemo] = velocity.memo

    def __call__(self, x: Tensor, v: Tensor, t: Tensor, h: Tensor) -> Tensor:
        """Estimate at ``t - h``: ``x``, ``v`` ``(B, ...)``, ``t``, ``h`` ``(B,)``."""
        return self.probe(x, v, t, [h])[0]

    def select(self, keep: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``a`` where ``keep`` else ``b`` (``(B,)`` bool), records merged (see ``AnchorMemo.select``)."""
        if self.memo is None:
            return torch.where(keep.view(-1, *[1] * (a.dim() - 1)), a, b)
        return self.memo.select(keep, a, b)

    def _call(self, x: Tensor, v: Tensor, t: Tensor, h: Tensor, y: Tensor, features: Optional[Tensor]) -> Tensor:
        if features is None:
            return self.side_velocity(x, v, t, h, y)
        return self.side_velocity(x, v, t, h, y, features)

    def probe(self, x: Tensor, v: Tensor, t: Tensor, offsets: Sequence[Tensor]) -> List[Tensor]:
        """Estimates at ``t - h`` for each ``h`` in ``offsets`` (each ``(B,)``), one SideNet call."""
        k, batch, vel = len(offsets), x.shape[0], self.velocity
        record = AnchorRecord(v) if self.memo is None else self.memo.recall(v)
        if record.raw is None:
            xs, vs, ts, fs = stack_rows(k, x, v, t, record.features)
            ys = repeat_condition(vel.labels(x, doubled=False), k)
            out = self._call(xs, vs, ts, torch.cat(list(offsets)), ys, fs)
            return list(out.split(batch))
        v_cond, v_uncond = record.raw
        # Rows: [x | x] per offset, offset-major, so chunk 2j is cond and 2j+1 uncond of offset j.
        xs, vs, ts, fs = stack_rows(k, torch.cat([x, x]), torch.cat([v_cond, v_uncond]), torch.cat([t, t]),
                                    record.features)
        ys = repeat_condition(vel.labels(x, doubled=True), k)  # (cond, uncond) per offset
        out = self._call(xs, vs, ts, torch.cat([h for h in offsets for _ in range(2)]), ys, fs)
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
    interval: Optional[Tuple[float, float]] = DEFAULT_GUIDANCE_INTERVAL,
    side_velocity: Optional[SideVelocity] = None,
    anchor: Optional[AnchorFn] = None,
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
        anchor: ``(x, t, y) -> (v, features)`` for a SideNet that reads the backbone's tokens
            (``bafm.models.anchor_features.anchor_for``); it replaces ``backbone_velocity``, and
            its features reach ``side_velocity(..., features=)``.

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
    guided = float(cfg_scale) != 1.0 and (interval is None or interval[0] < interval[1])
    memo = AnchorMemo() if side_velocity is not None and (guided or anchor is not None) else None
    velocity = GuidedVelocity(anchor or plain_anchor(backbone_velocity), y, torch.full_like(y, int(null_class)),
                              cfg_scale, interval, memo)
    side = GuidedSide(side_velocity, velocity) if side_velocity is not None else None
    return velocity, side
