"""The sweep's reference: adaptive dopri5 or a bounded fixed-step RK4, chosen by eval.reference_solver."""

from types import SimpleNamespace

import pytest
import torch

from bafm.cli import main
from bafm.config import ConfigError, load_config
from bafm.eval.report import read_csv
from bafm.sampling import reference_solve
from bafm.models.analytic import GaussianMixtureFlow
from bafm.solvers import get_solver, reference_solvers
from bafm.solvers.ground_truth import Reference
from bafm.solvers.grids import uniform_grid
from factories import tiny_model_overrides

NO_GUIDANCE = SimpleNamespace(cfg_scale=1.0, guidance_interval=(0.0, 0.7), grid="shift", shift=3.0)


def _mixture() -> GaussianMixtureFlow:
    means = torch.tensor([[-1.0, 0.5, 2.0], [1.5, -0.5, 0.0], [0.0, 2.0, -1.0]], dtype=torch.float64)
    return GaussianMixtureFlow(means, torch.tensor([0.3, 0.5, 0.4]), class_components=[[0, 1], [2]])


def test_rk4_reference_costs_four_nfe_per_step_and_matches_dopri5():
    flow = _mixture()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])  # 2 is the null class
    rk4 = reference_solve(flow, noise, labels, NO_GUIDANCE, Reference("rk4", steps=50))
    assert rk4.nfe == 200
    # The same as the registry's rk4 on a uniform grid: the sampling grid (shifted) is not used.
    direct = get_solver("rk4")(lambda x, t: flow.velocity(x, t, labels), noise, uniform_grid(50, dtype=torch.float64))
    torch.testing.assert_close(rk4.x, direct.x, rtol=0.0, atol=0.0)
    tight = reference_solve(flow, noise, labels, NO_GUIDANCE, Reference("dopri5", rtol=1e-10, atol=1e-10))
    assert tight.nfe > 200
    torch.testing.assert_close(rk4.x, tight.x, rtol=0.0, atol=1e-5)
    coarse = reference_solve(flow, noise, labels, NO_GUIDANCE, Reference("rk4", steps=2))
    assert coarse.nfe == 8 and (coarse.x - tight.x).abs().max() > 1e-3  # steps really are the knob


def test_reference_rejects_bad_choices():
    with pytest.raises(ValueError, match="reference solver is 'euler', expected one of: rk4, dopri5"):
        Reference("euler", steps=10)
    with pytest.raises(ValueError, match="needs reference_steps >= 1, got 0"):
        Reference("rk4", steps=0)


def test_the_registry_declares_which_solvers_can_be_the_reference():
    assert reference_solvers() == {"rk4": "rk4", "dopri5": "reference"}
    assert (Reference("dopri5").solver, Reference("dopri5").grid_label) == ("reference", "adaptive")
    assert (Reference("rk4", steps=3).solver, Reference("rk4", steps=3).grid_label) == ("rk4", "uniform")
    torch.testing.assert_close(Reference("rk4", steps=4).grid(), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0],
                                                                               dtype=torch.float64))
    assert Reference("rk4", steps=4, rtol=0.1).options() == {}  # a fixed-step reference takes no tolerances
    assert Reference("dopri5", rtol=1e-4, atol=1e-6).options() == {"rtol": 1e-4, "atol": 1e-6}


def test_config_checks_the_reference_keys():
    with pytest.raises(ConfigError, match="'eval.reference_solver' is 'rk45', expected one of: rk4, dopri5"):
        load_config(None, ["eval.reference_solver=rk45"])
    with pytest.raises(ConfigError, match="'eval.reference_steps' is 0, expected >= 1 for the rk4 reference"):
        load_config(None, ["eval.reference_solver=rk4", "eval.reference_steps=0"])
    assert load_config(None, ["eval.reference_steps=0"]).eval.reference_solver == "dopri5"  # steps unused


def test_describe_reference():
    assert Reference("rk4", 50, 1e-5, 1e-5).describe(200.0) == "rk4, 50 steps, 200 NFE per sample"
    assert Reference("dopri5", 50, 1e-5, 1e-4).describe(86.5) == "dopri5 (rtol 1e-05, atol 0.0001), 86.5 NFE per sample"


def _args(repo_root, tiny, tmp_path, *extra):
    return [
        "eval-nfe-sweep", "--config", str(repo_root / "experiments/digits.yaml"), "--out", str(tmp_path / "out"),
        *tiny_model_overrides(tiny, tmp_path), "eval.num_samples=6", "eval.batch_size=6",
        "eval.reference_batch_size=3", "eval.reference_rtol=1e-3", "eval.reference_atol=1e-3", "eval.grid_images=0",
        "eval.device=cpu", "eval.solvers=[euler]", "eval.budgets={euler: [2]}", *extra,
    ]


def test_sweep_prints_the_reference_and_its_nfe(repo_root, tiny, tmp_path, capsys):
    assert main(_args(repo_root, tiny, tmp_path, "eval.reference_solver=rk4", "eval.reference_steps=3")) == 0
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert [(r["solver"], r["grid"], r["nfe"], r["steps"]) for r in rows] == [("reference", "uniform", 12, 3),
                                                                              ("euler", "uniform", 2, 2)]
    assert rows[1]["traj_rmse"] > 0.0
    assert "reference: rk4, 3 steps, 12 NFE per sample" in capsys.readouterr().out
    assert main(_args(repo_root, tiny, tmp_path)) == 0
    reference = read_csv(tmp_path / "out" / "results.csv")[0]
    assert reference["grid"] == "adaptive"
    nfe = reference["nfe"]
    assert f"reference: dopri5 (rtol 0.001, atol 0.001), {nfe} NFE per sample" in capsys.readouterr().out
