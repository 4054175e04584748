"""FID and IS against closed forms; reference statistics files (save/load, ADM layout)."""

import math

import numpy as np
import pytest
import torch

from bafm.eval.metrics import FeatureStats, feature_statistics, frechet_distance, inception_score
from bafm.eval.reference_stats import iter_npz_images, load_stats, npz_has_stats, save_stats


def _diag_stats(mu: torch.Tensor, var: torch.Tensor) -> FeatureStats:
    return FeatureStats(mu=mu.numpy(), sigma=np.diag(var.numpy()))


def test_frechet_diagonal_gaussians_closed_form():
    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    s1 = 0.1 + torch.rand(6, generator=gen, dtype=torch.float64)
    s2 = 0.1 + 3.0 * torch.rand(6, generator=gen, dtype=torch.float64)
    expected = float((mu1 - mu2).square().sum() + (s1 + s2 - 2.0 * (s1 * s2).sqrt()).sum())
    got = frechet_distance(_diag_stats(mu1, s1), _diag_stats(mu2, s2))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_frechet_equal_full_covariances_is_mean_distance():
    # S1 = S2 = S: tr(S + S - 2 (S S)^(1/2)) = 0, only the mean term remains.
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    sigma = (a @ a.T + 0.5 * torch.eye(5, dtype=torch.float64)).numpy()
    mu1, mu2 = np.arange(5.0), np.arange(5.0) + np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    got = frechet_distance(FeatureStats(mu1, sigma), FeatureStats(mu2, sigma))
    assert got == pytest.approx(1.0 + 4.0 + 0.25, rel=1e-8)
    assert frechet_distance(FeatureStats(mu1, sigma), FeatureStats(mu1, sigma)) == pytest.approx(0.0, abs=1e-8)


def test_feature_statistics_match_numpy_and_reject_bad_shapes():
    feats = torch.randn(50, 4, generator=torch.Generator().manual_seed(2))
    stats = feature_statistics(feats)
    ref = feats.double().numpy()
    np.testing.assert_allclose(stats.mu, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(ref, rowvar=False), rtol=1e-12)
    assert stats.n == 50 and stats.dim == 4
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        feature_statistics(torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(stats, FeatureStats(np.zeros(3), np.eye(3)))


def test_inception_score_uniform_confident_classes_is_k():
    k, per_class = 7, 30
    labels = torch.arange(k * per_class) % k
    logits = 60.0 * torch.nn.functional.one_hot(labels, k).double()  # p(y|x) one-hot up to e^-60
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(k, rel=1e-9)
    assert std == 0.0


def test_inception_score_two_class_closed_form_and_trivial_case():
    # Half the samples p = (a, 1 - a), half (1 - a, a): marginal (1/2, 1/2),
    # IS = exp(a log 2a + (1 - a) log 2(1 - a)).
    a = 0.8
    row = torch.tensor([math.log(a), math.log(1.0 - a)], dtype=torch.float64)
    logits = torch.cat([row.expand(40, 2), row.flip(0).expand(40, 2)])
    expected = math.exp(a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)))
    assert inception_score(logits, splits=1)[0] == pytest.approx(expected, rel=1e-12)
    # Identical predictions: p(y|x) = p(y), KL = 0, IS = 1 in every split.
    same = torch.randn(1, 5).expand(64, 5)
    mean, std = inception_score(same, splits=10)
    assert mean == pytest.approx(1.0, abs=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    # More splits than samples is capped at one sample per split instead of failing: each split's
    # marginal is its only prediction, KL = 0 and IS = 1; the same two confident, distinct
    # predictions in one split score 2.
    two = 60.0 * torch.eye(2, dtype=torch.float64)
    assert inception_score(two, splits=10) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert inception_score(two, splits=1)[0] == pytest.approx(2.0, rel=1e-12)


def test_stats_round_trip_and_adm_layout(tmp_path):
    stats = feature_statistics(torch.randn(20, 3, generator=torch.Generator().manual_seed(3)))
    path = save_stats(tmp_path / "ref.npz", stats, extractor="tiny", source="unit")
    loaded, info = load_stats(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.n == 20 and info == {"extractor": "tiny", "source": "unit"}
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary behind

    # ADM reference batch: mu/sigma (pool features) plus arr_0 images, no provenance keys.
    adm = tmp_path / "VIRTUAL_tiny.npz"
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    np.savez(adm, arr_0=images, mu=stats.mu.astype(np.float32), sigma=stats.sigma.astype(np.float32))
    assert npz_has_stats(adm)
    loaded, info = load_stats(adm)
    assert loaded.mu.dtype == np.float64 and info == {"extractor": "", "source": ""}
    batches = list(iter_npz_images(adm, batch_size=2))
    assert [b.shape for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    torch.testing.assert_close(batches[0][1], torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255.0)

    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="no mu and sigma"):
        load_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_stats(tmp_path / "missing.npz")


def test_inception_features_load_local_weights_only(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe_mod

    from bafm.eval.features import InceptionFeatures, to_uint8

    # A randomly initialised inception-v3-compat state dict stands in for the real weights file.
    with monkeypatch.context() as m:
        m.setattr(fe_mod, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe_mod.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = fe_mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(fe_mod, "load_state_dict_from_url", no_network)
    extractor = InceptionFeatures(weights)
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    feats, logits = extractor(images)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    # Grey images are fed as RGB uint8 (rounded), exactly as torch-fidelity expects them.
    ref_feats, ref_logits = extractor.net(to_uint8(images).expand(-1, 3, -1, -1).contiguous())
    torch.testing.assert_close(feats, ref_feats)
    torch.testing.assert_close(logits, ref_logits)

    # A named file is never downloaded (the hub cache's download: test_adm_metrics).
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        InceptionFeatures(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        InceptionFeatures(tmp_path / "junk.pth")


def test_to_uint8_rounds():
    from bafm.eval.features import to_uint8

    x = torch.tensor([0.0, 0.5 / 255, 0.49 / 255, 1.0, 1.5, -0.2])
    assert to_uint8(x).tolist() == [0, 1, 0, 255, 255, 0]
