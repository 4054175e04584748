"""The BA chain-rollout loss on the analytic Gaussian-mixture backbone."""

import math

import pytest
import torch

from bafm.models.analytic import GaussianMixtureFlow
from bafm.training.ba_loss import (
    GL3_NODES,
    GL3_WEIGHTS,
    ChainLossConfig,
    chain_loss,
    gauss_legendre_step,
    sample_signed_offsets,
)


def test_gauss_legendre_rule_is_exact_to_degree_five():
    for degree in range(6):
        quad = sum(w * c**degree for c, w in zip(GL3_NODES, GL3_WEIGHTS))
        assert quad == pytest.approx(1.0 / (degree + 1), abs=1e-14)


def test_offsets_stay_inside_the_unit_interval_and_follow_the_sign_rate():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(200_000, generator=g, dtype=torch.float64)
    h = sample_signed_offsets(t, rate=50.0, p_backward=0.3, generator=g)
    s = t - h
    assert bool(((s >= 0) & (s <= 1)).all())
    assert float((h < 0).double().mean()) == pytest.approx(0.3, abs=0.01)
    # Away from the boundaries the truncation is negligible: mean |h| = 1 / rate.
    middle = (t > 0.3) & (t < 0.7)
    assert float(h[middle].abs().mean()) == pytest.approx(1.0 / 50.0, rel=0.02)


def test_offsets_truncated_at_the_boundary():
    g = torch.Generator().manual_seed(1)
    t = torch.full((50_000,), 0.01, dtype=torch.float64)
    h = sample_signed_offsets(t, rate=50.0, p_backward=0.0, generator=g)
    assert bool((h <= 0.01).all()) and bool((h >= 0).all())
    # Exp(50) truncated to [0, 0.01]: mean = 1/rate - d / (exp(rate d) - 1).
    expected = 1 / 50 - 0.01 / math.expm1(0.5)
    assert float(h.mean()) == pytest.approx(expected, rel=0.02)


@pytest.fixture
def flow():
    return GaussianMixtureFlow.random((1, 4, 4), num_classes=3, components_per_class=1,
                                      std=0.4, generator=torch.Generator().manual_seed(0))


def test_gauss_legendre_step_with_oracle_is_the_exact_transport(flow):
    g = torch.Generator().manual_seed(2)
    y = torch.tensor([0, 1, 2, 3])
    x = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3, 0.6], dtype=torch.float64)
    h = torch.tensor([0.05, -0.04, 0.02, 0.03], dtype=torch.float64)
    v = flow.velocity(x, t, y)
    moved = gauss_legendre_step(flow.side_velocity, x, v, t, h, y)
    torch.testing.assert_close(moved, flow.transport(x, t, t - h, y), rtol=0, atol=1e-9)


def test_chain_loss_is_zero_for_the_oracle_and_positive_for_identity(flow):
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 1, 0])  # single-component classes: closed-form oracle
    x0 = flow.sample_data(8, y, generator=g)
    cfg = ChainLossConfig(links=3, offset_rate=10.0, p_backward=0.5)
    oracle, _ = chain_loss(flow.velocity, flow.side_velocity, x0, y, cfg, torch.Generator().manual_seed(4))
    identity, stats = chain_loss(flow.velocity, lambda x, v, t, h, y: v, x0, y, cfg,
                                 torch.Generator().manual_seed(4))
    assert float(oracle) < 1e-8  # only the 6th-order GL error of the rollout remains
    assert float(identity) > 1e-4
    # For the identity SideNet the loss is exactly the "reuse v" baseline it reports.
    torch.testing.assert_close(identity, stats["mse_identity"])


def test_chain_loss_only_the_sidenet_gets_gradients(flow):
    flow = flow.float()
    weight = torch.zeros((), requires_grad=True)

    def side(x, v, t, h, y):
        return v + weight * h.view(-1, 1, 1, 1) * x

    y = torch.tensor([0, 1, 2, 3])
    x0 = flow.sample_data(4, y, generator=torch.Generator().manual_seed(5)).float()
    loss, _ = chain_loss(flow.velocity, side, x0, y, ChainLossConfig(links=2), torch.Generator().manual_seed(6))
    loss.backward()
    assert weight.grad is not None and float(weight.grad.abs()) > 0
    assert all(b.grad is None for b in flow.buffers())
