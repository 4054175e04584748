"""Feature extractors for the sweep's metrics: one interface, two domains.

A feature extractor maps decoded images ``(B, C, H, W)`` in ``[0, 1]`` to
``(features (B, D), logits (B, K) or None)``: features feed FID and precision/recall, logits
feed IS. ``extract`` also returns spatial features ``(B, S)`` for sFID where the network has them.

- ``InceptionFeatures``: torch-fidelity's ``inception-v3-compat`` (the TF-FID Inception), pool
  features (2048), unbiased logits (1008) and the ADM suite's spatial features (2023), from a
  local weights file or torch-fidelity's download into torch's hub cache.
- ``ClassifierFeatures``: the embedded default's digits CNN, penultimate features and logits.
"""

from __future__ import annotations

import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from bafm.models.classifier import DigitsClassifier, file_fingerprint, load_classifier, sidecar_path

# torch-fidelity's release file name for inception-v3-compat; its hub cache keeps this name.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_SOURCE = "the torch-fidelity v0.2.0 release asset " + INCEPTION_WEIGHTS_FILE

# The ADM suite's sFID features: TF graph node ``mixed_6/conv:0`` (the 1x1 branch of the
# Mixed_6d block after batch norm and ReLU, 192 x 17 x 17 at 299 px), first 7 channels.
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
SPATIAL_SIZE = 17

Features = Tuple[torch.Tensor, Optional[torch.Tensor]]

# eval.feature_extractor choices: the embedded default's digits classifier, or torch-fidelity's Inception.
FEATURE_EXTRACTORS = ("classifier", "inception")


@dataclass
class FeatureBatch:
    """What an extractor returns for one batch.

    Attributes:
        features: ``(B, D)`` float32 (FID, precision/recall).
        logits: ``(B, K)`` float32 (IS), or None.
        spatial: ``(B, S)`` float32 (sFID), or None when the extractor has none.
    """

    features: torch.Tensor
    logits: Optional[torch.Tensor] = None
    spatial: Optional[torch.Tensor] = None


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
        spatial_dim: ``S`` of the spatial features (0: none, no sFID).
    """

    name: str = "base"
    feature_dim: int = 0
    spatial_dim: int = 0

    def forward(self, images: torch.Tensor) -> Features:  # pragma: no cover - interface
        """Extract features.

        Args:
            images: ``(B, C, H, W)`` in ``[0, 1]``.

        Returns:
            ``(features (B, D) float32, logits (B, K) float32 or None)``.
        """
        raise NotImplementedError

    def extract(self, images: torch.Tensor) -> FeatureBatch:
        """Features, logits and (where the extractor has them) spatial features in one pass.

        Args:
            images: ``(B, C, H, W)`` in ``[0, 1]``.

        Returns:
            The batch's ``FeatureBatch``.
        """
        features, logits = self(images)
        return FeatureBatch(features, logits)


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


def fetch_inception_weights() -> Path:
    """Download the inception-v3-compat weights the way torch-fidelity does, with a progress bar.

    torch-fidelity's own loader (``load_state_dict_from_url`` on its release URL) puts the file
    in torch's hub cache, ``<torch hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.pth``.

    Returns:
        The cached file.

    Raises:
        OSError: no network (``urllib.error.URLError``) or the download failed.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with redirect_stdout(sys.stderr):  # as torch-fidelity: keep stdout for results
        tf_inception.load_state_dict_from_url(tf_inception.URL_INCEPTION_V3, progress=True)
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def resolve_inception_weights(path: str | Path | None, download: bool = True) -> Path:
    """Find the inception-v3-compat weights, fetch them into the hub cache, or say where to place them.

    Args:
        path: ``eval.inception_weights``; empty means torch's hub cache
            (``<torch hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.pth``), where
            a missing file is downloaded by ``fetch_inception_weights``. A named file is never
            downloaded.
        download: try the download for the hub cache (off: only look).

    Returns:
        An existing weights file.

    Raises:
        FileNotFoundError: the file is absent and could not be downloaded (e.g. offline).
    """
    if path:
        p = Path(path)
        if p.is_file():
            return p
        raise FileNotFoundError(
            f"eval.inception_weights: '{p}' not found. Place {INCEPTION_WEIGHTS_SOURCE} "
            f"(inception-v3-compat, a PyTorch state dict) at '{p}', or leave eval.inception_weights "
            "empty to use (and fetch) torch's hub cache."
        )
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return cached
    reason = "downloading is off"
    if download:
        try:
            fetched = fetch_inception_weights()
            if fetched.is_file():
                return fetched
            reason = f"the download did not produce '{fetched}'"
        except (OSError, RuntimeError, ValueError) as err:  # URLError (offline), HTTP errors, bad file
            reason = f"the download failed ({' '.join(str(err).split())})"
    raise FileNotFoundError(
        f"eval.inception_weights is empty and '{cached}' does not exist; {reason}. Place {INCEPTION_WEIGHTS_SOURCE} "
        f"there, or anywhere and set eval.inception_weights=<path>."
    )


class InceptionFeatures(FeatureExtractor):
    """torch-fidelity's ``inception-v3-compat``: 2048-d pool features, 1008 unbiased logits and
    the ADM suite's 2023-d spatial features.

    These are the features of the ADM/TF evaluation code, so ADM reference batches
    (``VIRTUAL_imagenet256_labeled.npz``: ``mu``, ``sigma``, ``mu_s``, ``sigma_s``) compare
    directly. The spatial features are the output of ``Mixed_6d.branch1x1`` (TF ``mixed_6/conv``),
    first 7 channels, flattened in TF's height-width-channel order like ADM's ``reshape``.
    """

    name = "inception-v3-compat"
    feature_dim = 2048
    spatial_dim = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE

    def __init__(self, weights_path: str | Path | None) -> None:
        """Build the network from a weights file (see ``resolve_inception_weights``).

        Args:
            weights_path: see ``resolve_inception_weights``.

        Raises:
            FileNotFoundError: weights absent and not downloadable.
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
        self.spatial_layer = self.net.get_submodule(SPATIAL_LAYER)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> FeatureBatch:
        """See ``FeatureExtractor.extract``; grey images are repeated to RGB, any size is resized to 299."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception expects images (B, 1 or 3, H, W), got {tuple(images.shape)}.")
        x = to_uint8(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        grabbed: List[torch.Tensor] = []
        # torch-fidelity does not expose this layer: read it with a hook during the same pass.
        hook = self.spatial_layer.register_forward_hook(lambda m, i, out: grabbed.append(out[:, :SPATIAL_CHANNELS]))
        try:
            feats, logits = self.net(x.contiguous())
        finally:
            hook.remove()
        spatial = grabbed[0].permute(0, 2, 3, 1).flatten(1)  # (B, 7, 17, 17) -> (B, 17 * 17 * 7), TF order
        return FeatureBatch(feats.float(), logits.float(), spatial.float())

    def forward(self, images: torch.Tensor) -> Features:
        """See ``FeatureExtractor.forward``."""
        batch = self.extract(images)
        return batch.features, batch.logits


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
        raise ValueError(f"eval.feature_extractor is '{kind}', expected one of: {', '.join(FEATURE_EXTRACTORS)}.")
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
        raise ValueError(f"eval.feature_extractor is '{kind}', expected one of: {', '.join(FEATURE_EXTRACTORS)}.")
