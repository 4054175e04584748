"""``bafm optimize-grid``: grid parameterisation, the search, the JSON beside the SideNet, the CLI."""

from __future__ import annotations

import shutil
import numpy as np
import pytest
import torch

from bafm.cli import main
from bafm.eval.grid_search import Calibration, grid_from_params, params_from_grid, search_grid
from bafm.eval.report import read_csv
from bafm.models.analytic import GaussianMixtureFlow
from bafm.sampling import SamplingSettings
from bafm.io import sha256_file
from bafm.solvers.grid_store import load_grid_table, save_grid_table
from bafm.solvers.ground_truth import Reference
from factories import tiny_model_overrides

SAMPLING = SamplingSettings(grid="uniform", shift=1.0, cfg_scale=1.0, guidance_interval=(0.0, 0.7))


def test_every_parameter_vector_is_a_valid_grid_and_the_map_inverts():
    rng = np.random.default_rng(0)
    for steps in (2, 3, 6):
        for _ in range(20):
            theta = rng.normal(scale=2.0, size=steps - 1)
            grid = grid_from_params(theta)
            assert len(grid) == steps + 1 and grid[0] == 1.0 and grid[-1] == 0.0
            assert all(b < a for a, b in zip(grid[:-1], grid[1:]))
            np.testing.assert_allclose(params_from_grid(grid), theta, rtol=0, atol=1e-9)
    assert grid_from_params(np.zeros(3)) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-15)


@pytest.fixture(scope="module")
def calibration():
    flow = GaussianMixtureFlow.random((1, 2, 2), num_classes=2, components_per_class=1, std=0.3,
                                      generator=torch.Generator().manual_seed(0))
    return Calibration(flow, None, SAMPLING, torch.arange(16), seed=7, device=torch.device("cpu"), batch_size=8,
                       reference=Reference("dopri5", rtol=1e-8, atol=1e-8), reference_group=8)


def test_calibration_solves_the_configured_reference(calibration):
    flow = calibration.backbone
    rk4 = Calibration(flow, None, SAMPLING, torch.arange(16), seed=7, device=torch.device("cpu"), batch_size=8,
                      reference=Reference("rk4", steps=3), reference_group=8)
    # Against an RK4 reference at 3 steps, RK4 on the same uniform 3-step grid has no error at all;
    # against the tight dopri5 reference it has its truncation error.
    assert rk4.error("rk4", [1.0, 2 / 3, 1 / 3, 0.0]) == 0.0
    assert calibration.error("rk4", [1.0, 2 / 3, 1 / 3, 0.0]) > 1e-6


def test_search_lowers_the_calibration_error_and_reports_it_exactly(calibration):
    found = search_grid(calibration, "euler", 4, "nelder-mead", max_evals=60)
    assert found["optimized"] < 0.8 * found["uniform"], found
    assert found["optimized"] == pytest.approx(calibration.error("euler", found["grid"]), rel=1e-12)
    assert found["uniform"] == pytest.approx(calibration.error("euler", [1.0, 0.75, 0.5, 0.25, 0.0]), rel=1e-12)
    assert 1 < found["evals"] <= 60 and found["backbone_calls"] == 4 * 2 * found["evals"]  # 2 batches of 8
    powell = search_grid(calibration, "euler", 4, "powell", max_evals=60)
    assert powell["optimized"] < powell["uniform"] and powell["evals"] <= 60
    # One step has no interior time: nothing to search.
    one = search_grid(calibration, "euler", 1, "nelder-mead", max_evals=60)
    assert one["grid"] == [1.0, 0.0] and one["evals"] == 1 and one["optimized"] == one["uniform"]


def _args(repo_root, tiny, side, tmp_path, command="optimize-grid", *extra, out=None):
    return [
        command, *(["--out", str(out)] if out else []), "--config", str(repo_root / "experiments/digits.yaml"),
        *tiny_model_overrides(tiny, tmp_path, sidenet=side), "eval.device=cpu",
        "eval.reference_rtol=1e-3", "eval.reference_atol=1e-3", "eval.reference_batch_size=6",
        "optimize_grid.solvers=[euler,ba]", "optimize_grid.budgets={euler: [3], ba: [2]}",
        "optimize_grid.num_samples=6", "optimize_grid.batch_size=6", "optimize_grid.max_evals=8", *extra,
    ]


