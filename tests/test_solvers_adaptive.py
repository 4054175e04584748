"""ba-adaptive: the accept/reject controller, NFE accounting with rejections, per-sample steps."""

from __future__ import annotations

import pytest
import torch

from bafm.models.analytic import GaussianMixtureFlow
from bafm.models.guidance import build_sampling_fns
from bafm.solvers import get_solver
from bafm.solvers.grids import uniform_grid
from test_solvers_order import Counter  # independent call counter

F64 = torch.float64
# dx/dt = a x per sample: x(t) = x(1) e^{a (t - 1)}; a stiffer sample needs smaller steps.
RATES = torch.tensor([0.5, 2.0, 6.0], dtype=F64)
X1 = torch.tensor([[1.0, -2.0], [0.5, 1.5], [-1.0, 0.3]], dtype=F64)


def linear_field(x, t):
    return RATES[: x.shape[0], None] * x


def identity_side(x, v, t, h):
    # With the identity SideNet the predictor is Euler and the corrector Heun.
    return v


def exact(x1, t_end, rates=RATES):
    return x1 * torch.exp(rates[: x1.shape[0], None] * (t_end - 1.0))



def test_controller_accepts_below_one_rejects_above_and_rescales_the_step():
    trace = []
    res = get_solver("ba-adaptive")(linear_field, X1, uniform_grid(1, dtype=F64), side_fn=identity_side,
                                    rtol=1e-4, atol=1e-4, first_step=0.5, max_nfe=200, trace=trace,
                                    error_order=1)  # the Euler/Heun pair of the identity SideNet
    active = torch.stack([a["active"] for a in trace])
    accepted = torch.stack([a["accepted"] for a in trace])
    err = torch.stack([a["err"] for a in trace])
    h = torch.stack([a["h"] for a in trace])
    # Accepted exactly when the error norm is at most 1 (no sample hit max_nfe here).
    assert torch.equal(accepted, active & (err <= 1.0))
    assert bool((active & ~accepted).any()), "a first step of 0.5 must be rejected at this tolerance"
    # The stiffest sample rejects its first step: the next attempt restarts from t = 1 with
    # h * clamp(0.9 err^-1/2, 0.2, 1).
    assert not accepted[0, 2] and trace[1]["t"][2].item() == 1.0
    expected = 0.5 * min(1.0, max(0.2, 0.9 * err[0, 2].item() ** -0.5))
    assert h[1, 2].item() == pytest.approx(expected, rel=1e-12)
    # After an accepted step the size grows by the same rule, capped at 4 (unless the end is near).
    for k in range(len(trace) - 1):
        for b in range(3):
            if accepted[k, b] and active[k + 1, b]:
                grow = h[k, b].item() * min(4.0, max(0.2, 0.9 * err[k, b].item() ** -0.5))
                assert h[k + 1, b].item() == pytest.approx(min(grow, trace[k + 1]["t"][b].item()), rel=1e-12)
    # Known solution: the error is controlled, and tighter tolerances cost more and err less.
    assert (res.x - exact(X1, 0.0)).abs().max().item() < 1e-2
    loose = get_solver("ba-adaptive")(linear_field, X1, uniform_grid(1, dtype=F64), side_fn=identity_side,
                                      rtol=1e-2, atol=1e-2, max_nfe=200, error_order=1)
    assert (loose.nfe_per_sample < res.nfe_per_sample).all()
    assert (loose.x - exact(X1, 0.0)).abs().max() > (res.x - exact(X1, 0.0)).abs().max()


