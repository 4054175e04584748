"""``val/side_rel_err``: how much of the velocity change over an offset the SideNet captures."""

from __future__ import annotations

import math

import pytest
import torch

from bafm.models.analytic import GaussianMixtureFlow
from bafm.solvers.bi_anchor import LOBATTO_ALPHA
from bafm.training.side_error import build_probe_set, probe_pairs, side_relative_error, summarize

SHAPE = (1, 2, 2)


@pytest.fixture(scope="module")
def flow():
    gm = GaussianMixtureFlow.random(SHAPE, num_classes=2, components_per_class=2, std=0.3,
                                    generator=torch.Generator().manual_seed(0))
    gm.oracle_substeps = 32
    return gm


class Side(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def velocity(self, x, v, t, h, y):
        return self.fn(x, v, t, h, y)


def test_probe_pairs_are_the_forward_offsets_of_the_uniform_grids():
    pairs = probe_pairs([2])
    assert [t for t, _ in pairs] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    assert [h for _, h in pairs[:3]] == pytest.approx([0.5 * LOBATTO_ALPHA, 0.5 * (1 - LOBATTO_ALPHA), 0.5])
    assert len(probe_pairs([5, 10])) == 3 * 15


def test_an_exact_sidenet_scores_near_zero_and_reusing_v_scores_one(flow):
    exact = Side(flow.side_velocity)
    probes = build_probe_set(flow, exact, SHAPE, num_samples=16, budgets=(4,), max_substep=0.005)
    exact_err = side_relative_error(exact, probes)
    identity_err = side_relative_error(Side(lambda x, v, t, h, y: v), probes)
    assert set(exact_err) == set(probe_pairs([4]))
    assert max(exact_err.values()) < 0.02
    assert all(e == pytest.approx(1.0) for e in identity_err.values())
    # Halfway between: S = (v + v_exact) / 2 captures half of the change everywhere.
    half = Side(lambda x, v, t, h, y: 0.5 * (v + flow.side_velocity(x, v, t, h, y)))
    half_err = summarize(side_relative_error(half, probes))
    assert half_err["mean"] == pytest.approx(0.5, abs=0.02) and half_err["worst"] < 0.53


def test_summary_keeps_the_offsets_up_to_the_limit():
    errors = {(1.0, 0.1): 0.2, (1.0, 0.2): 0.4, (0.5, 0.3): 0.9}
    out = summarize(errors, max_offset=0.2)
    assert out["mean"] == pytest.approx(0.3) and out["worst"] == 0.4
    assert not math.isnan(summarize(errors, max_offset=1.0)["mean"])
