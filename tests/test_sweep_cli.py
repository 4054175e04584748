"""``bafm eval-nfe-sweep`` end to end on tiny models, and its input checks."""

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bafm.cli import main
from bafm.eval.report import read_csv
from factories import tiny_model_overrides






def _is_fraction(value: float, n: int) -> bool:
    """``value`` is ``k / n`` for an integer ``0 <= k <= n`` (up to the CSV's 8 digits)."""
    return 0.0 <= value <= 1.0 and abs(value * n - round(value * n)) < 1e-5


def _args(repo_root, tiny, tmp_path, *extra):
    return [
        "eval-nfe-sweep", "--config", str(repo_root / "experiments/digits.yaml"), "--out", str(tmp_path / "out"),
        *tiny_model_overrides(tiny, tmp_path), "eval.num_samples=20", "eval.batch_size=8",
        "eval.reference_batch_size=10",
        "eval.reference_rtol=1e-3", "eval.reference_atol=1e-3", "eval.grid_images=9", "eval.device=cpu",
        "eval.solvers=[ba,euler]", "eval.budgets={ba: [3], euler: [2, 4]}", *extra,
    ]


def test_cli_writes_every_output(repo_root, tiny, tmp_path, capsys):
    assert main(_args(repo_root, tiny, tmp_path, "eval.save_npz=true")) == 0
    out = tmp_path / "out"
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header == "solver,grid,tol,nfe,flops,steps,fid,fd_ref,sfid,is,precision,recall,traj_rmse,seconds,n_samples"
    rows = read_csv(out / "results.csv")
    assert [(r["solver"], r["nfe"], r["steps"]) for r in rows[1:]] == [("ba", 3, 3), ("euler", 2, 2), ("euler", 4, 4)]
    assert rows[0]["solver"] == "reference" and rows[0]["traj_rmse"] == 0.0
    for r in rows:
        assert r["n_samples"] == 20 and r["fid"] >= 0.0 and r["is"] >= 1.0
        # Precision/recall against all real digits, as fractions of 20 samples and 1797 digits; no sFID.
        assert r["sfid"] is None and 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
        assert _is_fraction(r["precision"], 20) and _is_fraction(r["recall"], 1797)
    assert all(r["traj_rmse"] > 0.0 for r in rows[1:])
    printed = capsys.readouterr().out
    assert (out / "results.md").read_text() in printed
    for plot in ("fid_vs_nfe.png", "fd_ref_vs_nfe.png", "traj_rmse_vs_nfe.png", "traj_rmse_vs_flops.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert rows[0]["fd_ref"] == 0.0 and all(r["fd_ref"] > 0.0 for r in rows[1:])
    assert len(list((out / "grids").glob("*.png"))) == 4
    # TensorBoard holds the CSV's numbers: one curve per solver and metric, step = NFE.
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    fid_euler = events.Scalars("nfe_sweep/fid/euler")
    assert [e.step for e in fid_euler] == [2, 4]
    assert [e.value for e in fid_euler] == pytest.approx([rows[2]["fid"], rows[3]["fid"]], rel=1e-6)
    assert [e.value for e in events.Scalars("nfe_sweep/traj_rmse/ba")] == pytest.approx([rows[1]["traj_rmse"]], rel=1e-6)
    assert [e.value for e in events.Scalars("nfe_sweep/precision/ba")] == pytest.approx([rows[1]["precision"]], rel=1e-6)
    assert not [t for t in events.Tags()["scalars"] if "/sfid/" in t]  # blank for the classifier: not logged
    arr = np.load(out / "samples" / "euler_nfe004.npz")["arr_0"]
    assert arr.shape == (20, 8, 8, 1) and arr.dtype == np.uint8
    assert (tmp_path / "data" / "digits8" / "reference_stats.npz").is_file()  # cached for the next run
    assert not list(out.rglob("*.tmp"))


def test_cli_bad_input_fails_before_work(repo_root, tiny, tmp_path, capsys):
    cases = [
        (["eval.solvers=[eular]"], ["unknown solver 'eular'", "euler", "dpm++2m"]),
        (["eval.solvers=[heun]", "eval.budgets={heun: [7]}"], ["heun", "nearest: 6 or 8"]),
        ([f"sidenet.path={tmp_path / 'none.safetensors'}"], [str(tmp_path / "none.safetensors"), "make train"]),
        ([f"backbone.path={tmp_path / 'bb.safetensors'}"], [str(tmp_path / "bb.safetensors"), "make backbone"]),
        ([f"eval.classifier_path={tmp_path / 'c.safetensors'}"], [str(tmp_path / "c.safetensors"), "make backbone"]),
        (["eval.feature_extractor=inception", f"eval.inception_weights={tmp_path / 'inc.pth'}",
          f"eval.reference_stats={tmp_path / 'ref.npz'}"], [str(tmp_path / "inc.pth"), "weights-inception-2015-12-05"]),
        ([f"eval.reference_stats={tmp_path / 'VIRTUAL.npz'}"], [str(tmp_path / "VIRTUAL.npz"), "mu"]),
    ]
    for extra, needles in cases:
        assert main(_args(repo_root, tiny, tmp_path, *extra)) == 2, extra
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, (extra, err)
    assert not (tmp_path / "out").exists()  # nothing was written


@pytest.mark.slow
def test_cli_inception_sweep_reports_sfid(repo_root, tiny, tmp_path):
    """Inception features (random weights in torch-fidelity's layout) against an ADM-style image batch."""
    from factories import random_inception_weights

    weights = random_inception_weights(tmp_path / "inception.pth")
    images = np.random.default_rng(0).integers(0, 256, size=(8, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    args = _args(repo_root, tiny, tmp_path, "eval.feature_extractor=inception", f"eval.inception_weights={weights}",
                 f"eval.reference_stats={tmp_path / 'ref.npz'}", "eval.num_samples=6", "eval.solvers=[euler]",
                 "eval.budgets={euler: [2]}", "eval.is_splits=1")
    assert main(args) == 0
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert [r["solver"] for r in rows] == ["reference", "euler"]
    for r in rows:
        assert r["sfid"] > 0.0 and r["fid"] > 0.0 and _is_fraction(r["precision"], 6) and _is_fraction(r["recall"], 8)


def test_every_sidenet_solver_sweeps_with_guidance(repo_root, tiny, tmp_path):
    side = ["ba", "ba-single", "ba-adaptive"]
    args = [a for a in _args(repo_root, tiny, tmp_path) if not a.startswith(("eval.solvers", "eval.budgets"))]
    assert main([*args, "sampling.cfg_scale=1.5", f"eval.solvers=[{','.join(side)}]",
                 "eval.budgets={ba: [3], ba-single: [3]}", "eval.tolerances={ba-adaptive: [0.05]}"]) == 0
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert [r["solver"] for r in rows] == ["reference", *side]
    assert all(r["traj_rmse"] > 0 and r["fd_ref"] > 0 for r in rows[1:])
