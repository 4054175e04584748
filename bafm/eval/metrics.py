"""Sample-quality metrics as pure functions over cached statistics.

FID compares Gaussian fits (mean, covariance) of feature vectors; IS reads class logits. The
formulas are torch-fidelity's (``fid_statistics_to_metric``, ``isc_features_to_metric``), so the
numbers match the usual ImageNet tables; this module only fixes dtypes, shapes and edge cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian fit of a feature distribution.

    Attributes:
        mu: mean, float64 ``(D,)``.
        sigma: unbiased covariance, float64 ``(D, D)``.
        n: number of feature vectors behind the fit (0 when unknown, e.g. ADM reference files).
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int = 0

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(
                f"feature statistics need mu of shape (D,) and sigma of shape (D, D), "
                f"got mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)}."
            )
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return int(self.mu.shape[0])


def feature_statistics(features: torch.Tensor) -> FeatureStats:
    """Fit a Gaussian to feature vectors.

    Args:
        features: ``(N, D)`` features, ``N >= 2``.

    Returns:
        Mean and unbiased covariance in float64.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}.")
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {features.shape[0]}.")
    f = features.detach().to("cpu", torch.float64).numpy()
    return FeatureStats(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), n=int(f.shape[0]))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two Gaussians (FID when the features are Inception pool features).

    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, evaluated by torch-fidelity in
    float64.

    Args:
        a: statistics of the first set, e.g. generated samples.
        b: statistics of the second set, e.g. the reference data.

    Returns:
        The distance (non-negative up to round-off).
    """
    if a.dim != b.dim:
        raise ValueError(
            f"feature statistics have different dimensions ({a.dim} vs {b.dim}): were they computed "
            "with the same feature extractor?"
        )
    out = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, verbose=False)
    return float(out[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = 10) -> Tuple[float, float]:
    """Inception score ``exp(E_x KL(p(y|x) || p(y)))`` from class logits, averaged over splits.

    The samples are shuffled with torch-fidelity's fixed seed before splitting, as in its
    ``calculate_metrics``; ``splits`` is capped at the number of samples.

    Args:
        logits: ``(N, K)`` unnormalised class scores.
        splits: number of disjoint chunks the score is computed on.

    Returns:
        ``(mean, std)`` of the per-split scores.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}.")
    if logits.shape[0] == 0:
        raise ValueError("the inception score needs at least one sample.")
    splits = max(1, min(int(splits), int(logits.shape[0])))
    out = isc_features_to_metric(logits.detach().to("cpu", torch.float64), splits=splits)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])
