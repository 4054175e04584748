"""Inversion helpers on the exact Gaussian-mixture flow (float64): accuracy, order, NFE, CFG, editing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bafm.editing.inversion import edit_latents
from bafm.models.analytic import GaussianMixtureFlow
from bafm.models.guidance import build_sampling_fns
from bafm.sampling import SamplingSettings, integrate, invert
from bafm.solvers.grids import solve_grid, steps_for_budget
from bafm.solvers import SOLVERS, get_solver
from bafm.solvers.grids import nfe_for_steps, uniform_grid

NO_GUIDANCE = SamplingSettings(grid="uniform", cfg_scale=1.0)

F64 = torch.float64
FIXED_STEP = [name for name in SOLVERS if SOLVERS[name].nfe_per_step is not None]




@pytest.fixture(scope="module")
def problem():
    """One Gaussian per class, so ``transport`` (the exact ODE flow) is closed form."""
    gen = torch.Generator().manual_seed(1)
    mix = GaussianMixtureFlow.random((2, 3, 3), num_classes=3, components_per_class=1, std=0.5, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    x0 = mix.sample_data(6, y, generator=gen)
    zeros, ones = torch.zeros(6, dtype=F64), torch.ones(6, dtype=F64)
    noise = mix.transport(x0, zeros, ones, y)
    return mix, y, x0, noise


def _fns(mix, y, **guidance):
    return build_sampling_fns(mix.velocity, y, null_class=mix.null_class, side_velocity=mix.side_velocity, **guidance)


def _err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", FIXED_STEP)
def test_inversion_is_the_exact_noise_at_the_solver_order(problem, name):
    mix, y, x0, noise = problem
    vf, sf = _fns(mix, y)
    errors = []
    # UniPC is pre-asymptotic at 8 steps here (log2 ratio 1.12 from 8 to 16, 2.02 from 16 to 32).
    for steps in (16, 32) if name == "unipc" else (8, 16):
        nfe = nfe_for_steps(name, steps)
        res = invert(vf, x0, name, nfe, sf)
        assert (res.nfe, res.steps) == (nfe, steps)
        errors.append(_err(res.x, noise))
    # dpm++2m falls short of order 2 on grids that reach t = 0 and t = 1 (1.64 measured at 8 -> 16
    # steps, 1.71 at 32 -> 64): the log-SNR is infinite at both ends, so the step from t = 0, the
    # step after it and the step into t = 1 are first-order (Euler) steps, and the log-SNR gaps
    # next to the ends do not shrink with the step (lambda(h) - lambda(2h) -> log 2). The order
    # on an interior grid is tested below.
    expected = {"dpm++2m": 1.5}.get(name, SOLVERS[name].order)
    assert math.log2(errors[0] / errors[1]) > expected - 0.3, errors
    # iPNDM's Euler first step from the data end dominates its error (0.024 at 16 steps).
    assert errors[1] < {"euler": 0.25, "dpm++2m": 0.1, "ipndm": 0.03}.get(name, 0.01)


def test_dpmpp_2m_inversion_is_second_order_away_from_the_endpoints(problem):
    # On [0.2, 0.8] every step but the first has finite log-SNR gaps and takes the 2M correction
    # (measured: 1.81 at 8 -> 16 steps, 1.94 at 32 -> 64).
    mix, y, x0, _ = problem
    vf, _ = _fns(mix, y)
    start, end = (mix.transport(x0, torch.zeros(6, dtype=F64), torch.full((6,), s, dtype=F64), y) for s in (0.2, 0.8))
    errors = []
    for steps in (32, 64):
        res = get_solver("dpm++2m")(vf, start, torch.linspace(0.2, 0.8, steps + 1, dtype=F64))
        assert res.nfe == steps
        errors.append(_err(res.x, end))
    assert abs(math.log2(errors[0] / errors[1]) - 2.0) < 0.1, errors


@pytest.mark.parametrize("name, order, tol", [("euler", 1, 0.25), ("heun", 2, 6e-3)])
def test_round_trip_error_falls_at_the_solver_order(problem, name, order, tol):
    mix, y, x0, noise = problem
    vf, sf = _fns(mix, y)
    inv_err, trip_err = [], []
    for nfe in (16 * order, 32 * order):
        z = invert(vf, x0, name, nfe, sf)
        back = integrate(vf, z.x, name, nfe, sf)
        assert z.nfe == back.nfe == nfe
        inv_err.append(_err(z.x, noise))
        trip_err.append(_err(back.x, x0))
    assert abs(math.log2(inv_err[0] / inv_err[1]) - order) < 0.25, inv_err
    assert math.log2(trip_err[0] / trip_err[1]) > order - 0.2, trip_err  # symmetric errors partly cancel
    assert trip_err[0] < tol


def test_ba_with_the_oracle_sidenet_is_far_more_accurate(problem):
    mix, y, x0, noise = problem
    vf, sf = _fns(mix, y)
    calls = []

    def counted(x, t):
        calls.append(x.shape[0])
        return vf(x, t)

    z = invert(counted, x0, "ba", 8, sf)
    back = integrate(counted, z.x, "ba", 8, sf)
    assert (z.nfe, back.nfe, len(calls)) == (8, 8, 16)  # one NFE per anchor, each way
    assert z.side_calls == back.side_calls == 2 * 8 - 1
    torch.testing.assert_close(z.x, noise, rtol=0, atol=1e-7)
    torch.testing.assert_close(back.x, x0, rtol=0, atol=1e-8)
    heun = integrate(vf, invert(vf, x0, "heun", 8).x, "heun", 8)
    assert _err(back.x, x0) < 1e-5 * _err(heun.x, x0)


def test_reference_inversion_has_no_budget(problem):
    mix, y, x0, noise = problem
    vf, _ = _fns(mix, y)
    z = invert(vf, x0, "reference", rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z.x, noise, rtol=0, atol=1e-6)
    assert z.nfe > 0 and steps_for_budget("reference", None) == 1
    with pytest.raises(ValueError, match="adaptive"):
        invert(vf, x0, "reference", 10)


def test_inversion_with_guidance(problem):
    """CFG on the doubled batch counts one NFE per call; heun converges to the guided flow's noise."""
    mix, y, x0, _ = problem
    vf, sf = _fns(mix, y, cfg_scale=2.0, interval=None)
    exact = invert(vf, x0, "reference", rtol=1e-10, atol=1e-10).x
    batches = []

    def counted(x, t, labels):
        batches.append(x.shape[0])
        return mix.velocity(x, t, labels)

    vc, _ = build_sampling_fns(counted, y, null_class=mix.null_class, cfg_scale=2.0, interval=None)
    errors, trips = [], []
    for nfe in (20, 40):
        batches.clear()
        z = invert(vc, x0, "heun", nfe)
        assert z.nfe == nfe and batches == [12] * nfe  # (x, x) with labels (y, null): one call
        errors.append(_err(z.x, exact))
        trips.append(_err(integrate(vc, z.x, "heun", nfe).x, x0))
    assert math.log2(errors[0] / errors[1]) > 1.5, errors
    assert math.log2(trips[0] / trips[1]) > 1.8 and trips[1] < 2e-3, trips
    # The bi-anchor solver under guidance: still one NFE per anchor, and the round trip closes.
    trips = []
    for nfe in (5, 20):
        z = invert(vf, x0, "ba", nfe, sf)
        back = integrate(vf, z.x, "ba", nfe, sf)
        assert z.nfe == back.nfe == nfe
        trips.append(_err(back.x, x0))
    assert trips[1] < trips[0] / 4 and trips[1] < 0.01, trips


