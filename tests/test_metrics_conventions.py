"""eval.metrics_convention: ADM's precision/recall and IS against the rules of its evaluator, restated in NumPy."""

import numpy as np
import pytest
import torch

from bafm.config import ConfigError, load_config
from bafm.eval.inputs import sweep_settings
from bafm.eval.metrics import inception_score, precision_recall, reference_metrics, FeatureStats, ReferenceStats


def _fp16_squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ADM's rule: both sides in half precision, |a|^2 - 2 a.b + |b|^2 formed in half precision, floored at 0.

    Sums of products are taken at single precision and stored at half precision, as a half GEMM
    with single accumulation does; a result that overflows half precision means single precision.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        a16, b16 = a.astype(np.float16), b.astype(np.float16)
        sq_a = (a16.astype(np.float32) ** 2).sum(axis=1).astype(np.float16)
        sq_b = (b16.astype(np.float32) ** 2).sum(axis=1).astype(np.float16)
        cross = (a16.astype(np.float32) @ b16.astype(np.float32).T).astype(np.float16)
        d = np.maximum((sq_a[:, None] - np.float16(2) * cross) + sq_b[None, :], np.float16(0))
    if np.isfinite(d).all():
        return d.astype(np.float32)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    return np.maximum((a32 ** 2).sum(1)[:, None] - 2 * a32 @ b32.T + (b32 ** 2).sum(1)[None, :], 0)


def _adm_precision_recall(gen: np.ndarray, real: np.ndarray, k: int = 3) -> tuple:
    """Radius of a point: k-th smallest rounded squared distance within its own set (itself being the 0th).
    A point is covered when its rounded squared distance to some point of the other set is at most
    that point's radius; distances between the sets are formed with the real features first."""
    real_radius = np.partition(_fp16_squared_distances(real, real), k, axis=1)[:, k]
    gen_radius = np.partition(_fp16_squared_distances(gen, gen), k, axis=1)[:, k]
    cross = _fp16_squared_distances(real, gen)  # (M, N)
    precision = (cross <= real_radius[:, None]).any(axis=0).mean()
    recall = (cross <= gen_radius[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def _adm_inception_score(logits: np.ndarray, chunk: int = 5000) -> float:
    """Mean over consecutive, unshuffled chunks of ``chunk`` samples of exp(mean KL(p(y|x) || p(y)))."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    scores = []
    for start in range(0, len(p), chunk):
        part = p[start : start + chunk]
        kl = (part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _inception_like(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Non-negative features with a few large entries, like Inception pool features."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(0.3 + shift, 0.6, size=(n, dim)), 0.0).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adm_precision_recall_follows_its_evaluator_rules(seed):
    real, gen = _inception_like(400, 256, seed), _inception_like(300, 256, seed + 10, shift=0.05)
    expected = _adm_precision_recall(gen, real)
    got = precision_recall(torch.from_numpy(gen), torch.from_numpy(real), convention="adm")
    assert got == expected


def test_the_conventions_differ_where_float16_rounding_decides():
    # Large norms: float16 keeps ~3 significant digits of |u|^2 ~ 1e4, so near-ties flip.
    real, gen = _inception_like(300, 64, 5, shift=3.0), _inception_like(300, 64, 6, shift=3.05)
    adm = precision_recall(torch.from_numpy(gen), torch.from_numpy(real), convention="adm")
    fidelity = precision_recall(torch.from_numpy(gen), torch.from_numpy(real))
    assert adm == _adm_precision_recall(gen, real)
    assert adm != fidelity


def test_adm_blocks_that_overflow_float16_fall_back_to_float32():
    real = _inception_like(40, 8, 3) * 400.0  # squared norms far above float16's 65504
    gen = _inception_like(30, 8, 4) * 400.0
    adm = precision_recall(torch.from_numpy(gen), torch.from_numpy(real), convention="adm")
    assert adm == _adm_precision_recall(gen, real)
    assert adm == precision_recall(torch.from_numpy(gen).double(), torch.from_numpy(real).double())


def test_adm_inception_score_uses_consecutive_chunks_of_5000():
    rng = np.random.default_rng(0)
    # Two halves of different sharpness: the split membership changes the score.
    logits = np.concatenate([rng.normal(0, 4.0, (6000, 50)), rng.normal(0, 0.5, (6000, 50))])
    adm_mean, adm_std = inception_score(torch.from_numpy(logits), convention="adm")
    assert adm_mean == pytest.approx(_adm_inception_score(logits), rel=1e-12)
    assert adm_std > 0.0  # three chunks (5000, 5000, 2000) with different scores
    fidelity_mean, _ = inception_score(torch.from_numpy(logits), splits=10)
    assert abs(adm_mean - fidelity_mean) > 0.05 * fidelity_mean
    # Fewer than 5000 samples: one chunk, whatever eval.is_splits says.
    small = logits[:1200]
    assert inception_score(torch.from_numpy(small), splits=4, convention="adm") == (
        pytest.approx(_adm_inception_score(small), rel=1e-12), 0.0)


def test_fid_is_the_same_under_both_conventions():
    feats = torch.from_numpy(_inception_like(64, 6, 7))
    real = torch.from_numpy(_inception_like(80, 6, 8))
    pool = FeatureStats(real.double().mean(0).numpy(), np.cov(real.double().numpy(), rowvar=False))
    stats = ReferenceStats(pool=pool, features=real)
    adm = reference_metrics(feats, stats, convention="adm")
    fidelity = reference_metrics(feats, stats)
    assert adm["fid"] == fidelity["fid"]
    assert (adm["precision"], adm["recall"]) == _adm_precision_recall(feats.numpy(), real.numpy())


def test_the_convention_is_a_checked_config_choice_and_imagenet_uses_adm(repo_root):
    with pytest.raises(ConfigError, match="'eval.metrics_convention' is 'tf', expected one of: torch-fidelity, adm"):
        load_config(None, ["eval.metrics_convention=tf"])
    for name, convention in (("digits", "torch-fidelity"), ("imagenet256_sit_xl2", "adm"),
                             ("imagenet512_sit_xl2", "adm")):
        cfg = load_config(repo_root / "experiments" / f"{name}.yaml")
        assert sweep_settings(cfg).metrics_convention == convention
    with pytest.raises(ValueError, match="metrics convention is 'tf', expected one of: torch-fidelity, adm"):
        inception_score(torch.zeros(4, 3), convention="tf")
