"""Solver registry, shared signature, input validation, dtype handling."""

from __future__ import annotations

import pytest
import torch

from bafm.solvers import SOLVERS, SolveResult, get_solver, solver_facts
from bafm.solvers.grids import uniform_grid

ALL = list(SOLVERS)


def options_for(name):
    side = lambda x, v, t, h: v + 0.1 * h.view(-1, *[1] * (x.dim() - 1)) * x  # noqa: E731
    return {"side_fn": side} if SOLVERS[name].uses_side_fn else {}


def test_registry_holds_the_solvers_of_the_design():
    # DESIGN.md's required names: a contract with external checks, not a copy of the registry.
    required = {"euler", "heun", "midpoint", "rk4", "ab2", "dpm++2m", "ba", "ba-single", "reference", "unipc",
                "ipndm", "ba-adaptive"}
    assert required <= set(ALL)
    for name, fn in SOLVERS.items():
        assert get_solver(name) is fn and solver_facts(name).name == name


@pytest.mark.parametrize("name", ALL)
def test_declared_facts_match_what_the_solver_does(name):
    facts = solver_facts(name)
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    side = options_for("ba")["side_fn"]
    # uses_side_fn: a SideNet solver refuses to run without one; any other refuses one.
    if facts.uses_side_fn:
        with pytest.raises(ValueError, match="side_fn"):
            get_solver(name)(lambda x, t: -x, x, uniform_grid(2, dtype=torch.float64))
    else:
        with pytest.raises(TypeError, match="side_fn"):
            get_solver(name)(lambda x, t: -x, x, uniform_grid(2, dtype=torch.float64), side_fn=side)
    # nfe_per_step: the calls counted on 3 and on 6 steps differ by 3 * nfe_per_step; adaptive solvers
    # spend what their tolerance asks, whatever the grid.
    counted = []
    for steps, tol in ((3, 1e-3), (6, 1e-3), (3, 1e-8)):
        calls = []

        def velocity(x, t):
            calls.append(t)
            return torch.sin(3 * x) - x * t.view(-1, 1)

        extra = {"rtol": tol, "atol": tol} if facts.adaptive else {}
        get_solver(name)(velocity, x, uniform_grid(steps, dtype=torch.float64), **options_for(name), **extra)
        counted.append(len(calls))
    if facts.adaptive:
        assert counted[2] > counted[0]
    else:
        assert counted[1] - counted[0] == 3 * facts.nfe_per_step and counted[2] == counted[0]


@pytest.mark.parametrize("name", ALL)
def test_solvers_keep_dtype_and_pass_times_in_that_dtype(name):
    seen = []

    def vf(x, t):
        seen.append((t.dtype, t.shape, t.device))
        return -x

    x = torch.randn(3, 2, 4, dtype=torch.float32)
    res = get_solver(name)(vf, x, uniform_grid(4, dtype=torch.float64), **options_for(name))
    assert isinstance(res, SolveResult)
    assert res.x.dtype == torch.float32 and res.x.shape == x.shape and res.x.device == x.device
    assert set(seen) == {(torch.float32, torch.Size([3]), x.device)}
    assert res.steps == 4 or name == "ba-adaptive"  # it reports the steps it took


@pytest.mark.parametrize("name", ALL)
def test_solvers_accept_a_plain_list_grid(name):
    x = torch.ones(2, 3, dtype=torch.float64)
    res = get_solver(name)(lambda x, t: -x, x, [1.0, 0.5, 0.0], **options_for(name))
    same = get_solver(name)(lambda x, t: -x, x, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64),
                            **options_for(name))
    torch.testing.assert_close(res.x, same.x, rtol=0, atol=0)
    # dx/dt = -x from t = 1 down to 0 grows x by e: every solver moves toward it, none stays put.
    assert ((res.x > 1.4) & (res.x < 3.0)).all(), res.x


@pytest.mark.parametrize(
    "grid, message",
    [
        (torch.tensor([[1.0, 0.0]]), "1-D"),
        (torch.tensor([1.0]), "at least 2"),
        (torch.tensor([1.0, 0.5, 0.7, 0.0]), "strictly decreasing"),
        (torch.tensor([1.0, 0.5, 0.5, 0.0]), "strictly decreasing"),
        (torch.tensor([1.5, 0.5, 0.0]), r"\[0, 1\]"),
        (torch.tensor([1.0, float("nan"), 0.0]), r"\[0, 1\]"),
        (torch.tensor([0.0, -0.1]), r"\[0, 1\]"),
    ],
)
@pytest.mark.parametrize("name", ["euler", "dpm++2m", "ba"])
def test_bad_grids_are_rejected(name, grid, message):
    with pytest.raises(ValueError, match=message):
        get_solver(name)(lambda x, t: -x, torch.ones(2, 3), grid, **options_for(name))


def test_grid_that_collapses_in_the_state_dtype_is_rejected():
    grid = torch.tensor([1.0, 0.5 + 1e-12, 0.5, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="float32"):
        get_solver("euler")(lambda x, t: -x, torch.ones(2, 3), grid)


def test_bad_states_are_rejected():
    with pytest.raises(ValueError, match="floating tensor"):
        get_solver("heun")(lambda x, t: -x, torch.ones(2, 3, dtype=torch.int64), uniform_grid(2))
    with pytest.raises(ValueError, match="floating tensor"):
        get_solver("heun")(lambda x, t: -x, [1.0, 2.0], uniform_grid(2))


def test_unknown_options_are_an_error():
    with pytest.raises(TypeError, match="side_fn"):
        get_solver("euler")(lambda x, t: -x, torch.ones(2, 3), uniform_grid(2), side_fn=lambda *a: a[1])
    with pytest.raises(ValueError, match="start"):
        get_solver("ab2")(lambda x, t: -x, torch.ones(2, 3), uniform_grid(2), start="rk4")
