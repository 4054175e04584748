"""Text conditioning of a text-to-image flow model, as one batch-shaped object.

Class labels are one ``(B,)`` tensor; a text prompt is encoded into a sequence of token
embeddings and one pooled embedding. ``TextCondition`` carries both, and the helpers below treat
a condition as an opaque batch: a plain tensor (class labels) or a ``TextCondition`` (any
``torch.utils._pytree`` tree of tensors whose leaves share the batch axis 0). The training loss
and the guidance closures repeat, concatenate and select conditions with these helpers, so they
never need to know what a condition holds.

The unconditional branch of SD3's and Flux's pipelines is the encoding of the negative prompt
(the empty prompt by default), not a learned null embedding: ``null_like`` broadcasts that one
encoding to a batch, and ``select_rows`` swaps it in for dropped rows during training.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

Condition = Any  # a Tensor (class labels) or a TextCondition: leaves share the batch axis 0


class TextCondition(NamedTuple):
    """Prompt embeddings of one batch, as the pipeline's ``encode_prompt`` returns them.

    Attributes:
        prompt_embeds: token embeddings ``(B, L, D)`` (SD3: CLIP-L/G and T5 joined, ``D = 4096``;
            Flux: T5, ``D = 4096``).
        pooled: pooled embedding ``(B, P)`` (SD3: CLIP-L and CLIP-G pooled, ``P = 2048``; Flux:
            CLIP-L pooled, ``P = 768``).
    """

    prompt_embeds: Tensor
    pooled: Tensor


def condition_batch_size(cond: Condition) -> int:
    """Rows of a condition (the length of axis 0 of its leaves).

    Raises:
        ValueError: the leaves disagree on the batch size, or there are none.
    """
    sizes = {leaf.shape[0] for leaf in pytree.tree_leaves(cond)}
    if len(sizes) != 1:
        raise ValueError(f"a condition's tensors must share the batch axis 0, got batch sizes {sorted(sizes)}")
    return sizes.pop()


def repeat_condition(cond: Condition, n: int) -> Condition:
    """The batch tiled ``n`` times along axis 0 (``Tensor.repeat`` order: ``[c, c, ..., c]``)."""
    return pytree.tree_map(lambda leaf: leaf.repeat(n, *([1] * (leaf.dim() - 1))), cond)


def concat_conditions(conds: Sequence[Condition]) -> Condition:
    """Conditions of the same structure joined along the batch axis."""
    flat = [pytree.tree_flatten(c) for c in conds]
    spec = flat[0][1]
    joined = [torch.cat(leaves, dim=0) for leaves in zip(*(leaves for leaves, _ in flat))]
    return pytree.tree_unflatten(joined, spec)


def null_like(null: Condition, batch: int) -> Condition:
    """The one-row unconditional ``null`` (e.g. the empty prompt's encoding) expanded to ``batch`` rows."""
    return pytree.tree_map(lambda leaf: leaf.expand(batch, *leaf.shape[1:]), null)


def select_rows(mask: Tensor, if_true: Condition, if_false: Condition) -> Condition:
    """Row-wise choice: row ``i`` of ``if_true`` where ``mask[i]``, else of ``if_false``.

    Args:
        mask: bool ``(B,)``.
        if_true: condition of batch ``B``.
        if_false: condition of batch ``B`` or 1 (broadcast), same structure.

    Returns:
        A condition of batch ``B``.
    """

    def pick(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b.to(a.dtype))

    return pytree.tree_map(pick, if_true, if_false)


def condition_to(cond: Condition, device: torch.device | str, dtype: torch.dtype | None = None) -> Condition:
    """A condition moved to ``device``; floating-point leaves also cast to ``dtype`` when given."""

    def move(leaf: Tensor) -> Tensor:
        if dtype is not None and leaf.is_floating_point():
            return leaf.to(device=device, dtype=dtype)
        return leaf.to(device)

    return pytree.tree_map(move, cond)


def pooled_embedding(cond: Condition) -> Tensor:
    """The pooled text embedding ``(B, P)`` of a ``TextCondition`` (or a bare ``(B, P)`` tensor)."""
    return cond.pooled if isinstance(cond, TextCondition) else cond


def drop_conditions(
    cond: Condition, null: Condition, prob: float, generator: torch.Generator | None = None
) -> Condition:
    """Replace rows by the unconditional encoding with probability ``prob`` (classifier-free guidance).

    The text counterpart of ``bafm.models.layers.drop_labels``, drawing the same ``B`` uniforms.

    Args:
        cond: condition of batch ``B``.
        null: the unconditional encoding, batch 1 (e.g. the empty prompt's), same structure.
        prob: drop probability in ``[0, 1]``.
        generator: optional random generator (on ``cond``'s device).

    Returns:
        A condition of batch ``B``.
    """
    if prob <= 0.0:
        return cond
    leaf = pytree.tree_leaves(cond)[0]
    drop = torch.rand((leaf.shape[0],), device=leaf.device, generator=generator) < prob
    return select_rows(~drop, cond, null_like(null, leaf.shape[0]))