def test_cli_writes_grids_to_the_run_folder_and_the_sweep_uses_them(repo_root, tiny, tmp_path, capsys):
    side = tmp_path / "ckpt" / "sidenet.safetensors"
    side.parent.mkdir()
    shutil.copy(tiny / "sidenet.safetensors", side)
    shipped = side.with_name("sidenet.grids.json")  # grids shipped beside the SideNet: read, never rewritten
    save_grid_table(shipped, {("euler", 3): [1.0, 0.9, 0.1, 0.0]}, {})
    before = shipped.read_text()
    assert main(_args(repo_root, tiny, side, tmp_path)) == 0
    path = tmp_path / "runs" / "digits" / "sidenet.grids.json"
    assert capsys.readouterr().out.strip() == f"grids: {path}"
    assert shipped.read_text() == before
    table = load_grid_table(path)
    assert sorted(table.grids) == [("ba", 2), ("euler", 3)] and table.grids[("euler", 3)] != [1.0, 0.9, 0.1, 0.0]
    meta = table.meta
    assert meta["calibration"]["seeds"] == [1_000_000, 1_000_005] and meta["search"]["method"] == "nelder-mead"
    assert meta["models"]["sidenet"] == str(side) and "traj_rmse" in meta["objective"]["metric"]
    assert meta["models"]["sidenet_sha256"] == sha256_file(side)
    assert meta["objective"]["reference"] == {"kind": "dopri5", "solver": "reference", "rtol": 1e-3, "atol": 1e-3}
    for solver, nfe in table.grids:
        result = meta["results"][solver][str(nfe)]
        assert result["optimized"] <= result["uniform"] and 1 <= result["evals"] <= 8
    # The sweep samples on them and says so; a missing (solver, NFE) is a one-line error naming the file.
    sweep = ["eval.num_samples=6", "eval.batch_size=6", "eval.grid_images=4", "sampling.grid=optimized",
             "eval.solvers=[euler,ba]", "eval.budgets={euler: [3], ba: [2]}"]
    assert main(_args(repo_root, tiny, side, tmp_path, "eval-nfe-sweep", *sweep, out=tmp_path / "sweep")) == 0
    rows = read_csv(tmp_path / "sweep" / "results.csv")
    assert [(r["solver"], r["grid"], r["nfe"]) for r in rows] == [
        ("reference", "adaptive", rows[0]["nfe"]), ("euler", "optimized", 3), ("ba", "optimized", 2)]
    capsys.readouterr()
    assert main(_args(repo_root, tiny, side, tmp_path, "eval-nfe-sweep", *sweep, "eval.budgets={euler: [4], ba: [2]}",
                      out=tmp_path / "sweep2")) == 2
    assert f"'{path}' has no grid for solver 'euler' at 4 NFE" in capsys.readouterr().err
    # A second search merges into the file; --out redirects it.
    assert main(_args(repo_root, tiny, side, tmp_path, "optimize-grid", "optimize_grid.solvers=[euler]",
                      "optimize_grid.budgets={euler: [2]}")) == 0
    assert sorted(load_grid_table(path).grids) == [("ba", 2), ("euler", 2), ("euler", 3)]
    other = tmp_path / "elsewhere.json"
    assert main(_args(repo_root, tiny, side, tmp_path, "optimize-grid", "optimize_grid.solvers=[euler]",
                      "optimize_grid.budgets={euler: [2]}", out=other)) == 0
    assert sorted(load_grid_table(other).grids) == [("euler", 2)]


def test_cli_searches_against_eval_reference_solver(repo_root, tiny, tmp_path, monkeypatch):
    import bafm.eval.grid_search as grid_search

    used = []
    real = grid_search.reference_solve
    monkeypatch.setattr(grid_search, "reference_solve", lambda *a, **k: used.append(a[-1]) or real(*a, **k))
    out = tmp_path / "grids.json"
    assert main(_args(repo_root, tiny, tmp_path / "none.safetensors", tmp_path, "optimize-grid",
                      "optimize_grid.solvers=[euler]", "optimize_grid.budgets={euler: [2]}",
                      "eval.reference_solver=rk4", "eval.reference_steps=3", out=out)) == 0
    assert used == [Reference("rk4", steps=3, rtol=1e-3, atol=1e-3)]  # one reference group of 6 samples
    recorded = load_grid_table(out).meta["objective"]["reference"]
    assert recorded == {"kind": "rk4", "solver": "rk4", "steps": 3}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["optimize_grid.seed=0"], "overlap the evaluation seeds [0, 1000)"),
        (["optimize_grid.solvers=[reference]"], "'reference' is not a fixed-grid solver"),
        (["optimize_grid.budgets={heun: [3]}", "optimize_grid.solvers=[heun]"], "nearest: 2 or 4"),
        (["optimize_grid.solvers=[rk4]", "optimize_grid.budgets={}"], "no budgets to search for 'rk4'"),
    ],
)
def test_bad_input_fails_before_sampling(repo_root, tiny, tmp_path, capsys, extra, message):
    assert main(_args(repo_root, tiny, tmp_path / "none.safetensors", tmp_path, "optimize-grid", *extra)) == 2
    assert message in capsys.readouterr().err


