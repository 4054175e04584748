"""The grid-aware SideNet loss on the analytic Gaussian-mixture backbone."""

import pytest
import torch

from bafm.models.anchor_features import plain_anchor
from bafm.models.analytic import GaussianMixtureFlow
from bafm.solvers.bi_anchor import LOBATTO_ALPHA
from bafm.training.grid_loss import grid_chain_loss


@pytest.fixture
def flow():
    return GaussianMixtureFlow.random((1, 4, 4), num_classes=3, components_per_class=1,
                                      std=0.4, generator=torch.Generator().manual_seed(0))


def _batch(flow):
    y = torch.tensor([0, 1, 2, 0, 1, 2, 1, 0])  # single-component classes: closed-form oracle
    return flow.sample_data(8, y, generator=torch.Generator().manual_seed(3)), y


def test_the_oracle_scores_zero_and_reusing_v_scores_its_identity_error(flow):
    x0, y = _batch(flow)
    anchor = plain_anchor(flow.velocity)
    oracle, _ = grid_chain_loss(anchor, flow.side_velocity, x0, y, [2, 3], 3, torch.Generator().manual_seed(4))
    identity, stats = grid_chain_loss(anchor, lambda x, v, t, h, y: v, x0, y, [2, 3], 3,
                                      torch.Generator().manual_seed(4))
    assert float(oracle) < 1e-8  # only the GL transport's round-off remains
    assert float(identity) > 1e-3
    torch.testing.assert_close(identity, stats["mse_identity"])  # reusing v is the identity estimate


def test_each_link_asks_for_the_four_probes_of_a_ba_step_on_the_drawn_grid(flow):
    x0, y = _batch(flow)
    seen = []

    def recording_side(x, v, t, h, y_):
        seen.append((t.clone(), h.clone()))
        return flow.side_velocity(x, v, t, h, y_)

    grid_chain_loss(plain_anchor(flow.velocity), recording_side, x0, y, [4], 2, torch.Generator().manual_seed(5))
    # Per link: the GL transport (3 nodes x 3 offsets), the forward probes, the backward probe.
    forward = [h for t, h in seen if h.numel() == 3 * 8 and bool((h >= 0).all())]
    backward = [(t, h) for t, h in seen if h.numel() == 8 and bool((h <= 0).all())]
    assert len(backward) == 2
    for t, h in backward:
        # Grid times of a 4-step grid, and -alpha * H with H = 1/4 (or less where t hits 0).
        active = t > 0
        torch.testing.assert_close(h[active], torch.full_like(h[active], -LOBATTO_ALPHA / 4))
        assert torch.allclose(t * 4, torch.round(t * 4), atol=1e-6)
    assert len(forward) == 2
    for h in forward:
        a, b, e = h.chunk(3)
        torch.testing.assert_close(a[e > 0], LOBATTO_ALPHA * e[e > 0])
        torch.testing.assert_close(b[e > 0], (1 - LOBATTO_ALPHA) * e[e > 0])
        torch.testing.assert_close(e[e > 0], torch.full_like(e[e > 0], 0.25))


def test_only_the_sidenet_gets_gradients(flow):
    x0, y = _batch(flow)
    weight = torch.zeros((), requires_grad=True)

    def side(x, v, t, h, y_):
        return v + h.view(-1, 1, 1, 1) * weight * x

    loss, _ = grid_chain_loss(plain_anchor(flow.velocity), side, x0, y, [3, 5], 2, torch.Generator().manual_seed(6))
    loss.backward()
    assert weight.grad is not None and float(weight.grad.abs()) > 0
