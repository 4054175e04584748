"""Feature extractors for FID and IS: one interface, two domains.

A feature extractor maps decoded images ``(B, C, H, W)`` in ``[0, 1]`` to
``(features (B, D), logits (B, K) or None)``: features feed FID, logits feed IS.

- ``InceptionFeatures``: torch-fidelity's ``inception-v3-compat`` (the TF-FID Inception), pool
  features (2048) and unbiased logits (1008), from a local weights file: nothing is downloaded.
- ``ClassifierFeatures``: the embedded default's digits CNN, penultimate features and logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from bafm.models.classifier import DigitsClassifier, file_fingerprint, load_classifier, sidecar_path

# torch-fidelity's release file name for inception-v3-compat; its hub cache keeps this name.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_SOURCE = "the torch-fidelity v0.2.0 release asset " + INCEPTION_WEIGHTS_FILE

Features = Tuple[torch.Tensor, Optional[torch.Tensor]]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` floats -> uint8 with rounding (``127.5 x + 128`` in ``[-1, 1]`` terms, as SiT/REPA).

    Args:
        images: ``(B, C, H, W)`` in ``[0, 1]`` (values outside are clipped).

    Returns:
        ``(B, C, H, W)`` uint8.
    """
    return (images.float() * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)


class FeatureExtractor(nn.Module):
    """Base class: ``forward(images in [0, 1]) -> (features, logits or None)``.

    Attributes:
        name: identifies the feature space (stored with reference statistics).
        feature_dim: ``D``.
    """

    name: str = "base"
    feature_dim: int = 0

    def forward(self, images: torch.Tensor) -> Features:  # pragma: no cover - interface
        """Extract features.

        Args:
            images: ``(B, C, H, W)`` in ``[0, 1]``.

        Returns:
            ``(features (B, D) float32, logits (B, K) float32 or None)``.
        """
        raise NotImplementedError


class ClassifierFeatures(FeatureExtractor):
    """Digits classifier: 128-d penultimate features (FID) and 10 logits (IS)."""

    def __init__(self, classifier: DigitsClassifier, name: str = "digits-classifier") -> None:
        """Wrap a (frozen) classifier.

        Args:
            classifier: the digits CNN; it sees images mapped back to ``[-1, 1]``.
            name: feature-space name, e.g. including the weights' fingerprint.
        """
        super().__init__()
        self.classifier = classifier.requires_grad_(False).eval()
        self.name = name
        self.feature_dim = classifier.feature_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Features:
        """See ``FeatureExtractor.forward``; images ``(B, 1, 16, 16)`` for the shipped classifier."""
        x = images.float() * 2.0 - 1.0  # the classifier was trained on [-1, 1] pixels
        feats = self.classifier.features(x)
        return feats.float(), self.classifier.head(feats).float()


def resolve_inception_weights(path: str | Path | None) -> Path:
    """Find the local inception-v3-compat weights, or say which file to place where.

    Args:
        path: ``eval.inception_weights``; empty means torch's hub cache
            (``<torch hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.pth``).

    Returns:
        An existing weights file.

    Raises:
        FileNotFoundError: the file is absent (nothing is downloaded).
    """
    if path:
        p = Path(path)
        if p.is_file():
            return p
        raise FileNotFoundError(
            f"eval.inception_weights: '{p}' not found. Place {INCEPTION_WEIGHTS_SOURCE} "
            f"(inception-v3-compat, a PyTorch state dict) at '{p}'; nothing is downloaded at run time."
        )
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return cached
    raise FileNotFoundError(
        f"eval.inception_weights is empty and '{cached}' does not exist. Place {INCEPTION_WEIGHTS_SOURCE} "
        f"there, or anywhere and set eval.inception_weights=<path>; nothing is downloaded at run time."
    )


class InceptionFeatures(FeatureExtractor):
    """torch-fidelity's ``inception-v3-compat``: 2048-d pool features, 1008 unbiased logits.

    These are the features of the ADM/TF FID code, so ADM reference batches
    (``VIRTUAL_imagenet256_labeled.npz``: ``mu``, ``sigma``) compare directly.
    """

    name = "inception-v3-compat"
    feature_dim = 2048

    def __init__(self, weights_path: str | Path | None) -> None:
        """Build the network from a local weights file.

        Args:
            weights_path: see ``resolve_inception_weights``.

        Raises:
            FileNotFoundError: weights absent.
            ValueError: the file is not an inception-v3-compat state dict.
        """
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = resolve_inception_weights(weights_path)
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
            )
        except Exception as err:  # torch.load / load_state_dict raise many types for a bad file
            raise ValueError(
                f"'{path}' is not a usable inception-v3-compat state dict ({INCEPTION_WEIGHTS_SOURCE} "
                f"expected): {err}"
            ) from None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Features:
        """See ``FeatureExtractor.forward``; grey images are repeated to RGB, any size is resized to 299."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception expects images (B, 1 or 3, H, W), got {tuple(images.shape)}.")
        x = to_uint8(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        feats, logits = self.net(x.contiguous())
        return feats.float(), logits.float()


def build_feature_extractor(
    kind: str,
    *,
    classifier_path: str | Path = "",
    inception_weights: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> FeatureExtractor:
    """Build the configured extractor (``eval.feature_extractor``).

    Args:
        kind: ``classifier`` or ``inception``.
        classifier_path: digits classifier weights (for ``classifier``).
        inception_weights: local Inception weights (for ``inception``).
        device: where to run it.

    Returns:
        The extractor in eval mode on ``device``.
    """
    if kind == "classifier":
        model = load_classifier(classifier_path, device=device)
        name = f"digits-classifier-{file_fingerprint(classifier_path)}"
        extractor: FeatureExtractor = ClassifierFeatures(model, name=name)
    elif kind == "inception":
        extractor = InceptionFeatures(inception_weights)
    else:
        raise ValueError(f"eval.feature_extractor is '{kind}', expected one of: classifier, inception.")
    return extractor.to(device).eval()


def check_feature_extractor_files(
    kind: str, *, classifier_path: str | Path = "", inception_weights: str | Path | None = None
) -> None:
    """Fail fast (before any sampling) when the extractor's weights are missing.

    Raises:
        FileNotFoundError: naming the file and how to make or where to place it.
    """
    if kind == "classifier":
        for p in (Path(classifier_path), sidecar_path(classifier_path)):
            if not p.is_file():
                raise FileNotFoundError(
                    f"eval.classifier_path: '{p}' not found; train the digits classifier with "
                    "`make backbone` (it writes backbone_train.classifier_out and its .json sidecar)."
                )
    elif kind == "inception":
        resolve_inception_weights(inception_weights)
    else:
        raise ValueError(f"eval.feature_extractor is '{kind}', expected one of: classifier, inception.")