def _merge_many(dest: str, solver: str, count: int, barrier) -> None:
    import time
    from pathlib import Path

    import bafm.eval.grid_search as grid_search

    save = grid_search.save_grid_table

    def slow_save(*args, **kwargs):  # widen the read-to-write window so an unlocked merge loses grids
        time.sleep(0.02)
        return save(*args, **kwargs)

    grid_search.save_grid_table = slow_save
    barrier.wait()
    for nfe in range(2, 2 + count):
        grid = [1.0 - k / nfe for k in range(nfe)] + [0.0]
        grid_search.merge_grid(Path(dest), solver, nfe, grid, {"optimized": 0.0},
                               {"objective": {"metric": "traj_rmse"}})


def test_concurrent_searches_into_one_file_keep_every_grid(tmp_path):
    import multiprocessing as mp

    dest = tmp_path / "sidenet.grids.json"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_merge_many, args=(str(dest), solver, 12, barrier))
             for solver in ("euler", "ab2", "ipndm")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    table = load_grid_table(dest)
    assert len(table.grids) == 36 and set(table.meta["results"]) == {"euler", "ab2", "ipndm"}
    assert [p.name for p in tmp_path.iterdir()] == ["sidenet.grids.json"]  # no lock or temporary file left


def test_each_result_records_the_settings_that_found_it_and_a_bad_file_is_kept(repo_root, tiny, tmp_path, capsys):
    side = tmp_path / "ckpt" / "sidenet.safetensors"
    side.parent.mkdir()
    shutil.copy(tiny / "sidenet.safetensors", side)
    assert main(_args(repo_root, tiny, side, tmp_path, "optimize-grid", "optimize_grid.solvers=[euler]",
                      "optimize_grid.budgets={euler: [2]}")) == 0
    assert main(_args(repo_root, tiny, side, tmp_path, "optimize-grid", "optimize_grid.solvers=[euler]",
                      "optimize_grid.budgets={euler: [3]}", "optimize_grid.seed=2000000",
                      "optimize_grid.max_evals=5")) == 0
    path = tmp_path / "runs" / "digits" / "sidenet.grids.json"
    results = load_grid_table(path).meta["results"]["euler"]
    assert results["2"]["calibration"] == {"seed": 1_000_000, "num_samples": 6}
    assert results["2"]["search"] == {"method": "nelder-mead", "max_evals": 8}
    assert results["3"]["calibration"]["seed"] == 2_000_000 and results["3"]["search"]["max_evals"] == 5
    capsys.readouterr()
    path.write_text('{"format": 1, "grids": {"euler": {"2": [1.0, 0.7]}}}')
    before = path.read_text()
    assert main(_args(repo_root, tiny, side, tmp_path, "optimize-grid", "optimize_grid.solvers=[euler]",
                      "optimize_grid.budgets={euler: [2]}")) == 2
    err = capsys.readouterr().err
    assert f"{path}: grids.euler.2" in err and err.count("its grids are kept: move it away or pass another file") == 1
    assert path.read_text() == before


def test_the_shipped_grids_are_read_and_grids_of_another_sidenet_are_refused(repo_root, tiny, tmp_path, capsys):
    side = tmp_path / "ckpt" / "sidenet.safetensors"
    side.parent.mkdir()
    shutil.copy(tiny / "sidenet.safetensors", side)
    shipped = side.with_name("sidenet.grids.json")
    grids = {("euler", 3): [1.0, 0.6, 0.2, 0.0], ("ba", 2): [1.0, 0.4, 0.0]}
    save_grid_table(shipped, grids, {"models": {"sidenet_sha256": sha256_file(side)}})
    sweep = ["eval.num_samples=6", "eval.batch_size=6", "eval.grid_images=0", "sampling.grid=optimized",
             "eval.solvers=[euler,ba]", "eval.budgets={euler: [3], ba: [2]}"]
    assert main(_args(repo_root, tiny, side, tmp_path, "eval-nfe-sweep", *sweep, out=tmp_path / "sweep")) == 0
    assert [r["grid"] for r in read_csv(tmp_path / "sweep" / "results.csv")][1:] == ["optimized", "optimized"]
    # Grids recorded for another SideNet: the sweep and a search into that file stop, and the file is kept.
    save_grid_table(shipped, grids, {"models": {"sidenet_sha256": "0" * 64}})
    before = shipped.read_text()
    capsys.readouterr()
    assert main(_args(repo_root, tiny, side, tmp_path, "eval-nfe-sweep", *sweep, out=tmp_path / "sweep2")) == 2
    err = capsys.readouterr().err
    assert f"'{shipped}' was searched for another SideNet (sha256 000000000000)" in err and "make optimize-grid" in err
    assert main(_args(repo_root, tiny, side, tmp_path, "optimize-grid", out=shipped)) == 2
    assert "; its grids are kept: move it away" in capsys.readouterr().err and shipped.read_text() == before
    # No grid file anywhere: one line naming every place looked.
    shipped.unlink()
    assert main(_args(repo_root, tiny, side, tmp_path, "eval-nfe-sweep", *sweep, out=tmp_path / "sweep3")) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path / 'runs' / 'digits' / 'sidenet.grids.json'}' or '{shipped}'" in err
