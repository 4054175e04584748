"""BA-solver and its single-anchor ablation: exact step algebra, NFE, oracle accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from bafm.models.analytic import GaussianMixtureFlow
from bafm.models.guidance import build_sampling_fns
from bafm.solvers import get_solver
from bafm.solvers.bi_anchor import gauss_legendre
from bafm.solvers.grids import shifted_grid, uniform_grid

F64 = torch.float64
ALPHA = (5.0 - math.sqrt(5.0)) / 10.0  # = (1 - 1/sqrt(5)) / 2
# Gauss-Legendre nodes/weights on [-1, 1], from tables.
GL_TABLE = {
    1: ([0.0], [2.0]),
    2: ([-1 / math.sqrt(3), 1 / math.sqrt(3)], [1.0, 1.0]),
    3: ([-math.sqrt(0.6), 0.0, math.sqrt(0.6)], [5 / 9, 8 / 9, 5 / 9]),
    4: (
        [-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526],
        [0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538],
    ),
    5: (
        [-0.9061798459386640, -0.5384693101056831, 0.0, 0.5384693101056831, 0.9061798459386640],
        [0.2369268850561891, 0.4786286704993665, 0.5688888888888889, 0.4786286704993665, 0.2369268850561891],
    ),
}


def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear, time-dependent velocity field."""
    return torch.sin(x) * (1.0 + t[:, None]) - 0.5 * x


