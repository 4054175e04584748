"""UniPC against diffusers' flow-matching scheduler, and iPNDM's Adams-Bashforth coefficients."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from bafm.models.analytic import GaussianMixtureFlow
from bafm.solvers import get_solver
from bafm.solvers.grids import shifted_grid, uniform_grid
from bafm.solvers.multistep import adams_bashforth_weights

F64 = torch.float64


@pytest.fixture(scope="module")
def mixture_field():
    """A nonlinear float64 field (exact Gaussian-mixture flow) and a starting batch."""
    gen = torch.Generator().manual_seed(0)
    mix = GaussianMixtureFlow.random((2, 3, 3), num_classes=3, components_per_class=2, std=0.5, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    x1 = torch.randn(6, 2, 3, 3, generator=gen, dtype=F64)
    return (lambda x, t: mix.velocity(x, t, y)), x1


def _diffusers_unipc(field, x1, order, *, steps=None, sigmas=None, float64_sigmas=None):
    """Run diffusers' UniPCMultistepScheduler on ``field``; returns (its sigma grid, result).

    The scheduler builds its own float32 sigmas (``set_timesteps``), moving sigma = 1 to 1 - 1e-6;
    ``float64_sigmas`` replaces them after ``set_timesteps`` so that its arithmetic runs in float64.
    The model is always called at the scheduler's sigma, which is our time ``t``.
    """
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=order, solver_type="bh2",
        predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
    )
    sched.set_timesteps(num_inference_steps=steps, sigmas=sigmas)
    if float64_sigmas is not None:
        sched.sigmas = float64_sigmas.clone()
    grid = sched.sigmas.to(F64)
    x = x1.clone()
    for i, timestep in enumerate(sched.timesteps):
        x = sched.step(field(x, grid[i].expand(x.shape[0])), timestep, x).prev_sample
    return grid, x


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [3, 5, 8])
def test_unipc_matches_diffusers_on_the_same_grid(mixture_field, order, steps):
    # Fair comparison: our solver is run on the scheduler's own grid (its float32 sigmas, read as
    # float64, which starts at 1 - 1e-6), so both call the field at the same times. What remains
    # is the scheduler's float32 coefficient arithmetic (about 1e-7 here); with its sigmas replaced
    # by the same values in float64 the two agree to round-off.
    field, x1 = mixture_field
    grid, theirs = _diffusers_unipc(field, x1, order, steps=steps)
    ours = get_solver("unipc")(field, x1, grid, order=order)
    assert ours.nfe == steps
    torch.testing.assert_close(ours.x, theirs, rtol=0, atol=1e-4)
    _, theirs64 = _diffusers_unipc(field, x1, order, steps=steps, float64_sigmas=grid)
    torch.testing.assert_close(ours.x, theirs64, rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_matches_diffusers_on_a_shifted_grid(mixture_field, order):
    field, x1 = mixture_field
    sigmas = shifted_grid(7, 3.0, dtype=F64)[:-1].numpy()  # the scheduler appends sigma = 0
    grid, theirs = _diffusers_unipc(field, x1, order, sigmas=sigmas)
    assert grid[0].item() < 1.0 and len(grid) == 8
    torch.testing.assert_close(get_solver("unipc")(field, x1, grid, order=order).x, theirs, rtol=0, atol=1e-4)


def test_unipc_handles_t_equal_one_exactly(mixture_field):
    """At t = 1 (lambda = -inf) the history term drops: the limit of the finite-lambda method."""
    field, x1 = mixture_field
    grid = uniform_grid(8, dtype=F64)
    # diffusers' float64 arithmetic reaches the same limit through infinities at orders 1 and 2...
    for order in (1, 2):
        ours = get_solver("unipc")(field, x1, grid, order=order).x
        _, theirs = _diffusers_unipc(field, x1, order, steps=8, float64_sigmas=grid)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    # ...and NaNs at order 3 (an infinite entry in its 2x2 corrector system); ours stays finite
    # and is the limit of starting at 1 - eps (the approach is slow: D ~ 1 / |log eps|).
    _, theirs = _diffusers_unipc(field, x1, 3, steps=8, float64_sigmas=grid)
    assert torch.isnan(theirs).any()
    exact = get_solver("unipc")(field, x1, grid, order=3).x
    assert torch.isfinite(exact).all()
    gaps = []
    for eps in (1e-2, 1e-4, 1e-8, 1e-16):
        near = grid.clone()
        near[0] = 1.0 - eps
        gaps.append((get_solver("unipc")(field, x1, near, order=3).x - exact).abs().max().item())
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.01 * gaps[0], gaps


def test_unipc_first_step_is_euler_and_last_step_lands_on_the_data_prediction(mixture_field):
    field, x1 = mixture_field
    one = get_solver("unipc")(field, x1, torch.tensor([1.0, 0.6], dtype=F64))
    torch.testing.assert_close(one.x, get_solver("euler")(field, x1, torch.tensor([1.0, 0.6], dtype=F64)).x,
                               rtol=0, atol=1e-15)
    # One step to t = 0 is x - t v, the data prediction, for every order.
    for order in (1, 2, 3):
        res = get_solver("unipc")(field, x1, torch.tensor([1.0, 0.0], dtype=F64), order=order)
        torch.testing.assert_close(res.x, x1 - field(x1, torch.ones(6, dtype=F64)), rtol=0, atol=1e-15)


def test_ab_weights_are_the_classic_ones_on_a_uniform_grid():
    classic = {1: [1], 2: [-1 / 2, 3 / 2], 3: [5 / 12, -16 / 12, 23 / 12], 4: [-9 / 24, 37 / 24, -59 / 24, 55 / 24]}
    for q, expected in classic.items():
        times = [1.0 - 0.1 * i for i in range(q)]
        np.testing.assert_allclose(adams_bashforth_weights(times, times[-1] - 0.1), expected, rtol=0, atol=1e-12)


def test_ab_weights_integrate_cubics_exactly_on_uneven_nodes():
    times, t_next = [0.95, 0.8, 0.72, 0.5], 0.41
    weights = adams_bashforth_weights(times, t_next)
    for power in range(4):
        # sum_j w_j t_j^p (t_next - t) = integral of t^p over [t, t_next], in exact arithmetic.
        exact = (Fraction(t_next) ** (power + 1) - Fraction(times[-1]) ** (power + 1)) / (power + 1)
        approx = sum(w * t**power for w, t in zip(weights, times)) * (t_next - times[-1])
        assert abs(approx - float(exact)) < 1e-14


def _quartic_drift(x, t):
    """dx/dt = 3(1-t)^4 + (1-t)^5 + (1-t)^6: flat at t = 1, so the low-order start steps are exact enough."""
    s = 1.0 - t
    return (3 * s**4 + s**5 + s**6)[:, None] * torch.ones_like(x)


@pytest.mark.parametrize("grid_of", [lambda n: uniform_grid(n, dtype=F64), lambda n: shifted_grid(n, 0.5, dtype=F64)],
                         ids=["uniform", "shifted"])
def test_ipndm_is_fourth_order_once_its_history_is_full(grid_of):
    x1 = torch.tensor([[0.3, -1.2], [1.0, 2.0]], dtype=F64)
    exact = x1 - (3 / 5 + 1 / 6 + 1 / 7)
    errors = [(get_solver("ipndm")(_quartic_drift, x1, grid_of(n)).x - exact).abs().max().item() for n in (32, 64)]
    assert math.log2(errors[0] / errors[1]) > 3.8, errors


def test_ipndm_low_orders_are_euler_and_ab2(mixture_field):
    field, x1 = mixture_field
    grid = shifted_grid(6, 2.0, dtype=F64)
    torch.testing.assert_close(get_solver("ipndm")(field, x1, grid, order=1).x,
                               get_solver("euler")(field, x1, grid).x, rtol=0, atol=1e-14)
    torch.testing.assert_close(get_solver("ipndm")(field, x1, grid, order=2).x,
                               get_solver("ab2")(field, x1, grid).x, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name, bad", [("unipc", 4), ("unipc", 0), ("ipndm", 5), ("ipndm", True)])
def test_bad_orders_are_rejected(name, bad):
    with pytest.raises(ValueError, match=f"solver '{name}': order must be one of"):
        get_solver(name)(lambda x, t: -x, torch.ones(2, 3), uniform_grid(3), order=bad)
