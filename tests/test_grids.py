"""Time grids and the step <-> NFE budget arithmetic."""

from __future__ import annotations

import re

import pytest
import torch

from bafm.solvers import SOLVERS, get_solver, uses_side_fn
from bafm.solvers.grids import make_grid, nfe_for_steps, shifted_grid, steps_for_nfe, uniform_grid


def test_uniform_grid_values_dtype_and_exact_endpoints():
    grid = uniform_grid(4)
    assert grid.dtype == torch.float32 and grid.shape == (5,)
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), rtol=0, atol=0)
    g64 = uniform_grid(10, dtype=torch.float64)
    assert g64[0].item() == 1.0 and g64[-1].item() == 0.0
    # Every point is the correctly rounded value k / N (so t = 0.7 is float32(0.7) exactly).
    assert uniform_grid(10)[3].item() == torch.tensor(0.7, dtype=torch.float32).item()


def test_shifted_grid_formula():
    t = torch.linspace(1.0, 0.0, 7, dtype=torch.float64)
    expected = 3.0 * t / (1.0 + 2.0 * t)
    torch.testing.assert_close(shifted_grid(6, 3.0, dtype=torch.float64), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(shifted_grid(6, 1.0), uniform_grid(6), rtol=0, atol=0)
    grid = shifted_grid(6, 3.0)
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0 and bool((grid.diff() < 0).all())
    # A shift above 1 spends more of the steps near the noise end.
    assert grid[1].item() > uniform_grid(6)[1].item()


def test_make_grid_by_name():
    torch.testing.assert_close(make_grid("uniform", 5), uniform_grid(5), rtol=0, atol=0)
    torch.testing.assert_close(make_grid("shift", 5, shift=2.0), shifted_grid(5, 2.0), rtol=0, atol=0)
    assert make_grid("uniform", 3, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="uniform"):
        make_grid("cosine", 5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_grid_rejects_bad_steps(bad):
    with pytest.raises(ValueError, match="steps"):
        uniform_grid(bad)


def test_shifted_grid_rejects_bad_shift():
    with pytest.raises(ValueError, match="shift"):
        shifted_grid(4, 0.0)


@pytest.mark.parametrize(
    "solver, steps, nfe",
    [
        ("euler", 10, 10), ("heun", 5, 10), ("midpoint", 5, 10), ("rk4", 3, 12),
        ("ab2", 8, 8), ("dpm++2m", 6, 6), ("ba", 5, 5), ("ba-single", 7, 7),
    ],
)  # fmt: skip
def test_steps_and_nfe_round_trip(solver, steps, nfe):
    assert nfe_for_steps(solver, steps) == nfe
    assert steps_for_nfe(solver, nfe) == steps
    # The arithmetic agrees with the calls the solver really makes on that many steps.
    calls = []
    side = {"side_fn": lambda x, v, t, h: v} if uses_side_fn(solver) else {}
    get_solver(solver)(lambda x, t: calls.append(t) or -x, torch.ones(2, 3), uniform_grid(steps), **side)
    assert len(calls) == nfe


def test_ab2_heun_start_budget():
    assert nfe_for_steps("ab2", 4, start="heun") == 5
    assert steps_for_nfe("ab2", 5, start="heun") == 4


@pytest.mark.parametrize(
    "solver, nfe, nearest",
    [
        ("heun", 7, "nearest: 6 or 8"),
        ("rk4", 10, "nearest: 8 or 12"),
        ("rk4", 3, "nearest: 4"),
        ("midpoint", 1, "nearest: 2"),
    ],
)
def test_infeasible_budget_names_the_nearest_ones(solver, nfe, nearest):
    with pytest.raises(ValueError, match=nearest):
        steps_for_nfe(solver, nfe)


def test_reference_has_no_fixed_budget():
    with pytest.raises(ValueError, match="adaptive"):
        nfe_for_steps("reference", 4)
    with pytest.raises(ValueError, match="adaptive"):
        steps_for_nfe("reference", 4)


def test_unknown_solver_lists_valid_names():
    valid = "Valid solvers: euler, heun, midpoint, rk4, ab2, dpm\\+\\+2m, ipndm, unipc, ba, ba-single, ba-adaptive, reference"
    with pytest.raises(ValueError, match=valid):
        get_solver("eulr")
    with pytest.raises(ValueError, match="Did you mean 'euler'"):
        steps_for_nfe("eulr", 4)


@pytest.mark.parametrize("solver", [name for name in SOLVERS if SOLVERS[name].nfe_per_step is not None])
def test_budget_arithmetic_matches_counted_nfe(solver):
    x = torch.randn(2, 3, dtype=torch.float64)
    options = {"side_fn": lambda x, v, t, h: v} if SOLVERS[solver].uses_side_fn else {}
    steps_of = {}  # counted NFE -> steps
    for steps in range(1, 13):
        res = get_solver(solver)(lambda x, t: -x, x, uniform_grid(steps, dtype=torch.float64), **options)
        assert nfe_for_steps(solver, steps) == res.nfe
        steps_of[res.nfe] = steps
    # Every budget a run spends maps back to its steps; every other budget is refused by name.
    for nfe in range(1, 13):
        if nfe in steps_of:
            assert steps_for_nfe(solver, nfe) == steps_of[nfe]
        else:
            with pytest.raises(ValueError, match=f"'{re.escape(solver)}' cannot spend exactly {nfe} NFE"):
                steps_for_nfe(solver, nfe)


def test_grid_table_round_trip_and_validation(tmp_path):
    from bafm.solvers.grid_store import GridTable, grid_table_from_json, load_grid_table, save_grid_table

    grids = {("ba", 3): [1.0, 0.61, 0.23, 0.0], ("euler", 2): [1.0, 0.4, 0.0]}
    meta = {"objective": {"metric": "traj_rmse"}, "calibration": {"seeds": [1000000, 1000255]}}
    path = save_grid_table(tmp_path / "sidenet.grids.json", grids, meta)
    table = load_grid_table(path)
    assert table.grids == grids and table.meta == meta and table.path == path
    torch.testing.assert_close(table.grid("ba", 3), torch.tensor(grids[("ba", 3)], dtype=torch.float64))
    assert not list(tmp_path.glob("*.tmp*")) and [p.name for p in tmp_path.iterdir()] == ["sidenet.grids.json"]
    # A grid read back is a valid grid for its solver.
    get_solver("euler")(lambda x, t: -x, torch.ones(2, 3), table.grid("euler", 2))
    with pytest.raises(ValueError, match=r"sidenet.grids.json' has no grid for solver 'ba' at 5 NFE \(it holds: ba@3, euler@2\)"):
        table.grid("ba", 5)
    with pytest.raises(FileNotFoundError, match="make optimize-grid"):
        load_grid_table(tmp_path / "missing.json")
    bad = [
        ('{"format": 1, "grids": {"euler": {"2": [1.0, 0.5, 0.6, 0.0]}}}', "strictly decreasing"),
        ('{"format": 1, "grids": {"euler": {"2": [0.9, 0.5, 0.0]}}}', "from 1.0 to 0.0"),
        ('{"format": 1, "grids": {"euler": {"2": [1.0, 0.6, 0.3, 0.0]}}}', "so 3 points, got 4"),
        ('{"format": 1, "grids": {"heun": {"3": [1.0, 0.0]}}}', "nearest: 2 or 4"),
        ('{"format": 1, "grids": {"euler": {"x": [1.0, 0.0]}}}', "not a positive integer"),
        ('{"format": 2, "grids": {}}', '"format": 1'),
        ("[1, 2", "not valid JSON"),
    ]
    for text, message in bad:
        with pytest.raises(ValueError, match=message):
            grid_table_from_json(text, "f.json")
    with pytest.raises(ValueError, match="strictly decreasing"):
        save_grid_table(tmp_path / "x.json", {("euler", 2): [1.0, 1.0, 0.0]}, {})
    assert isinstance(table, GridTable)


def test_optimized_grids_are_not_built_by_name():
    with pytest.raises(ValueError, match="bafm optimize-grid"):
        make_grid("optimized", 4)
