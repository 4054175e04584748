"""Sample-quality metrics as pure functions over cached statistics and features.

The ADM evaluation suite's set: FID and sFID compare Gaussian fits (mean, covariance) of
feature vectors (pool features, resp. spatial features); IS reads class logits; precision and
recall compare k-nearest-neighbour manifolds (k = 3) of generated and real features. The
formulas are torch-fidelity's (``fid_statistics_to_metric``, ``isc_features_to_metric``,
``prc_features_to_metric``), so the numbers match the usual ImageNet tables; this module only
fixes dtypes, shapes and edge cases. ``convention="adm"`` computes precision/recall and IS as
the ADM evaluation suite does instead (``bafm.eval.metrics_adm``): float16 distances and
consecutive IS chunks of 5000 samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from bafm.eval.metrics_adm import inception_score_adm, precision_recall_adm

PRC_NEIGHBORHOOD = 3  # k of the k-NN manifolds, as in the ADM suite and torch-fidelity
# eval.metrics_convention -> how precision/recall and IS are computed (README, "Metric conventions").
METRICS_CONVENTIONS = {
    "torch-fidelity": "float32 distances; IS on N/splits shuffled chunks (torch-fidelity's seed 2020)",
    "adm": "float16 distances; IS on consecutive chunks of 5000 (guided-diffusion's evaluator)",
}


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


def fd_to_reference(features: torch.Tensor, reference_features: torch.Tensor) -> float:
    """``fd_ref``: Fréchet distance between a solver's features and the reference solver's.

    Both sets come from the same noises and labels, row for row, so the sampling noise of two
    independent draws (which swamps FID where the backbone sits at its noise floor) is shared
    and what remains is the solver's error in distribution.

    Args:
        features: the solver's samples' features ``(N, D)``.
        reference_features: the reference samples' features ``(N, D)``, same rows.

    Returns:
        ``frechet_distance`` of the two sets' statistics (0 for identical sets).

    Raises:
        ValueError: the two sets differ in shape.
    """
    if features.shape != reference_features.shape:
        raise ValueError(
            f"fd_ref needs the reference's features for the same samples: got {tuple(features.shape)} and "
            f"{tuple(reference_features.shape)}"
        )
    return frechet_distance(feature_statistics(features), feature_statistics(reference_features))


def inception_score(logits: torch.Tensor, splits: int = 10, convention: str = "torch-fidelity") -> Tuple[float, float]:
    """Inception score ``exp(E_x KL(p(y|x) || p(y)))`` from class logits, averaged over splits.

    torch-fidelity: the samples are shuffled with its fixed seed before splitting, as in its
    ``calculate_metrics``; ``splits`` is capped at the number of samples. ADM: consecutive chunks
    of 5000 samples in their order (``splits`` is not used).

    Args:
        logits: ``(N, K)`` unnormalised class scores, in sample order.
        splits: number of disjoint chunks the score is computed on (torch-fidelity).
        convention: a key of ``METRICS_CONVENTIONS``.

    Returns:
        ``(mean, std)`` of the per-split scores.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}.")
    if logits.shape[0] == 0:
        raise ValueError("the inception score needs at least one sample.")
    if _convention(convention) == "adm":
        return inception_score_adm(logits)
    splits = max(1, min(int(splits), int(logits.shape[0])))
    out = isc_features_to_metric(logits.detach().to("cpu", torch.float64), splits=splits)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def precision_recall(
    generated: torch.Tensor,
    real: torch.Tensor,
    *,
    neighborhood: int = PRC_NEIGHBORHOOD,
    batch_size: int = 10000,
    device: torch.device | str | None = None,
    convention: str = "torch-fidelity",
) -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) from k-NN manifolds.

    Each set's manifold is the union of balls around its points, the radius of a ball being the
    distance to the point's k-th nearest neighbour in its own set. Precision is the fraction of
    generated points inside the real manifold (fidelity), recall the fraction of real points
    inside the generated manifold (coverage); a point on a ball's boundary counts as inside.
    Computed by torch-fidelity's ``prc_features_to_metric`` in its memory-saving mode (at most
    ``batch_size`` rows of a distance matrix at a time), or with ADM's float16 squared distances
    (``convention="adm"``, ``bafm.eval.metrics_adm``).

    Args:
        generated: ``(N, D)`` features of generated samples, ``N > neighborhood``.
        real: ``(M, D)`` features of real samples, ``M > neighborhood``.
        neighborhood: k.
        batch_size: rows per block of pairwise distances.
        device: where the distances are computed (default: where ``generated`` is).
        convention: a key of ``METRICS_CONVENTIONS``.

    Returns:
        ``(precision, recall)``: exact fractions ``count / N`` and ``count / M``.
    """
    for name, f in (("generated", generated), ("real", real)):
        if f.dim() != 2:
            raise ValueError(f"{name} features must be (N, D), got shape {tuple(f.shape)}.")
        if f.shape[0] <= neighborhood:
            raise ValueError(f"precision/recall with k = {neighborhood} need more than {neighborhood} "
                             f"{name} feature vectors, got {f.shape[0]}.")
    if generated.shape[1] != real.shape[1]:
        raise ValueError(f"generated and real features have different dimensions ({generated.shape[1]} vs "
                         f"{real.shape[1]}): were they computed with the same feature extractor?")
    device = torch.device(device) if device is not None else generated.device
    if _convention(convention) == "adm":
        return precision_recall_adm(generated, real, neighborhood=int(neighborhood), device=device)
    dtype = torch.promote_types(torch.promote_types(generated.dtype, real.dtype), torch.float32)
    out = prc_features_to_metric(
        generated.detach().to(device, dtype), real.detach().to(device, dtype),
        prc_neighborhood=int(neighborhood), prc_batch_size=int(batch_size), save_cpu_ram=True, verbose=False,
    )
    # torch-fidelity averages in float32; the exact fractions are counts over N and M.
    n, m = int(generated.shape[0]), int(real.shape[0])
    return round(out[KEY_METRIC_PRECISION] * n) / n, round(out[KEY_METRIC_RECALL] * m) / m


@dataclass(frozen=True)
class ReferenceStats:
    """What generated samples are compared with.

    Attributes:
        pool: statistics of the extractor's main features (FID).
        spatial: statistics of its spatial features (sFID; Inception only), or None.
        features: ``(M, D)`` real feature vectors for precision/recall (a fixed subset of the
            reference set), or None when not available.
    """

    pool: FeatureStats
    spatial: Optional[FeatureStats] = None
    features: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.features is not None and (self.features.dim() != 2 or self.features.shape[1] != self.pool.dim):
            raise ValueError(f"reference features must be (M, {self.pool.dim}) like the statistics, "
                             f"got shape {tuple(self.features.shape)}.")

    @property
    def dim(self) -> int:
        """Feature dimension ``D`` of ``pool``."""
        return self.pool.dim


def as_reference(reference: FeatureStats | ReferenceStats | None) -> Optional[ReferenceStats]:
    """Plain ``FeatureStats`` (FID only) as a ``ReferenceStats``; None stays None."""
    if reference is None or isinstance(reference, ReferenceStats):
        return reference
    return ReferenceStats(pool=reference)


def reference_metrics(
    features: torch.Tensor,
    reference: FeatureStats | ReferenceStats | None,
    *,
    spatial: Optional[torch.Tensor] = None,
    neighborhood: int = PRC_NEIGHBORHOOD,
    device: torch.device | str | None = None,
    convention: str = "torch-fidelity",
) -> Dict[str, Optional[float]]:
    """``fid``, ``sfid``, ``precision`` and ``recall`` of generated features against a reference.

    A metric whose inputs this extractor or reference does not provide (``sfid`` without
    spatial features on both sides, precision/recall without real feature vectors) is None;
    one that has its inputs but too few samples is NaN; so is ``fid`` without a reference.

    Args:
        features: ``(N, D)`` generated features.
        reference: the real data's statistics (and features).
        spatial: ``(N, S)`` generated spatial features, or None.
        neighborhood: k of precision/recall.
        device: where the pairwise distances of precision/recall are computed.
        convention: how precision/recall are computed (a key of ``METRICS_CONVENTIONS``).

    Returns:
        ``{"fid", "sfid", "precision", "recall"}`` -> float, NaN or None.
    """
    ref = as_reference(reference)
    out: Dict[str, Optional[float]] = {"fid": math.nan, "sfid": None, "precision": None, "recall": None}
    if ref is None:
        return out
    n = int(features.shape[0])
    if n >= 2:
        out["fid"] = frechet_distance(feature_statistics(features), ref.pool)
    if spatial is not None and ref.spatial is not None:
        out["sfid"] = frechet_distance(feature_statistics(spatial), ref.spatial) if n >= 2 else math.nan
    if ref.features is not None:
        if n > neighborhood and ref.features.shape[0] > neighborhood:
            out["precision"], out["recall"] = precision_recall(features, ref.features, neighborhood=neighborhood,
                                                               device=device, convention=convention)
        else:
            out["precision"] = out["recall"] = math.nan
    return out


def _convention(name: str) -> str:
    if name not in METRICS_CONVENTIONS:
        raise ValueError(f"metrics convention is '{name}', expected one of: {', '.join(METRICS_CONVENTIONS)}.")
    return name