def test_edit_latents_follow_the_exact_flows(problem):
    """Invert under the source class, regenerate under source (identity) and target (exact transport)."""
    mix, y, x0, noise = problem
    target = (y + 1) % 3
    side = SimpleNamespace(velocity=mix.side_velocity)
    res = edit_latents(mix, side, x0, y, target, "ba", NO_GUIDANCE, nfe=8)
    torch.testing.assert_close(res.noise, noise, rtol=0, atol=1e-7)
    torch.testing.assert_close(res.reconstruction, x0, rtol=0, atol=1e-8)
    ones, zeros = torch.ones(6, dtype=F64), torch.zeros(6, dtype=F64)
    torch.testing.assert_close(res.edit, mix.transport(noise, ones, zeros, target), rtol=0, atol=1e-6)
    assert (res.nfe, res.side_calls) == (8, 15)
    # The edit lands near the target class's mean, not the source's.
    means = mix.means.reshape(3, *x0.shape[1:])
    assert _err(res.edit, means[target]) < _err(res.edit, means[y])
    with pytest.raises(ValueError, match="needs a SideNet"):
        edit_latents(mix, None, x0, y, target, "ba", NO_GUIDANCE, nfe=8)


def test_grids_and_budgets():
    shifted_up = solve_grid("heun", 8, "shift", shift=3.0, increasing=True)
    shifted_down = solve_grid("heun", 8, "shift", shift=3.0, increasing=False)
    torch.testing.assert_close(shifted_up, shifted_down.flip(0), rtol=0, atol=0)
    assert shifted_up.numel() == 5 and shifted_up[0] == 0.0 and shifted_up[-1] == 1.0
    explicit = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=F64)
    for given in (explicit, explicit.flip(0)):
        torch.testing.assert_close(solve_grid("euler", None, given, increasing=True), explicit, rtol=0, atol=0)
        torch.testing.assert_close(solve_grid("euler", 3, given, increasing=False), explicit.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(solve_grid("euler", 4, "uniform", increasing=False), uniform_grid(4, dtype=F64))
    with pytest.raises(ValueError, match="spends 6 NFE"):
        solve_grid("heun", 4, explicit, increasing=True)
    with pytest.raises(ValueError, match="nearest: 6 or 8"):
        steps_for_budget("heun", 7)
    with pytest.raises(ValueError, match="needs an NFE budget"):
        steps_for_budget("euler", None)
    with pytest.raises(ValueError, match="between t = 0 and t = 1"):
        solve_grid("euler", None, torch.tensor([0.1, 0.5, 1.0]), increasing=True)
    with pytest.raises(ValueError, match="needs side_fn"):
        invert(lambda x, t: -x, torch.zeros(2, 3), "ba", 4)
