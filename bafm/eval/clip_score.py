"""CLIP score of generated images against their prompts, through torchmetrics' ``CLIPScore``.

A hub name (``openai/clip-vit-large-patch14``, the default) is fetched into the Hugging Face
cache when online, as torchmetrics' own loader does; a local folder holding a ``CLIPModel`` and
its ``CLIPProcessor`` (``save_pretrained`` layout) is read from disk. The score is torchmetrics':
``max(100 * cos(image embedding, text embedding), 0)``, averaged over the images.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

from bafm.eval.features import FeatureExtractor, to_uint8


class ClipScoreError(ValueError):
    """The CLIP model for the CLIP score cannot be loaded (offline without it, or a bad folder)."""


class ProjectedClip(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected
    embeddings as tensors.

    transformers 5 returns model outputs from them (the projection in ``pooler_output``), while
    torchmetrics 1.9's ``CLIPScore`` normalises their result as a tensor; this adapter restores
    the tensor it expects and changes nothing else.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load_clip(model: str) -> Tuple[ProjectedClip, Any]:
    """``(ProjectedClip, CLIPProcessor)`` of ``model`` (hub name or local ``save_pretrained`` folder).

    The weights are read by ``CLIPModel.from_pretrained`` (the Hugging Face cache, fetched with
    its progress bar when online), as torchmetrics' own loader does.

    Raises:
        ClipScoreError: one line naming ``model`` and what went wrong.
    """
    from transformers import CLIPModel, CLIPProcessor

    try:
        clip = CLIPModel.from_pretrained(model).eval().requires_grad_(False)
        processor = CLIPProcessor.from_pretrained(model)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClipScoreError(
            f"eval.clip_model '{model}': cannot load CLIP for the CLIP score ({first}); offline, point it at a "
            "local CLIP folder (CLIPModel + CLIPProcessor) or set it to '' to skip the score"
        ) from None
    return ProjectedClip(clip), processor


def load_clip_score(model: str, device: torch.device | str = "cpu", loaded: Optional[Tuple[Any, Any]] = None) -> Any:
    """A torchmetrics ``CLIPScore`` for ``model`` (or the already ``loaded`` pair), on ``device``.

    Raises:
        ClipScoreError: see ``load_clip``.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    pair = loaded if loaded is not None else load_clip(model)
    return CLIPScore(model_name_or_path=lambda: pair).to(device)


class ClipImageFeatures(FeatureExtractor):
    """CLIP image embeddings as the feature space of a Fréchet distance (``FD_CLIP``).

    An alternative to Inception for text-to-image samples, whose content lies far from
    ImageNet's classes; the ``fid`` column is then measured in this space.
    """

    def __init__(self, clip: ProjectedClip, processor: Any, name: str) -> None:
        super().__init__()
        self.clip, self.processor, self.name = clip, processor, f"clip:{name}"
        self.feature_dim = int(clip.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, None]:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(embeddings (B, D), None)``."""
        pixels = self.processor(images=list(to_uint8(images).cpu()), return_tensors="pt")["pixel_values"]
        device = next(self.clip.parameters()).device
        return self.clip.get_image_features(pixel_values=pixels.to(device)).float(), None


@torch.no_grad()
def clip_score_sum(metric: Any, images: torch.Tensor, prompts: Sequence[str]) -> Tuple[float, int]:
    """The sum of ``100 * cos`` over a batch and its size, from one ``metric.update``.

    Accumulate them per sweep point and take ``max(sum / n, 0)``: what ``metric.compute`` gives
    over all the point's images, batch by batch, with one metric shared by every point.

    Args:
        metric: from ``load_clip_score``.
        images: ``(B, 3, H, W)`` in ``[0, 1]`` (sent as uint8, torchmetrics' expected range).
        prompts: ``B`` prompts.

    Returns:
        ``(sum of scores, B)``.
    """
    uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    metric.reset()
    metric.update(uint8.to(metric.device), list(prompts))
    total, count = float(metric.score), int(metric.n_samples)
    metric.reset()
    return total, count
