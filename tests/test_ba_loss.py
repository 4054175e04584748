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
    identity, _ = chain_loss(flow.velocity, lambda x, v, t, h, y: v, x0, y, cfg, torch.Generator().manual_seed(4))
    assert float(oracle) < 1e-8  # only the 6th-order GL error of the rollout remains
    assert float(identity) > 1e-4


def _linear_side(drift, weight):
    """``S(x, v, t, h) = v + h * (drift + weight * x)``, linear in ``h``."""
    return lambda x, v, t, h, y: v + h.view(-1, 1, 1, 1) * (drift + weight * x)


def test_chain_loss_matches_a_hand_rollout_and_only_the_sidenet_gets_gradients(flow):
    # The backbone carries a parameter of its own: it must get no gradient (called without grad).
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    backbone = lambda x, t, y: scale * flow.velocity(x, t, y)  # noqa: E731
    drift = 0.3 * torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    weight = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    x0 = flow.sample_data(4, y, generator=torch.Generator().manual_seed(5))
    cfg = ChainLossConfig(links=3, offset_rate=10.0, p_backward=0.5)
    loss, stats = chain_loss(backbone, _linear_side(drift, weight), x0, y, cfg, torch.Generator().manual_seed(6))
    loss.backward()
    assert scale.grad is None

    # By hand: the GL rule integrates the estimate, linear in h, exactly:
    # x(t - h) = x - h v - h^2 (drift + weight x) / 2; the prediction v + h (drift + weight x) has
    # d / d weight = h x when the rollout state carries no gradient.
    g = torch.Generator().manual_seed(6)  # chain_loss draws t, the noise, then one h per link
    t = torch.rand(4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * noise
    v = flow.velocity(x, t, y)
    losses, baselines, grads = [], [], []
    for _ in range(cfg.links):
        h = sample_signed_offsets(t, cfg.offset_rate, cfg.p_backward, generator=g)
        hb = h.view(-1, 1, 1, 1)
        slope = drift + weight.detach() * x
        x_next = x - hb * v - hb**2 * slope / 2
        target = flow.velocity(x_next, t - h, y)
        residual = v + hb * slope - target
        losses.append(residual.square().mean())
        baselines.append((v - target).square().mean())
        grads.append((2 * residual * hb * x).mean())
        x, v, t = x_next, target, t - h
    # The loss's MSE is taken in float32.
    torch.testing.assert_close(loss.detach(), torch.stack(losses).mean().float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats["mse_identity"], torch.stack(baselines).mean().float(), rtol=1e-5, atol=0)
    # Gradients flow through the predictions only, not through the no-grad GL rollout.
    torch.testing.assert_close(weight.grad, torch.stack(grads).mean(), rtol=1e-5, atol=0)
