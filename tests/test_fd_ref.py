"""``fd_ref``: the Fréchet distance of a sweep row's samples to the reference samples from the same noises."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from bafm.eval.metrics import fd_to_reference, feature_statistics, frechet_distance
from bafm.eval.report import sweep_layout
from bafm.solvers.ground_truth import Reference
from test_eval_engine import _sweep, decode, TinyFeatures, flow, ref_stats  # noqa: F401  (fixtures)


def test_fd_ref_is_zero_for_identical_sets_and_the_frechet_distance_of_their_statistics():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64)
    assert fd_to_reference(a, a.clone()) == pytest.approx(0.0, abs=1e-9)
    b = a + 0.3 * torch.randn(500, 6, generator=g, dtype=torch.float64) + 0.1
    # Independent value: the Fréchet distance of two Gaussians written out with NumPy/SciPy.
    from scipy import linalg

    x, y = a.numpy(), b.numpy()
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))
    assert fd_to_reference(b, a) == pytest.approx(expected, rel=1e-6)
    assert fd_to_reference(b, a) == pytest.approx(frechet_distance(feature_statistics(b), feature_statistics(a)))
    with pytest.raises(ValueError, match="same samples"):
        fd_to_reference(a[:10], a)


def test_fd_ref_grows_with_a_known_perturbation():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(800, 5, generator=g, dtype=torch.float64)
    direction = torch.randn(800, 5, generator=g, dtype=torch.float64)
    values = [fd_to_reference(ref + eps * direction + eps, ref) for eps in (0.01, 0.03, 0.1, 0.3)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    # Small perturbations: the distance is quadratic in their size (a 3x larger one costs ~9x).
    assert 7.0 < values[1] / values[0] < 11.0


def test_sweep_rows_carry_fd_ref_ordered_by_accuracy(flow, ref_stats):  # noqa: F811
    rows, _ = _sweep(flow, None, ref_stats, solvers=["euler"], budgets={"euler": [2, 4, 16]}, num_samples=64,
                     reference=Reference(rtol=1e-7, atol=1e-7))
    ref, euler = rows[0], rows[1:]
    assert ref["solver"] == "reference" and ref["fd_ref"] == 0.0
    values = [r["fd_ref"] for r in euler]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] > 0.0


def test_sweep_layout_puts_every_solver_of_a_metric_on_one_chart(flow, ref_stats):  # noqa: F811
    rows, _ = _sweep(flow, None, ref_stats, solvers=["euler", "heun"], budgets={"euler": [2, 4], "heun": [4]})
    layout = sweep_layout(rows, prefix="nfe_sweep")
    (charts,) = layout.values()
    assert {"FD to the reference samples vs NFE", "trajectory RMSE vs NFE", "FID vs NFE"} <= set(charts)
    assert "sFID vs NFE" not in charts  # this extractor has no spatial features
    kind, (pattern,) = charts["FD to the reference samples vs NFE"]
    assert kind == "Multiline"
    tags = [f"nfe_sweep/fd_ref/{s}" for s in ("reference", "euler", "heun")] + ["nfe_sweep/fid/euler"]
    assert [t for t in tags if re.search(pattern, t)] == tags[:3]


def test_one_tensorboard_run_per_solver_shares_each_metric_tag(flow, ref_stats, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bafm.eval.report import log_solver_runs

    rows, _ = _sweep(flow, None, ref_stats, solvers=["euler", "heun"], budgets={"euler": [2, 4], "heun": [4]})
    runs = log_solver_runs(tmp_path, rows)
    assert [r.name for r in runs] == ["reference", "euler", "heun"]
    euler = EventAccumulator(str(tmp_path / "euler")).Reload()
    points = euler.Scalars("nfe_sweep/fd_ref")
    assert [e.step for e in points] == [2, 4]
    assert [e.value for e in points] == pytest.approx([rows[1]["fd_ref"], rows[2]["fd_ref"]], rel=1e-6)
    assert "nfe_sweep/fd_ref" in EventAccumulator(str(tmp_path / "heun")).Reload().Tags()["scalars"]
