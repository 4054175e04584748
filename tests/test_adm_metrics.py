"""Precision/recall (k-NN manifolds) and the reference metrics of a sweep row, on known answers."""

import math

import numpy as np
import pytest
import torch

from bafm.eval.metrics import (
    FeatureStats,
    ReferenceStats,
    feature_statistics,
    frechet_distance,
    precision_recall,
    reference_metrics,
)


def _line(*values: float) -> torch.Tensor:
    """Points on a line as ``(N, 1)`` features (exact in float32: the distances are too)."""
    return torch.tensor(values, dtype=torch.float32)[:, None]


def _brute_force(gen: np.ndarray, real: np.ndarray, k: int) -> tuple:
    """The definition, literally: inside some ball of the other set's k-NN radii."""

    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(points, centres):
        d = np.linalg.norm(points[:, None] - centres[None], axis=-1)
        return (d <= radii(centres)[None]).any(axis=1).mean()

    return inside(gen, real), inside(real, gen)


def test_identical_sets_score_one_and_far_sets_zero():
    real = torch.randn(60, 5, generator=torch.Generator().manual_seed(0))
    assert precision_recall(real.clone(), real) == (1.0, 1.0)
    assert precision_recall(real + 100.0, real) == (0.0, 0.0)


def test_hand_computed_fractions_on_a_line():
    # Real points 0..9: k = 3 radii are 3 at the ends, 2 inside, so the real manifold is [-3, 12].
    real = _line(*range(10))
    # Generated: a cluster inside it and six points far away -> precision 4/10. The cluster's
    # radii (1.75, 1.25, 1, 1.75) cover [2.25, 7.5], which holds the real 3, 4, 5, 6, 7 -> recall 5/10.
    gen = _line(4.0, 4.5, 5.0, 5.75, 40.0, 41.0, 42.0, 43.0, 44.0, 45.0)
    assert precision_recall(gen, real) == (0.4, 0.5)
    # The roles swap with the arguments.
    assert precision_recall(real, gen) == (0.5, 0.4)
    # k = 1: real radii are 1 and the cluster's 0.5, 0.5, 0.5, 0.75 cover [3.5, 6.5] -> reals 4, 5, 6.
    assert precision_recall(gen, real, neighborhood=1) == (0.4, 0.3)


def test_matches_the_definition_on_random_features():
    gen_ = torch.Generator().manual_seed(1)
    real = torch.randn(300, 8, generator=gen_, dtype=torch.float64)
    fake = 0.7 * torch.randn(200, 8, generator=gen_, dtype=torch.float64) + 0.4
    expected = _brute_force(fake.numpy(), real.numpy(), 3)
    got = precision_recall(fake, real, batch_size=64)  # several blocks of the distance matrix
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0  # a case where neither is trivial


def test_precision_recall_rejects_bad_input():
    with pytest.raises(ValueError, match=r"more than 3 generated feature vectors, got 3"):
        precision_recall(torch.zeros(3, 2), torch.randn(10, 2))
    with pytest.raises(ValueError, match=r"real features must be \(N, D\)"):
        precision_recall(torch.randn(10, 2), torch.zeros(10))
    with pytest.raises(ValueError, match=r"different dimensions \(2 vs 3\)"):
        precision_recall(torch.randn(10, 2), torch.randn(10, 3))


def test_reference_metrics_row_values():
    gen_ = torch.Generator().manual_seed(2)
    real, fake = torch.randn(40, 3, generator=gen_), torch.randn(30, 3, generator=gen_) + 0.5
    real_s, fake_s = torch.randn(40, 6, generator=gen_), torch.randn(30, 6, generator=gen_)
    ref = ReferenceStats(pool=feature_statistics(real), spatial=feature_statistics(real_s), features=real)
    got = reference_metrics(fake, ref, spatial=fake_s)
    assert got["fid"] == frechet_distance(feature_statistics(fake), ref.pool)
    assert got["sfid"] == frechet_distance(feature_statistics(fake_s), ref.spatial)
    assert (got["precision"], got["recall"]) == precision_recall(fake, real)

    # Plain statistics (FID only): the other metrics have no inputs and are None (blank cells).
    only_fid = reference_metrics(fake, ref.pool, spatial=fake_s)
    assert only_fid == {"fid": got["fid"], "sfid": None, "precision": None, "recall": None}
    # An extractor without spatial features: no sFID even if the reference has statistics for it.
    assert reference_metrics(fake, ref)["sfid"] is None
    # Inputs present but too few samples: NaN.
    few = reference_metrics(fake[:3], ref, spatial=fake_s[:3])
    assert all(math.isnan(few[k]) for k in ("precision", "recall")) and few["fid"] >= 0.0
    one = reference_metrics(fake[:1], ref, spatial=fake_s[:1])
    assert math.isnan(one["fid"]) and math.isnan(one["sfid"])
    none = reference_metrics(fake, None)
    assert math.isnan(none["fid"]) and none["sfid"] is None and none["precision"] is None
    with pytest.raises(ValueError, match=r"reference features must be \(M, 3\)"):
        ReferenceStats(pool=FeatureStats(np.zeros(3), np.eye(3)), features=torch.zeros(5, 4))
