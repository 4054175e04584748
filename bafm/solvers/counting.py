"""Call counting (NFE, SideNet calls), row counting (work, for FLOPs) and batched SideNet probes.

NFE is never derived from a formula: every solver wraps its callables in ``CallCounter`` and
reports what the counter saw. Likewise the work of a solve: ``NetworkRows`` counts the rows that
pass through each network.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import Tensor


def stack_rows(k: int, *tensors: Optional[Tensor]) -> List[Optional[Tensor]]:
    """``k`` copies of each batch-first tensor stacked along dim 0 (None stays None).

    How one SideNet call serves ``k`` offsets from the same anchor: row ``j * B + i`` is sample
    ``i`` for offset ``j``, so the result splits back with ``out.split(B)``.
    """
    return [None if x is None else (x if k == 1 else torch.cat([x] * k)) for x in tensors]


def select_rows(side_fn: Any, keep: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Per-sample choice between two velocities: ``a`` where ``keep`` (``(B,)`` bool), else ``b``.

    A SideNet closure that keeps what each backbone call left for it (the guided raw pair, the
    backbone's features) selects those rows too, through its ``select`` method; a plain closure
    needs only the velocities.
    """
    own = getattr(getattr(side_fn, "fn", side_fn), "select", None)
    if own is not None:
        return own(keep, a, b)
    return torch.where(keep.view(-1, *[1] * (a.dim() - 1)), a, b)


def probe(
    side_fn: Callable[..., Tensor], x: Tensor, v: Tensor, t: Tensor, offsets: Sequence[Tensor]
) -> List[Tensor]:
    """Evaluate a SideNet at several offsets from one anchor in a single call.

    If ``side_fn`` has a ``probe`` method (e.g. the guided closure of
    ``bafm.models.guidance``, which must batch cond/uncond itself), that method is used.
    Otherwise the inputs are stacked along dim 0 (``K`` copies of ``x``/``v``/``t`` and the
    ``K`` offsets), ``side_fn`` is called once on the ``(K*B, ...)`` batch and the result split.

    Args:
        side_fn: ``side_fn(x, v, t, h) -> v_hat`` (velocity estimate at ``t - h``).
        x: anchor state ``(B, ...)``.
        v: velocity at the anchor ``(B, ...)``.
        t: anchor time ``(B,)`` in ``[0, 1]``.
        offsets: ``K`` offsets, each ``(B,)``; ``h > 0`` looks toward data, ``h < 0`` toward noise.

    Returns:
        ``K`` estimates, each ``(B, ...)``, in the order of ``offsets``.
    """
    own = getattr(side_fn, "probe", None)
    if own is not None:
        return list(own(x, v, t, offsets))
    k = len(offsets)
    if k == 1:
        return [side_fn(x, v, t, offsets[0])]
    xs, vs, ts = stack_rows(k, x, v, t)
    out = side_fn(xs, vs, ts, torch.cat(list(offsets)))
    if out.shape[0] != k * x.shape[0]:
        raise ValueError(
            f"side_fn returned batch {out.shape[0]} for a stacked probe of {k} x {x.shape[0]} rows"
        )
    return list(out.split(x.shape[0]))


class CallCounter:
    """Wrap a callable and count its calls.

    ``counter(*args)`` forwards one call; ``counter.probe(x, v, t, offsets)`` forwards a
    multi-offset SideNet probe and counts it as one call (see ``probe``).

    Attributes:
        fn: the wrapped callable.
        calls: calls made so far.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        if not callable(fn):
            raise TypeError(f"expected a callable, got {type(fn).__name__}")
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)

    def probe(self, x: Tensor, v: Tensor, t: Tensor, offsets: Sequence[Tensor]) -> List[Tensor]:
        """One batched SideNet call at several offsets; see the module function ``probe``."""
        self.calls += 1
        return probe(self.fn, x, v, t, offsets)


class NetworkRows:
    """Rows that passed through the backbone and through the SideNet: the work of solves.

    ``CallCounter`` counts calls (NFE: a guided call on the doubled batch is one); this counts
    rows, so a guided call on ``2 B`` rows is ``2 B``, and a SideNet probe at three offsets on
    ``B`` samples is ``3 B``. Wrap the networks' entry points with ``backbone_fn`` /
    ``sidenet_fn`` (their first argument is the batch-first state) and read the totals.

    Attributes:
        backbone: backbone rows so far.
        sidenet: SideNet rows so far.
    """

    def __init__(self) -> None:
        self.backbone = 0
        self.sidenet = 0

    def backbone_fn(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` that adds its first argument's rows to ``backbone``."""

        def counted(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            self.backbone += int(x.shape[0])
            return fn(x, *args, **kwargs)

        return counted

    def sidenet_fn(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` that adds its first argument's rows to ``sidenet``."""

        def counted(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            self.sidenet += int(x.shape[0])
            return fn(x, *args, **kwargs)

        return counted