def test_nfe_counts_rejected_steps_and_samples_do_not_depend_on_the_batch():
    trace = []
    counter = Counter(linear_field)
    res = get_solver("ba-adaptive")(counter, X1, uniform_grid(1, dtype=F64), side_fn=identity_side,
                                    rtol=1e-4, atol=1e-4, first_step=0.5, trace=trace)
    assert res.nfe == counter.calls == 1 + len(trace)
    active = torch.stack([a["active"] for a in trace])
    accepted = torch.stack([a["accepted"] for a in trace])
    rejected = (active & ~accepted).sum(0)
    # Per sample: the start, every accepted and every rejected attempt.
    assert res.nfe_per_sample.tolist() == (1 + accepted.sum(0) + rejected).tolist()
    assert rejected.sum() > 0 and res.nfe == int(res.nfe_per_sample.max())
    assert res.mean_nfe() == pytest.approx(res.nfe_per_sample.double().mean().item())
    for b in range(3):
        rates = RATES[b : b + 1]
        alone_counter = Counter(lambda x, t: rates[:, None] * x)
        alone = get_solver("ba-adaptive")(alone_counter, X1[b : b + 1], uniform_grid(1, dtype=F64),
                                          side_fn=identity_side, rtol=1e-4, atol=1e-4, first_step=0.5)
        assert alone.nfe == alone_counter.calls == res.nfe_per_sample[b].item()
        torch.testing.assert_close(alone.x, res.x[b : b + 1], rtol=0, atol=1e-14)


def test_max_nfe_caps_every_sample_and_still_lands_on_the_end():
    res = get_solver("ba-adaptive")(linear_field, X1, uniform_grid(1, dtype=F64), side_fn=identity_side,
                                    rtol=1e-8, atol=1e-8, max_nfe=4)
    assert res.nfe_per_sample.tolist() == [4, 4, 4] and res.nfe == 4
    # The least stiff sample is still close after two steps and a forced jump to t = 0.
    assert torch.isfinite(res.x).all() and (res.x[0] - exact(X1, 0.0)[0]).abs().max() < 0.05


def test_oracle_sidenet_takes_few_large_steps_on_the_mixture_flow():
    gen = torch.Generator().manual_seed(0)
    mix = GaussianMixtureFlow.random((2, 2, 2), num_classes=2, components_per_class=1, std=0.5, generator=gen)
    y = torch.tensor([0, 1, 0, 1])
    vf, sf = build_sampling_fns(mix.velocity, y, null_class=mix.null_class, side_velocity=mix.side_velocity)
    noise = torch.randn(4, 2, 2, 2, generator=gen, dtype=F64)
    truth = mix.transport(noise, torch.ones(4, dtype=F64), torch.zeros(4, dtype=F64), y)
    errors, costs = [], []
    for tol in (1e-3, 1e-6):
        res = get_solver("ba-adaptive")(vf, noise, uniform_grid(1, dtype=F64), side_fn=sf, rtol=tol, atol=tol)
        errors.append((res.x - truth).abs().max().item())
        costs.append(res.mean_nfe())
    # Measured: error 3.1e-3 at 3 NFE, 2.8e-5 at 9 NFE.
    assert errors[1] < errors[0] / 10 and errors[0] < 1e-2 and costs[0] < costs[1] <= 12, (errors, costs)


def test_inversion_grid_runs_toward_noise():
    res = get_solver("ba-adaptive")(linear_field, X1, uniform_grid(1, dtype=F64).flip(0), side_fn=identity_side,
                                    rtol=1e-5, atol=1e-5, max_nfe=5000)
    truth = X1 * torch.exp(RATES[:, None])  # from t = 0 to t = 1
    assert (res.nfe_per_sample < 5000).all()
    assert ((res.x - truth).abs() / truth.abs()).max().item() < 1e-2


@pytest.mark.parametrize(
    "options, message",
    [({"rtol": 0.0}, "rtol must be > 0"), ({"max_nfe": 1}, "max_nfe must be an int >= 2"),
     ({"first_step": 1.5}, "first_step"), ({"min_factor": 2.0}, "need 0 < min_factor"), ({"error_order": 0}, "error_order")],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=f"solver 'ba-adaptive': {message}"):
        get_solver("ba-adaptive")(linear_field, X1, uniform_grid(1, dtype=F64), side_fn=identity_side, **options)
    with pytest.raises(ValueError, match="needs side_fn"):
        get_solver("ba-adaptive")(linear_field, X1, uniform_grid(1, dtype=F64))