def side(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A synthetic SideNet with S(x, v, t, 0) = v and a non-trivial dependence on every input."""
    return v + h[:, None] * torch.tanh(x) * t[:, None] + h[:, None] ** 2 * torch.sin(v)


def full(value: float, batch: int) -> torch.Tensor:
    return torch.full((batch,), value, dtype=F64)


def ba_by_hand(vf, sf, x, grid):
    """DESIGN.md's bi-anchor steps, one SideNet call per node."""
    ts, n = grid.tolist(), x.shape[0]
    v = vf(x, full(ts[0], n))
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        h = t - s
        v_a = sf(x, v, full(t, n), full(ALPHA * h, n))
        v_b = sf(x, v, full(t, n), full((1 - ALPHA) * h, n))
        v_e = sf(x, v, full(t, n), full(h, n))
        x_pred = x - h * (v / 12 + 5 * v_a / 12 + 5 * v_b / 12 + v_e / 12)
        if i == len(ts) - 2:
            return x_pred
        v_next = vf(x_pred, full(s, n))
        v_b = sf(x_pred, v_next, full(s, n), full(-ALPHA * h, n))
        x = x - h * (v / 12 + 5 * v_a / 12 + 5 * v_b / 12 + v_next / 12)
        v = v_next


def ba_single_by_hand(vf, sf, x, grid, k):
    """Single anchor: backbone at the step start, SideNet at each Gauss-Legendre node."""
    nodes, weights = GL_TABLE[k]
    ts, n = grid.tolist(), x.shape[0]
    for t, s in zip(ts[:-1], ts[1:]):
        h = t - s
        v = vf(x, full(t, n))
        v_bar = sum(w / 2 * sf(x, v, full(t, n), full((c + 1) / 2 * h, n)) for c, w in zip(nodes, weights))
        x = x - h * v_bar
    return x


X = torch.tensor([[0.3, -1.2, 0.8, 2.0], [1.1, 0.4, -0.6, -0.2], [-0.7, 0.9, 0.1, 1.5]], dtype=F64)
GRIDS = {
    "uniform": uniform_grid(6, dtype=F64),
    "shifted": shifted_grid(5, 3.0, dtype=F64),
    "irregular": torch.tensor([1.0, 0.93, 0.71, 0.7, 0.42, 0.05, 0.0], dtype=F64),
    "partial": torch.tensor([0.8, 0.5, 0.35, 0.2], dtype=F64),
    "inversion": torch.tensor([0.0, 0.1, 0.45, 0.6, 1.0], dtype=F64),
}


@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
def test_ba_equals_independent_implementation(grid):
    res = get_solver("ba")(field, X, GRIDS[grid], side_fn=side)
    torch.testing.assert_close(res.x, ba_by_hand(field, side, X, GRIDS[grid]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("grid", ["uniform", "irregular", "inversion"])
def test_ba_single_equals_independent_implementation(k, grid):
    res = get_solver("ba-single")(field, X, GRIDS[grid], side_fn=side, nodes=k)
    torch.testing.assert_close(res.x, ba_single_by_hand(field, side, X, GRIDS[grid], k), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_gauss_legendre_is_exact_to_degree_2k_minus_1(k):
    c, w = gauss_legendre(k)
    for degree in range(2 * k):
        assert abs(sum(wi * ci**degree for ci, wi in zip(c, w)) - 1.0 / (degree + 1)) < 1e-14


def test_ba_with_identity_sidenet_is_lagged_heun():
    # With S(x, v, t, h) = v all nodes of a probe equal the anchor velocity and the Lobatto
    # weights sum to 1, so the predictor is an Euler step and the corrector the trapezoid
    # x_{i+1} = x_i - h (u_i + u_{i+1}) / 2 with u_{i+1} = f(x_i - h u_i, t_{i+1}) (evaluated at
    # the predictor, and reused as the next step's start velocity); the last step returns the
    # predictor x_{N-1} - h u_{N-1}.
    identity = lambda x, v, t, h: v  # noqa: E731
    grid = GRIDS["irregular"]
    ts, n = grid.tolist(), X.shape[0]
    x, u = X, field(X, full(ts[0], n))
    for i in range(len(ts) - 2):
        h = ts[i] - ts[i + 1]
        u_next = field(x - h * u, full(ts[i + 1], n))
        x, u = x - h * (u + u_next) / 2, u_next
    expected = x - (ts[-2] - ts[-1]) * u
    res = get_solver("ba")(field, X, grid, side_fn=identity)
    torch.testing.assert_close(res.x, expected, rtol=0, atol=1e-14)
    # One step: exactly Euler.
    one = torch.tensor([1.0, 0.0], dtype=F64)
    euler = get_solver("euler")(field, X, one).x
    torch.testing.assert_close(get_solver("ba")(field, X, one, side_fn=identity).x, euler, rtol=0, atol=1e-15)


class Recorder:
    """Records every call's batch size and offsets; forwards to the synthetic SideNet."""

    def __init__(self):
        self.batches, self.offsets = [], []

    def __call__(self, x, v, t, h):
        self.batches.append(x.shape[0])
        self.offsets.append(h.tolist())
        return side(x, v, t, h)


def test_ba_costs_one_nfe_per_step_and_batches_the_forward_probe():
    calls = []
    vf = lambda x, t: calls.append(1) or field(x, t)  # noqa: E731
    rec = Recorder()
    res = get_solver("ba")(vf, X, uniform_grid(5, dtype=F64), side_fn=rec)
    assert res.nfe == len(calls) == 5 and res.steps == 5
    assert res.side_calls == len(rec.batches) == 2 * 5 - 1
    # Forward probes stack 3 offsets (3B rows); backward probes are single (B rows).
    assert rec.batches == [9, 3] * 4 + [9]


def test_ba_single_costs_one_nfe_and_one_side_call_per_step():
    calls = []
    vf = lambda x, t: calls.append(1) or field(x, t)  # noqa: E731
    rec = Recorder()
    res = get_solver("ba-single")(vf, X, uniform_grid(4, dtype=F64), side_fn=rec, nodes=3)
    assert res.nfe == len(calls) == 4 and res.side_calls == len(rec.batches) == 4
    assert rec.batches == [9] * 4


def test_inversion_probes_look_toward_noise():
    rec = Recorder()
    get_solver("ba")(field, X, uniform_grid(3, dtype=F64).flip(0), side_fn=rec)
    forward, backward = rec.offsets[0::2], rec.offsets[1::2]
    assert all(h < 0 for probe in forward for h in probe)
    assert all(h > 0 for probe in backward for h in probe)


def test_side_fn_probe_method_takes_over_batching():
    class ProbingSide:
        def __init__(self):
            self.probes = []

        def __call__(self, x, v, t, h):
            return side(x, v, t, h)

        def probe(self, x, v, t, offsets):
            self.probes.append(len(offsets))
            return [side(x, v, t, h) for h in offsets]

    sf = ProbingSide()
    res = get_solver("ba")(field, X, GRIDS["shifted"], side_fn=sf)
    # The 3-offset forward probes go through .probe, single backward probes through __call__.
    assert sf.probes == [3] * 5 and res.side_calls == 9
    torch.testing.assert_close(res.x, ba_by_hand(field, side, X, GRIDS["shifted"]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", ["ba", "ba-single"])
def test_side_fn_is_required(solver):
    with pytest.raises(ValueError, match="side_fn"):
        get_solver(solver)(field, X, uniform_grid(2, dtype=F64))


@pytest.mark.parametrize("nodes", [0, 6, 2.0])
def test_ba_single_rejects_bad_node_counts(nodes):
    with pytest.raises(ValueError, match="nodes"):
        get_solver("ba-single")(field, X, uniform_grid(2, dtype=F64), side_fn=side, nodes=nodes)


def _oracle_problem():
    gen = torch.Generator().manual_seed(0)
    mix = GaussianMixtureFlow.random((3,), num_classes=3, components_per_class=1, std=0.5, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    x = torch.randn(6, 3, generator=gen, dtype=F64)
    vf, sf = build_sampling_fns(mix.velocity, y, null_class=mix.null_class, side_velocity=mix.side_velocity)
    exact = mix.transport(x, torch.ones(6, dtype=F64), torch.zeros(6, dtype=F64), y)
    return vf, sf, x, exact


def test_ba_with_oracle_sidenet_is_a_lobatto_quadrature():
    vf, sf, x, exact = _oracle_problem()
    err = lambda res: (res.x - exact).abs().max().item()  # noqa: E731
    # Same budget, 8 NFE: BA (8 steps) against Heun (4 steps).
    ba8 = get_solver("ba")(vf, x, uniform_grid(8, dtype=F64), side_fn=sf)
    heun8 = get_solver("heun")(vf, x, uniform_grid(4, dtype=F64))
    assert ba8.nfe == heun8.nfe == 8
    assert err(ba8) < 1e-7 and err(heun8) > 1e-3
    # The 4-point Lobatto rule is of order 6.
    errors = [err(get_solver("ba")(vf, x, uniform_grid(n, dtype=F64), side_fn=sf)) for n in (16, 32)]
    assert abs(math.log2(errors[0] / errors[1]) - 6.0) < 0.3


@pytest.mark.parametrize("k", [1, 2, 3])
def test_ba_single_with_oracle_sidenet_has_gauss_order(k):
    vf, sf, x, exact = _oracle_problem()
    errors = []
    for n in (16, 32):
        res = get_solver("ba-single")(vf, x, uniform_grid(n, dtype=F64), side_fn=sf, nodes=k)
        errors.append((res.x - exact).abs().max().item())
    assert abs(math.log2(errors[0] / errors[1]) - 2 * k) < 0.3
