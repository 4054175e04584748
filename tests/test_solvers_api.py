"""Solver registry, shared signature, input validation, dtype handling."""

from __future__ import annotations

import pytest
import torch

from bafm.solvers import SOLVERS, SolveResult, get_solver
from bafm.solvers.grids import uniform_grid

ALL = list(SOLVERS)


def options_for(name):
    side = lambda x, v, t, h: v + 0.1 * h.view(-1, *[1] * (x.dim() - 1)) * x  # noqa: E731
    return {"side_fn": side} if SOLVERS[name].uses_side_fn else {}


def test_registry_holds_the_required_solvers_with_their_properties():
    assert ALL == ["euler", "heun", "midpoint", "rk4", "ab2", "dpm++2m", "ipndm", "unipc", "ba", "ba-single",
                   "ba-adaptive", "reference"]
    for name, fn in SOLVERS.items():
        assert get_solver(name) is fn and fn.solver_name == name
    assert {n: SOLVERS[n].nfe_per_step for n in ALL} == {
        "euler": 1, "heun": 2, "midpoint": 2, "rk4": 4, "ab2": 1, "dpm++2m": 1, "ipndm": 1, "unipc": 1,
        "ba": 1, "ba-single": 1, "ba-adaptive": None, "reference": None,
    }  # fmt: skip
    assert [n for n in ALL if SOLVERS[n].uses_side_fn] == ["ba", "ba-single", "ba-adaptive"]


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
    assert torch.isfinite(res.x).all()


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
    with pytest.raises(TypeError):
        get_solver("euler")(lambda x, t: -x, torch.ones(2, 3), uniform_grid(2), side_fn=lambda *a: a[1])
    with pytest.raises(ValueError, match="start"):
        get_solver("ab2")(lambda x, t: -x, torch.ones(2, 3), uniform_grid(2), start="rk4")
