"""Classifier-free guidance closures: interval, batching, raw pairs for the SideNet, NFE."""

from __future__ import annotations

import math

import pytest
import torch

from bafm.models.guidance import build_sampling_fns, guidance_active
from bafm.solvers import get_solver
from bafm.solvers.grids import uniform_grid

F64 = torch.float64
NULL = 5
Y = torch.tensor([0, 3, 1])
X = torch.tensor([[0.3, -1.2, 0.8], [1.1, 0.4, -0.6], [-0.7, 0.9, 0.1]], dtype=F64)
ALPHA = (5.0 - math.sqrt(5.0)) / 10.0


class Backbone:
    """Label-dependent toy backbone that records each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.tolist()))
        return torch.sin(x) * (1.0 + t[:, None]) - 0.3 * x + 0.2 * (y[:, None] + 1.0)


class SideNet:
    """Label-dependent toy SideNet (``S(x, v, t, 0) = v``) that records each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, v, t, h, y):
        self.calls.append({"x": x, "v": v, "t": t, "h": h, "y": y})
        return v + h[:, None] * (torch.tanh(x) * t[:, None] + 0.1 * y[:, None]) + h[:, None] ** 2 * torch.cos(v)


def full(value, n=3):
    return torch.full((n,), value, dtype=F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interval_edges(dtype):
    lo, hi = 0.1, 0.7
    hi_t, lo_t = torch.tensor(hi, dtype=dtype), torch.tensor(lo, dtype=dtype)
    one = torch.tensor(1.0, dtype=dtype)
    t = torch.stack([hi_t, torch.nextafter(hi_t, one), lo_t, torch.nextafter(lo_t, one), 0 * one, one])
    assert guidance_active(t, (lo, hi)).tolist() == [True, False, False, True, False, False]
    assert guidance_active(t, None).all()


def test_guided_velocity_switches_exactly_at_the_interval_edges():
    backbone = Backbone()
    vf, _ = build_sampling_fns(backbone, Y, null_class=NULL, cfg_scale=2.0, interval=(0.1, 0.7))
    x = X.to(torch.float32)
    hi = torch.tensor(0.7, dtype=torch.float32)
    t = torch.stack([hi, torch.nextafter(hi, torch.tensor(1.0)), torch.tensor(0.1)])  # per-sample times
    v = vf(x, t)
    v_c = backbone(x, t, Y)
    v_u = backbone(x, t, torch.full_like(Y, NULL))
    torch.testing.assert_close(v[0], v_u[0] + 2.0 * (v_c[0] - v_u[0]))
    torch.testing.assert_close(v[1:], v_c[1:], rtol=0, atol=0)


def test_no_guidance_means_plain_conditional_calls():
    backbone, sidenet = Backbone(), SideNet()
    for scale, interval in [(1.0, (0.0, 0.7)), (1.5, (0.4, 0.4))]:
        vf, sf = build_sampling_fns(
            backbone, Y, null_class=NULL, cfg_scale=scale, interval=interval, side_velocity=sidenet
        )
        backbone.calls.clear()
        v = vf(X, full(0.5))
        assert backbone.calls == [(3, Y.tolist())]
        torch.testing.assert_close(v, backbone(X, full(0.5), Y), rtol=0, atol=0)
        h = [full(0.1), full(0.2), full(0.3)]
        before = len(sidenet.calls)
        estimates = sf.probe(X, v, full(0.5), h)
        assert len(sidenet.calls) == before + 1 and sidenet.calls[-1]["y"].tolist() == Y.tolist() * 3
        for est, hk in zip(estimates, h):
            torch.testing.assert_close(est, sidenet(X, v, full(0.5), hk, Y), rtol=0, atol=1e-15)


def test_guided_call_is_one_doubled_batch_and_skipped_outside_the_interval():
    backbone = Backbone()
    vf, _ = build_sampling_fns(backbone, Y, null_class=NULL, cfg_scale=1.5, interval=(0.0, 0.7))
    v = vf(X, full(0.5))
    assert backbone.calls == [(6, Y.tolist() + [NULL] * 3)]
    v_c, v_u = backbone(X, full(0.5), Y), backbone(X, full(0.5), torch.full_like(Y, NULL))
    torch.testing.assert_close(v, v_u + 1.5 * (v_c - v_u), rtol=0, atol=1e-15)
    backbone.calls.clear()
    torch.testing.assert_close(vf(X, full(0.9)), backbone(X, full(0.9), Y), rtol=0, atol=0)
    assert backbone.calls[0] == (3, Y.tolist())  # t = 0.9 > hi: conditional batch only


def test_nfe_counts_a_doubled_call_once():
    backbone = Backbone()
    vf, _ = build_sampling_fns(backbone, Y, null_class=NULL, cfg_scale=1.5, interval=None)
    res = get_solver("heun")(vf, X, uniform_grid(4, dtype=F64))
    assert res.nfe == len(backbone.calls) == 8
    assert {batch for batch, _ in backbone.calls} == {6}


def guided_ba_by_hand(backbone, sidenet, x, grid, scale, lo, hi):
    """BA with the backbone and SideNet on doubled batches and per-node guidance."""
    n = x.shape[0]
    labels = torch.cat([Y, torch.full_like(Y, NULL)])

    def combine(c, u, t):
        on = ((t > lo) & (t <= hi))[:, None]
        return torch.where(on, u + scale * (c - u), c)

    def raw(x, t):
        out = backbone(torch.cat([x, x]), torch.cat([t, t]), labels)
        return out[:n], out[n:]

    def node(x, v_c, v_u, t, h):
        out = sidenet(torch.cat([x, x]), torch.cat([v_c, v_u]), torch.cat([t, t]), torch.cat([h, h]), labels)
        return combine(out[:n], out[n:], t - h)

    ts = grid.tolist()
    v_c, v_u = raw(x, full(ts[0], n))
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        h = t - s
        v = combine(v_c, v_u, full(t, n))
        v_a = node(x, v_c, v_u, full(t, n), full(ALPHA * h, n))
        v_b = node(x, v_c, v_u, full(t, n), full((1 - ALPHA) * h, n))
        v_e = node(x, v_c, v_u, full(t, n), full(h, n))
        x_pred = x - h * (v / 12 + 5 * v_a / 12 + 5 * v_b / 12 + v_e / 12)
        if i == len(ts) - 2:
            return x_pred
        v_c, v_u = raw(x_pred, full(s, n))
        v_next = combine(v_c, v_u, full(s, n))
        v_b = node(x_pred, v_c, v_u, full(s, n), full(-ALPHA * h, n))
        x = x - h * (v / 12 + 5 * v_a / 12 + 5 * v_b / 12 + v_next / 12)


@pytest.mark.parametrize(
    "grid", [uniform_grid(6, dtype=F64), torch.tensor([1.0, 0.75, 0.7, 0.3, 0.0], dtype=F64)]
)
def test_guided_ba_equals_hand_written_doubled_batch_loop(grid):
    backbone, sidenet = Backbone(), SideNet()
    vf, sf = build_sampling_fns(
        backbone, Y, null_class=NULL, cfg_scale=1.5, interval=(0.0, 0.7), side_velocity=sidenet
    )
    res = get_solver("ba")(vf, X, grid, side_fn=sf)
    steps = len(grid) - 1
    assert res.nfe == len(backbone.calls) == steps and res.side_calls == len(sidenet.calls) == 2 * steps - 1
    # One SideNet call per probe: 3 offsets x (cond, uncond) x B rows forward, 2 x B backward.
    assert [c["x"].shape[0] for c in sidenet.calls] == [18, 6] * (steps - 1) + [18]
    # The SideNet saw the raw conditional and unconditional velocities of the anchor.
    first = sidenet.calls[0]
    raw = backbone(torch.cat([X, X]), full(1.0, 6), torch.cat([Y, torch.full_like(Y, NULL)]))
    torch.testing.assert_close(first["v"], torch.cat([raw] * 3), rtol=0, atol=0)
    assert first["y"].tolist() == (Y.tolist() + [NULL] * 3) * 3
    torch.testing.assert_close(
        res.x, guided_ba_by_hand(backbone, sidenet, X, grid, 1.5, 0.0, 0.7), rtol=0, atol=1e-12
    )


def test_guided_ba_single_uses_node_times():
    backbone, sidenet = Backbone(), SideNet()
    vf, sf = build_sampling_fns(
        backbone, Y, null_class=NULL, cfg_scale=2.0, interval=(0.2, 0.6), side_velocity=sidenet
    )
    grid = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    res = get_solver("ba-single")(vf, X, grid, side_fn=sf, nodes=2)
    labels = torch.cat([Y, torch.full_like(Y, NULL)])
    x = X
    for t, s in [(1.0, 0.5), (0.5, 0.0)]:
        h = t - s
        out = backbone(torch.cat([x, x]), full(t, 6), labels)
        v_c, v_u = out[:3], out[3:]
        v_bar = 0
        for c in (0.5 - math.sqrt(3) / 6, 0.5 + math.sqrt(3) / 6):
            est = sidenet(torch.cat([x, x]), torch.cat([v_c, v_u]), full(t, 6), full(c * h, 6), labels)
            guided = t - c * h > 0.2 and t - c * h <= 0.6
            v_bar = v_bar + 0.5 * (est[3:] + 2.0 * (est[:3] - est[3:]) if guided else est[:3])
        x = x - h * v_bar
    torch.testing.assert_close(res.x, x, rtol=0, atol=1e-12)


def test_side_fn_rejects_a_velocity_not_from_its_velocity_fn():
    vf, sf = build_sampling_fns(Backbone(), Y, null_class=NULL, cfg_scale=1.5, side_velocity=SideNet())
    v = vf(X, full(0.5))
    sf(X, v, full(0.5), full(0.1))  # fine
    with pytest.raises(ValueError, match="paired velocity_fn"):
        sf(X, v.clone(), full(0.5), full(0.1))
    with pytest.raises(ValueError, match="paired velocity_fn"):
        sf(X, v * 1.0, full(0.5), full(0.1))  # arithmetic gives a plain tensor, without the raw pair


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="int64"):
        build_sampling_fns(Backbone(), Y.float(), null_class=NULL)
    with pytest.raises(ValueError, match="interval"):
        build_sampling_fns(Backbone(), Y, null_class=NULL, interval=(0.8, 0.2))
    vf, _ = build_sampling_fns(Backbone(), Y, null_class=NULL)
    with pytest.raises(ValueError, match="batch 3"):
        vf(X[:2], full(0.5, 2))
