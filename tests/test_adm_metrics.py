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


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussian fits, from the formula with scipy's matrix square root."""
    from scipy.linalg import sqrtm

    a, b = a.astype(np.float64), b.astype(np.float64)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * sqrtm(sa @ sb).real))


def _reference(cfg, extractor, **kwargs):
    """The reference of an experiment config, as the sweep's inputs build it."""
    import bafm.eval.reference_stats as rs

    return rs.resolve_reference_stats(cfg.eval, cfg.data, extractor, seed=cfg.seed, **kwargs)


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
    assert got["fid"] == pytest.approx(_frechet(fake.numpy(), real.numpy()), rel=1e-9)
    assert got["sfid"] == pytest.approx(_frechet(fake_s.numpy(), real_s.numpy()), rel=1e-9)
    assert (got["precision"], got["recall"]) == _brute_force(fake.numpy(), real.numpy(), 3)

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


# --- Inception: spatial features and the weights download -------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    from factories import random_inception_weights

    return random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth")


def test_inception_spatial_features_are_mixed_6d_1x1_first_7_channels(inception_weights):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from bafm.eval.features import InceptionFeatures, to_uint8

    extractor = InceptionFeatures(inception_weights)
    images = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    batch = extractor.extract(images)
    assert batch.spatial.shape == (3, extractor.spatial_dim) == (3, 2023)
    feats, logits = extractor(images)
    torch.testing.assert_close(batch.features, feats, rtol=0, atol=0)
    torch.testing.assert_close(batch.logits, logits, rtol=0, atol=0)
    assert not extractor.spatial_layer._forward_hooks  # the hook lives for one pass only

    # Independently: torch-fidelity's network run by hand up to TF's mixed_6/conv.
    net = extractor.net
    with torch.no_grad():
        x = interpolate_bilinear_2d_like_tensorflow1x(to_uint8(images).float(), size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"):
            x = getattr(net, name)(x)
        branch = net.Mixed_6d.branch1x1(x)  # (B, 192, 17, 17)
    assert branch.shape == (3, 192, 17, 17)
    # TF's NHWC flattening: index (h * 17 + w) * 7 + c.
    torch.testing.assert_close(batch.spatial.view(3, 17, 17, 7), branch[:, :7].permute(0, 2, 3, 1))
    assert batch.spatial[1, (4 * 17 + 9) * 7 + 5] == branch[1, 5, 4, 9]
    assert batch.spatial.std(dim=0).mean() > 1e-3  # informative: varies with the image


def test_missing_inception_weights_are_fetched_or_fail_in_one_line(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    from bafm.eval.features import INCEPTION_WEIGHTS_FILE, resolve_inception_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    # Offline (the test suite's stand-in for torch-fidelity's download raises URLError).
    with pytest.raises(FileNotFoundError) as err:
        resolve_inception_weights("")
    message = str(err.value)
    assert "\n" not in message and str(cached) in message and "download failed" in message
    assert "network disabled in tests" in message and "eval.inception_weights=<path>" in message
    with pytest.raises(FileNotFoundError, match="downloading is off"):
        resolve_inception_weights("", download=False)

    # Online: torch-fidelity's loader fetches its release file into the hub cache, with a progress bar.
    calls = []

    def fake_download(url, progress=True, **kwargs):
        calls.append((url, progress))
        cached.parent.mkdir(parents=True)
        cached.write_bytes(b"weights")
        return {}

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", fake_download)
    assert resolve_inception_weights("") == cached
    assert calls == [(tf_inception.URL_INCEPTION_V3, True)]
    assert resolve_inception_weights("") == cached and len(calls) == 1  # cached now: no second download
    # A named file is never downloaded.
    with pytest.raises(FileNotFoundError, match="other.pth"):
        resolve_inception_weights(tmp_path / "other.pth")
    assert len(calls) == 1


# --- Reference sets: statistics, spatial statistics, precision/recall features, caching ---------


def _digits_cfg(tiny, tmp_path, *extra):
    from bafm.config import load_config

    from conftest import REPO_ROOT

    return load_config(REPO_ROOT / "experiments/digits.yaml",
                       [f"eval.classifier_path={tiny / 'classifier.safetensors'}", f"data.root={tmp_path / 'data'}",
                        *extra])


def test_digits_reference_keeps_all_real_features_and_caches_them(tiny, tmp_path, monkeypatch):
    import bafm.eval.reference_stats as rs
    from bafm.eval.features import build_feature_extractor

    cfg = _digits_cfg(tiny, tmp_path)
    extractor = build_feature_extractor("classifier", classifier_path=cfg.eval.classifier_path)
    ref = _reference(cfg, extractor)
    real = extractor(rs.digits_images01(cfg.data, cfg.seed))[0]
    assert ref.features.shape == (1797, extractor.feature_dim) and ref.spatial is None  # all digits < 10000
    torch.testing.assert_close(ref.features, real)
    np.testing.assert_allclose(ref.pool.mu, feature_statistics(real).mu, rtol=1e-10)
    cached, info = rs.load_reference(rs.cache_path(cfg.data))
    assert info["prc_size"] == 10000 and "mu_s" not in info["keys"]
    torch.testing.assert_close(cached.features, real)

    def no_compute(*args, **kwargs):
        raise AssertionError("recomputed a valid cache")

    with monkeypatch.context() as m:
        m.setattr(rs, "compute_reference", no_compute)
        torch.testing.assert_close(_reference(cfg, extractor).features, real)
        assert _reference(_digits_cfg(tiny, tmp_path, "eval.prc_reference_size=0"),
                                          extractor).features is None  # off: no features, cache still valid

    # A seeded subset when the reference set is larger than eval.prc_reference_size (recomputed: new size).
    small = _reference(_digits_cfg(tiny, tmp_path, "eval.prc_reference_size=100"), extractor)
    idx = rs.prc_subset(1797, 100)
    assert idx.tolist() == sorted(set(idx.tolist())) and len(idx) == 100 and idx.max() < 1797
    assert torch.equal(idx, rs.prc_subset(1797, 100)) and not torch.equal(idx, torch.arange(100))
    torch.testing.assert_close(small.features, real[idx])
    np.testing.assert_allclose(small.pool.mu, ref.pool.mu, rtol=1e-10)  # FID still uses every image

    # A cache written before precision/recall (mu/sigma only) is recomputed, not trusted.
    rs.save_stats(rs.cache_path(cfg.data), ref.pool, extractor=extractor.name, source=rs._source_of(cfg.eval, cfg.data))
    assert "prc_features" not in rs.load_reference(rs.cache_path(cfg.data))[1]["keys"]
    again = _reference(cfg, extractor)
    torch.testing.assert_close(again.features, real)
    assert "prc_features" in rs.load_reference(rs.cache_path(cfg.data))[1]["keys"]
    with pytest.raises(ValueError, match="eval.prc_reference_size is -1"):
        _reference(_digits_cfg(tiny, tmp_path, "eval.prc_reference_size=-1"), extractor)


def test_adm_reference_batch_with_inception(tiny, tmp_path, inception_weights):
    import bafm.eval.reference_stats as rs
    from bafm.eval.features import InceptionFeatures

    extractor = InceptionFeatures(inception_weights)
    images = np.random.default_rng(0).integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    pool = FeatureStats(np.arange(2048.0), np.eye(2048))
    spatial = FeatureStats(np.ones(2023), 2.0 * np.eye(2023))
    adm = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(adm, arr_0=images, mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    cfg = _digits_cfg(tiny, tmp_path, "eval.feature_extractor=inception", f"eval.reference_stats={adm}",
                      f"eval.inception_weights={inception_weights}", "eval.prc_reference_size=4")
    ref = _reference(cfg, extractor, batch_size=4)
    # FID and sFID statistics are ADM's, as given; precision/recall features come from its images.
    np.testing.assert_array_equal(ref.pool.mu, pool.mu)
    np.testing.assert_array_equal(ref.spatial.sigma, spatial.sigma)
    real = extractor(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0]
    torch.testing.assert_close(ref.features, real[rs.prc_subset(6, 4)], rtol=1e-5, atol=1e-5)
    assert rs.load_reference(rs.cache_path(cfg.data))[1]["source"] == str(adm)

    # Images only (no statistics): everything from the images, spatial statistics included.
    only = tmp_path / "images.npz"
    np.savez(only, arr_0=images)
    cfg = _digits_cfg(tiny, tmp_path, "eval.feature_extractor=inception", f"eval.reference_stats={only}",
                      f"eval.inception_weights={inception_weights}")
    ref = _reference(cfg, extractor, batch_size=4)
    batch = extractor.extract(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
    assert ref.features.shape == (6, 2048) and ref.spatial.dim == 2023
    np.testing.assert_allclose(ref.spatial.mu, feature_statistics(batch.spatial).mu, rtol=1e-5, atol=1e-6)

    # Statistics without images or features: FID and sFID only, and a warning that says so.
    np.savez(adm, mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    cfg = _digits_cfg(tiny, tmp_path, "eval.feature_extractor=inception", f"eval.reference_stats={adm}",
                      f"eval.inception_weights={inception_weights}")
    with pytest.warns(UserWarning, match="neither 'prc_features' nor 'arr_0'.*left blank"):
        ref = _reference(cfg, extractor)
    assert ref.features is None and ref.spatial.dim == 2023

    # Spatial statistics of the wrong size do not pass silently.
    np.savez(adm, arr_0=images, mu=pool.mu, sigma=pool.sigma, mu_s=np.zeros(5), sigma_s=np.eye(5))
    cfg = _digits_cfg(tiny, tmp_path, "eval.feature_extractor=inception", f"eval.reference_stats={adm}",
                      f"eval.inception_weights={inception_weights}", "eval.prc_reference_size=0")
    with pytest.raises(ValueError, match=r"spatial statistics \(mu_s, sigma_s\) have dimension 5.*2023"):
        _reference(cfg, extractor)
