"""The backbone's hidden tokens at each call, for SideNets that read them (``feature_dim > 0``).

Every SideNet call of a BA step sits at a point where the backbone was just evaluated (the
step's start for the forward probe, the new anchor for the backward one), so the backbone's
hidden features there cost no extra backbone call. ``BackboneFeatures`` reads them with a
forward hook on one transformer block, so the backbone's own ``velocity`` (and any fast-path
wrapper around it) runs unchanged.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

# anchor(x, t, y) -> (v, features): the backbone velocity and, when asked for, its tokens.
AnchorFn = Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Optional[Tensor]]]


def _blocks(backbone: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a backbone or of a wrapper around one (``.module``, ``_orig_mod``)."""
    module = backbone
    for _ in range(4):
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks
        module = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if module is None:
            break
    raise ValueError(
        f"{type(backbone).__name__} has no 'blocks' list of transformer blocks to read features from; "
        "use a SideNet without backbone features (sidenet.backbone_features=false)"
    )


class BackboneFeatures:
    """``anchor(x, t, y) -> (v, tokens)``: a backbone call and the output tokens of one of its blocks.

    Args:
        backbone: module with ``velocity(x, t, y)`` and a ``blocks`` list (SiT), possibly wrapped.
        layer: block index (negative counts from the last).

    The hook is registered for the duration of each call only, so the backbone runs exactly as
    before outside it and no anchor outlives its use on the module.
    """

    def __init__(self, backbone: nn.Module, layer: int = -1) -> None:
        blocks = _blocks(backbone)
        if not -len(blocks) <= int(layer) < len(blocks):
            raise ValueError(f"feature_layer {layer} is out of range for a backbone of {len(blocks)} blocks")
        self.backbone = backbone
        self.layer = int(layer)
        self.block = blocks[self.layer]
        self._tokens: Optional[Tensor] = None

    def _keep(self, module: nn.Module, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
        self._tokens = output

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """The backbone velocity ``(B, C, H, W)`` at ``(x, t)`` and the block's tokens ``(B, T, D)``."""
        self._tokens = None
        handle = self.block.register_forward_hook(self._keep)
        try:
            v = self.backbone.velocity(x, t, y)
        finally:
            handle.remove()
        tokens, self._tokens = self._tokens, None
        if tokens is None:
            raise RuntimeError(
                f"backbone block {self.layer} did not run during velocity(), so there are no features to read "
                "(CUDA-graph replays run no hooks: set backbone.cuda_graphs=false with a feature SideNet)"
            )
        # Replayed CUDA graphs reuse their buffers: the tokens must outlive the next call.
        return v, tokens.detach().to(x.dtype).clone()


def plain_anchor(backbone_velocity: Callable[[Tensor, Tensor, Tensor], Tensor]) -> AnchorFn:
    """``anchor(x, t, y) -> (v, None)`` for SideNets that read no backbone features."""

    def anchor(x: Tensor, t: Tensor, y: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        return backbone_velocity(x, t, y), None

    return anchor


def uses_backbone_features(sidenet: Optional[nn.Module]) -> bool:
    """Whether a SideNet (or a wrapper around one) reads the backbone's tokens."""
    return bool(sidenet is not None and getattr(sidenet, "uses_backbone_features", False))


def anchor_for(backbone: nn.Module, sidenet: Optional[nn.Module]) -> AnchorFn:
    """The anchor function a SideNet needs: with the backbone's tokens or without."""
    if not uses_backbone_features(sidenet):
        return plain_anchor(backbone.velocity)
    return BackboneFeatures(backbone, int(getattr(sidenet, "feature_layer", -1)))


@torch.no_grad()
def feature_width(backbone: nn.Module, layer: int = -1) -> int:
    """Token width ``D`` of block ``layer`` (read from the backbone's config or its weights)."""
    config = getattr(backbone, "config", None)
    if isinstance(config, dict) and "hidden_size" in config:
        return int(config["hidden_size"])
    blocks = _blocks(backbone)
    for param in blocks[layer].parameters():
        return int(param.shape[-1])
    raise ValueError("cannot tell the backbone's token width")
