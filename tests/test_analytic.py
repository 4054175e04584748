"""Exact Gaussian-mixture flow: velocity, endpoints, sampling, transport and oracle SideNet."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

from bafm.models.analytic import GaussianMixtureFlow
from bafm.solvers import get_solver

F64 = torch.float64
SHAPE = (2, 3, 3)


def _mixture(components_per_class=2):
    gen = torch.Generator().manual_seed(0)
    k = 3 * components_per_class
    means = torch.randn(k, *SHAPE, generator=gen, dtype=F64)
    stds = 0.3 + 0.4 * torch.rand(k, *SHAPE, generator=gen, dtype=F64)  # diagonal
    weights = 0.5 + torch.rand(k, generator=gen, dtype=F64)
    groups = [list(range(c * components_per_class, (c + 1) * components_per_class)) for c in range(3)]
    return GaussianMixtureFlow(means, stds, weights, groups), means, stds, weights, groups


def log_density(x, t, means, stds, weights, components):
    """log p_t(x) of the noised mixture restricted to ``components``, per sample."""
    a = 1.0 - t
    logs = []
    for k in components:
        scale = (a**2 * stds[k] ** 2 + t**2).sqrt()
        logs.append(weights[k].log() + Normal(a * means[k], scale).log_prob(x).flatten(1).sum(1))
    return torch.logsumexp(torch.stack(logs, 1), 1) - weights[components].sum().log()


@pytest.mark.parametrize("label", [0, 2, 3])  # 3 = null class (all components)
@pytest.mark.parametrize("t", [0.1, 0.45, 0.9])
def test_velocity_matches_the_score_identity(label, t):
    # For x_t = (1 - t) x0 + t eps: v = -(x + t * score) / (1 - t), score from autograd.
    mix, means, stds, weights, groups = _mixture()
    components = list(range(6)) if label == 3 else groups[label]
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=F64).requires_grad_(True)
    tt = torch.tensor(t, dtype=F64)
    score = torch.autograd.grad(log_density(x, tt, means, stds, weights, components).sum(), x)[0]
    expected = -(x.detach() + t * score) / (1.0 - t)
    v = mix.velocity(x.detach(), torch.full((5,), t, dtype=F64), torch.full((5,), label))
    torch.testing.assert_close(v, expected, rtol=1e-10, atol=1e-10)


def test_velocity_is_exact_and_continuous_at_the_endpoints():
    mix, means, _, weights, groups = _mixture()
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=F64)
    y = torch.tensor([0, 1, 2, 3])
    # t = 0: v = E[eps] - x0 = -x.
    torch.testing.assert_close(mix.velocity(x, torch.zeros(4, dtype=F64), y), -x, rtol=0, atol=1e-14)
    # t = 1: x_1 is independent of the component, v = x - (prior mean of the class).
    prior_mean = []
    for label in y.tolist():
        comps = list(range(6)) if label == 3 else groups[label]
        w = weights[comps] / weights[comps].sum()
        prior_mean.append((w.view(-1, 1, 1, 1) * means[comps]).sum(0))
    at_one = mix.velocity(x, torch.ones(4, dtype=F64), y)
    torch.testing.assert_close(at_one, x - torch.stack(prior_mean), rtol=0, atol=1e-14)
    for t in (0.0, 1.0):
        at = mix.velocity(x, torch.full((4,), t, dtype=F64), y)
        near = mix.velocity(x, torch.full((4,), abs(t - 1e-9), dtype=F64), y)
        torch.testing.assert_close(near, at, rtol=0, atol=1e-7)


def test_velocity_and_expected_data_agree():
    mix, *_ = _mixture()
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=F64)
    t = torch.tensor([0.2, 0.5, 1.0], dtype=F64)
    expected = (x - mix.expected_data(x, t, 1)) / t.view(-1, 1, 1, 1)
    torch.testing.assert_close(mix.velocity(x, t, 1), expected, rtol=1e-12, atol=1e-12)


def test_velocity_keeps_float32():
    mix, *_ = _mixture()
    x = torch.randn(2, *SHAPE)
    v = mix.velocity(x, torch.tensor([0.3, 0.6]), torch.tensor([0, 1]))
    assert v.dtype == torch.float32
    v64 = mix.velocity(x.double(), torch.tensor([0.3, 0.6], dtype=F64), torch.tensor([0, 1]))
    torch.testing.assert_close(v, v64.float())


def test_sample_data_statistics_and_classes():
    means = torch.tensor([[-2.0], [1.0], [4.0]])
    stds, weights = torch.tensor([0.5, 0.2, 1.0]), torch.tensor([1.0, 3.0, 1.0])
    mix = GaussianMixtureFlow(means, stds, weights, [[0, 1], [2]])
    gen = torch.Generator().manual_seed(0)
    n = 20000
    a = mix.sample_data(n, 0, gen)  # components 0 and 1, weights 1:3
    mean = 0.25 * -2.0 + 0.75 * 1.0
    var = 0.25 * (0.25 + 4.0) + 0.75 * (0.04 + 1.0) - mean**2
    assert abs(a.mean().item() - mean) < 4 * (var / n) ** 0.5
    assert abs(a.var().item() - var) < 0.05 * var
    b = mix.sample_data(n, 1, gen)
    assert abs(b.mean().item() - 4.0) < 0.04 and abs(b.std().item() - 1.0) < 0.02
    first = mix.sample_data(8, None, torch.Generator().manual_seed(5))
    again = mix.sample_data(8, None, torch.Generator().manual_seed(5))
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_flow_carries_noise_to_the_data_distribution():
    mix = GaussianMixtureFlow(torch.tensor([[-1.5], [2.0]]), torch.tensor([0.3, 0.6]), torch.tensor([2.0, 1.0]))
    noise = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    data = get_solver("reference")(lambda x, t: mix.velocity(x, t), noise, [1.0, 0.0], rtol=1e-6, atol=1e-6).x
    mean = (2.0 * -1.5 + 2.0) / 3.0
    var = (2.0 * (0.09 + 2.25) + (0.36 + 4.0)) / 3.0 - mean**2
    assert abs(data.mean().item() - mean) < 4 * (var / 4000) ** 0.5
    assert abs(data.var().item() - var) < 0.08 * var
    assert abs((data < 0.25).double().mean().item() - 2.0 / 3.0) < 0.03  # mass of the left component


@pytest.mark.parametrize("components_per_class", [1, 2])
def test_transport_follows_the_ode(components_per_class):
    mix, *_ = _mixture(components_per_class)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=F64)
    y = torch.tensor([0, 1, 2, 0])
    t, s = torch.full((4,), 0.9, dtype=F64), torch.full((4,), 0.15, dtype=F64)
    vf = lambda x, tt: mix.velocity(x, tt, y)  # noqa: E731
    ref = get_solver("reference")(vf, x, [0.9, 0.15], rtol=1e-10, atol=1e-10).x
    torch.testing.assert_close(mix.transport(x, t, s, y), ref, rtol=0, atol=1e-8)


@pytest.mark.parametrize("components_per_class", [1, 2])  # closed-form and RK4 transport
def test_oracle_side_velocity_is_the_slope_of_the_trajectory(components_per_class):
    # Independent of ``transport``: integrate the ODE from (x, t) with dopri5 to t - h -+ delta and
    # take the central difference, d x(s) / ds at s = t - h (error ~ delta^2).
    mix, *_ = _mixture(components_per_class)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=F64)
    y = torch.tensor([2, 0, 1])
    t, h = torch.tensor([0.8, 0.5, 0.3], dtype=F64), torch.tensor([0.3, -0.2, 0.25], dtype=F64)
    v = mix.velocity(x, t, y)
    torch.testing.assert_close(mix.side_velocity(x, v, t, torch.zeros(3, dtype=F64), y), v, rtol=0, atol=1e-14)
    delta, slopes = 1e-4, []
    for i in range(3):
        vf = lambda xx, tt, i=i: mix.velocity(xx, tt, y[i : i + 1])  # noqa: E731
        node = float(t[i] - h[i])
        ends = [get_solver("reference")(vf, x[i : i + 1], [float(t[i]), s], rtol=1e-12, atol=1e-12).x
                for s in (node + delta, node - delta)]
        slopes.append((ends[0] - ends[1]) / (2 * delta))
    torch.testing.assert_close(mix.side_velocity(x, v, t, h, y), torch.cat(slopes), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"means": torch.zeros(2, 3), "stds": 0.0}, "stds"),
        ({"means": torch.zeros(2, 3), "stds": torch.ones(3)}, "stds"),
        ({"means": torch.zeros(2, 3), "stds": 1.0, "weights": torch.tensor([1.0, -1.0])}, "weights"),
        ({"means": torch.zeros(2, 3), "stds": 1.0, "class_components": [[0], [2]]}, "class_components"),
        ({"means": torch.zeros(3), "stds": 1.0}, "means"),
    ],
)
def test_bad_parameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixtureFlow(**kwargs)


def test_bad_labels_are_rejected():
    mix, *_ = _mixture()
    with pytest.raises(ValueError, match="labels"):
        mix.velocity(torch.zeros(2, *SHAPE, dtype=F64), torch.zeros(2, dtype=F64), torch.tensor([0, 4]))
