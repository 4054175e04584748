"""Fixed-step and multistep solvers: convergence order, NFE counts, agreement with torchdiffeq."""

from __future__ import annotations

import math

import pytest
import torch
from torchdiffeq import odeint

from bafm.models.analytic import GaussianMixtureFlow
from bafm.solvers import SOLVERS, fixed_grid_solvers, get_solver, uses_side_fn
from bafm.solvers.grids import nfe_for_steps, uniform_grid

F64 = torch.float64
# dx/dt = a x + b t per coordinate, solved from t = 1 to t = 0.
A = torch.tensor([-1.5, 0.7, 2.0], dtype=F64)
B = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
X1 = torch.tensor([[0.3, -1.2, 0.8], [1.1, 0.4, -0.6]], dtype=F64)


def linear_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return A * x + B * t[:, None]


def linear_exact(x1: torch.Tensor, t: float, t0: float = 1.0) -> torch.Tensor:
    """x(t) = C e^{a t} - (b/a) t - b/a^2 with x(t0) = x1."""
    c = (x1 + B / A * t0 + B / A**2) * torch.exp(-A * t0)
    return c * torch.exp(A * t) - B / A * t - B / A**2


class Counter:
    """Independent call counter, to check the solvers' own counts."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def observed_order(solver: str, steps: int, **options) -> float:
    errors = []
    for n in (steps, 2 * steps):
        res = get_solver(solver)(linear_field, X1, uniform_grid(n, dtype=F64), **options)
        errors.append((res.x - linear_exact(X1, 0.0)).abs().max().item())
    return math.log2(errors[0] / errors[1])


ORDER_CASES = [
        ("euler", 64, {}),
        ("heun", 32, {}),
        ("midpoint", 32, {}),
        ("rk4", 8, {}),
        ("ab2", 32, {"start": "euler"}),
        ("ab2", 32, {"start": "heun"}),
        # UniPC and iPNDM: order 2 whatever their option (an O(h^2) first-order final or start
        # step); UniPC-2 reaches it later (1.93 from 256 to 512 steps, 1.72 from 64 to 128).
        ("unipc", 256, {}),
        ("unipc", 32, {"order": 3}),
        ("ipndm", 32, {}),
]


@pytest.mark.parametrize("solver, steps, options", ORDER_CASES)
def test_observed_order_matches_declared_order(solver, steps, options):
    order = observed_order(solver, steps, **options)
    assert SOLVERS[solver].order == round(order)
    assert abs(order - SOLVERS[solver].order) < 0.15


def test_every_fixed_grid_solver_has_its_declared_order_observed():
    # dpm++2m's order is observed away from the data end (below); the SideNet solvers' with an exact
    # SideNet in test_solvers_ba.py.
    plain = {name for name in fixed_grid_solvers() if not uses_side_fn(name)}
    assert plain <= {case[0] for case in ORDER_CASES} | {"dpm++2m"}


def _mixture_problem():
    gen = torch.Generator().manual_seed(0)
    mix = GaussianMixtureFlow.random((3,), num_classes=3, components_per_class=1, std=0.5, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    x = torch.randn(6, 3, generator=gen, dtype=F64)
    return mix, y, x


def test_dpmpp_2m_second_order_away_from_the_data_end():
    # A uniform-in-t grid down to exactly t = 0 has log-SNR steps that do not shrink near the
    # end, so order 2 is shown on a grid that stops at t = 0.05 (exact solution: closed-form
    # transport of a one-component-per-class mixture).
    mix, y, x = _mixture_problem()
    vf = lambda x, t: mix.velocity(x, t, y)  # noqa: E731
    exact = mix.transport(x, torch.ones(6, dtype=F64), torch.full((6,), 0.05, dtype=F64), y)
    errors = []
    for n in (32, 64):
        res = get_solver("dpm++2m")(vf, x, torch.linspace(1.0, 0.05, n + 1, dtype=F64))
        errors.append((res.x - exact).abs().max().item())
    assert abs(math.log2(errors[0] / errors[1]) - SOLVERS["dpm++2m"].order) < 0.25


def test_dpmpp_2m_full_grid_is_finite_and_converges():
    mix, y, x = _mixture_problem()
    vf = lambda x, t: mix.velocity(x, t, y)  # noqa: E731
    exact = mix.transport(x, torch.ones(6, dtype=F64), torch.zeros(6, dtype=F64), y)
    errors = []
    for n in (1, 2, 4, 16, 64):
        res = get_solver("dpm++2m")(vf, x, uniform_grid(n, dtype=F64))
        assert torch.isfinite(res.x).all()
        errors.append((res.x - exact).abs().max().item())
    assert errors[-1] < 3e-3 and errors == sorted(errors, reverse=True)


def test_dpmpp_2m_matches_textbook_update():
    # DPM-Solver++(2M) written with alpha = 1 - t, sigma = t and exp(-h) on an interior grid.
    grid = [0.9, 0.7, 0.45, 0.3, 0.1]
    x = X1.clone()
    x0_prev, lam = None, lambda t: math.log((1 - t) / t)
    for i, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        x0 = x - t * linear_field(x, torch.full((2,), t, dtype=F64))
        h = lam(s) - lam(t)
        d = x0
        if x0_prev is not None:
            r = (lam(t) - lam(grid[i - 1])) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = (s / t) * x - (1 - s) * math.expm1(-h) * d
        x0_prev = x0
    res = get_solver("dpm++2m")(linear_field, X1, torch.tensor(grid, dtype=F64))
    torch.testing.assert_close(res.x, x, rtol=0, atol=1e-13)


def test_dpmpp_2m_steps_touching_endpoints_are_euler():
    # [1, 0.5, 0]: the step from t = 1 has no history, the step to t = 0 is first order.
    grid = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    euler = get_solver("euler")(linear_field, X1, grid).x
    torch.testing.assert_close(get_solver("dpm++2m")(linear_field, X1, grid).x, euler, rtol=0, atol=0)


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "rk4", "ab2", "dpm++2m", "unipc", "ipndm", "reference"])
def test_nfe_is_what_an_independent_counter_saw(solver):
    counter = Counter(linear_field)
    res = get_solver(solver)(counter, X1, uniform_grid(7, dtype=F64))
    assert res.nfe == counter.calls and res.steps == 7 and res.side_calls == 0
    if solver != "reference":
        assert res.nfe == nfe_for_steps(solver, 7)


def test_ab2_heun_start_spends_one_more_call():
    counter = Counter(linear_field)
    res = get_solver("ab2")(counter, X1, uniform_grid(5, dtype=F64), start="heun")
    assert res.nfe == counter.calls == 6 == nfe_for_steps("ab2", 5, start="heun")


@pytest.mark.parametrize("ours, theirs", [("euler", "euler"), ("midpoint", "midpoint"), ("heun", "heun2")])
def test_agrees_with_torchdiffeq_fixed_grid(ours, theirs):
    grid = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.12, 0.0], dtype=F64)
    expected = odeint(lambda t, x: linear_field(x, t.expand(x.shape[0])), X1, grid, method=theirs)[-1]
    torch.testing.assert_close(get_solver(ours)(linear_field, X1, grid).x, expected, rtol=0, atol=1e-13)


def test_rk4_is_the_classic_tableau():
    # One step of the classic 1/6, 1/3, 1/3, 1/6 rule written out by hand.
    t, dt = 1.0, -0.25
    f = lambda x, t: linear_field(x, torch.full((2,), t, dtype=F64))  # noqa: E731
    k1 = f(X1, t)
    k2 = f(X1 + dt / 2 * k1, t + dt / 2)
    k3 = f(X1 + dt / 2 * k2, t + dt / 2)
    k4 = f(X1 + dt * k3, t + dt)
    expected = X1 + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    res = get_solver("rk4")(linear_field, X1, torch.tensor([1.0, 0.75], dtype=F64))
    torch.testing.assert_close(res.x, expected, rtol=0, atol=1e-15)


def test_reference_matches_closed_form():
    res = get_solver("reference")(linear_field, X1, uniform_grid(1, dtype=F64))
    torch.testing.assert_close(res.x, linear_exact(X1, 0.0), rtol=0, atol=1e-6)
    tight = get_solver("reference")(linear_field, X1, uniform_grid(1, dtype=F64), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tight.x, linear_exact(X1, 0.0), rtol=0, atol=1e-9)
    assert tight.nfe > res.nfe


def test_reference_rejects_fixed_step_methods():
    with pytest.raises(ValueError, match="dopri5"):
        get_solver("reference")(linear_field, X1, uniform_grid(1, dtype=F64), method="euler")


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_solver_integrates_an_increasing_grid(solver):
    # Inversion direction, t: 0 -> 1, against the closed form started at t = 0. With the identity
    # SideNet, ba-single is Euler and ba a Heun variant.
    options = {"side_fn": lambda x, v, t, h: v} if SOLVERS[solver].uses_side_fn else {}
    res = get_solver(solver)(linear_field, X1, uniform_grid(32, dtype=F64).flip(0), **options)
    exact = linear_exact(X1, 1.0, t0=0.0)
    relative_error = ((res.x - exact).abs().max() / exact.abs().max()).item()
    bound = {"euler": 0.1, "ba-single": 0.1, "heun": 3e-3, "midpoint": 3e-3, "rk4": 1e-6, "reference": 1e-6}
    assert relative_error < bound.get(solver, 2e-2)
