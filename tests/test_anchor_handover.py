"""The explicit hand-over from backbone calls to SideNet calls: guided raw pairs and backbone features.

Every SideNet solver is checked against an independent side closure that recomputes what the
SideNet needs (the raw conditional/unconditional pair, the backbone's tokens) by calling the
backbone again at the anchor ``(x, t)``: the backbone is deterministic, so both must agree
exactly, whatever the solver does with its velocities (``ba-adaptive`` merges them row by row).
"""

from __future__ import annotations

import pytest
import torch

from bafm.models.anchor_features import BackboneFeatures, anchor_for
from bafm.models.guidance import combine_guidance
from bafm.models.sidenet import SideNet
from bafm.models.sit import SiT
from bafm.sampling import sampling_fns, solve
from bafm.solvers.grids import time_grid
from bafm.solvers import SOLVERS
from bafm.solvers.counting import select_rows

SIDE_SOLVERS = sorted(name for name, fn in SOLVERS.items() if fn.uses_side_fn)
INTERVAL = (0.1, 0.7)
OPTIONS = {"ba-adaptive": {"rtol": 1e-2, "atol": 1e-2}}


def _models(features: bool, seed: int = 0):
    torch.manual_seed(seed)
    backbone = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    for p in backbone.parameters():  # adaLN-zero starts at v = 0: give it a non-trivial field
        torch.nn.init.normal_(p, std=0.05)
    backbone.eval().requires_grad_(False)
    sidenet = SideNet(in_channels=1, channels=8, emb_dim=16, depth=2, num_heads=1, num_classes=3,
                      feature_dim=32 if features else 0)
    for p in sidenet.parameters():  # zero-initialised output and feature maps: make them matter
        torch.nn.init.normal_(p, std=0.1)
    return backbone, sidenet.eval().requires_grad_(False)


class IndependentClosures:
    """Guided velocity and side closures written apart from ``bafm.models.guidance``.

    The velocity closure calls the backbone on the conditional and unconditional batches
    separately and logs every row it returns with the raw pair and tokens behind it; the side
    closure finds each velocity row it is given in that log by value (so it follows any row
    merging a solver does) and applies the SideNet to what it finds.
    """

    def __init__(self, backbone, sidenet, labels, cfg_scale):
        self.backbone, self.sidenet, self.labels, self.cfg_scale = backbone, sidenet, labels, cfg_scale
        self.tap = BackboneFeatures(backbone) if sidenet.uses_backbone_features else None
        self.log = []  # (v row, v_cond row, v_uncond row, tokens_cond row, tokens_uncond row)

    def _backbone(self, x, t, y):
        return self.tap(x, t, y) if self.tap is not None else (self.backbone.velocity(x, t, y), None)

    def velocity(self, x, t):
        null = torch.full_like(self.labels, self.backbone.num_classes)
        v_c, f_c = self._backbone(x, t, self.labels)
        v_u, f_u = self._backbone(x, t, null) if self.cfg_scale != 1.0 else (v_c, f_c)
        v = combine_guidance(v_c, v_u, t, self.cfg_scale, INTERVAL) if self.cfg_scale != 1.0 else v_c
        for r in range(x.shape[0]):
            self.log.append((v[r], v_c[r], v_u[r], None if f_c is None else f_c[r], None if f_u is None else f_u[r]))
        return v

    def _lookup(self, row):
        for entry in reversed(self.log):
            if torch.equal(entry[0], row):
                return entry
        raise AssertionError("a velocity row the solver passed was never returned by the backbone closure")

    def side(self, x, v, t, h):
        k = x.shape[0] // self.labels.shape[0]  # a plain multi-offset probe stacks k copies of the batch
        y = self.labels.repeat(k)
        null = torch.full_like(y, self.backbone.num_classes)
        found = [self._lookup(v[r]) for r in range(v.shape[0])]
        stack = lambda i: None if found[0][i] is None else torch.stack([e[i] for e in found])  # noqa: E731
        v_c, v_u, f_c, f_u = stack(1), stack(2), stack(3), stack(4)

        def side_at(v_raw, labels, tokens):
            extra = () if tokens is None else (tokens,)
            return self.sidenet.velocity(x, v_raw, t, h, labels, *extra)

        if self.cfg_scale == 1.0:
            return side_at(v_c, y, f_c)
        return combine_guidance(side_at(v_c, y, f_c), side_at(v_u, null, f_u), t - h, self.cfg_scale, INTERVAL)


@pytest.mark.parametrize("solver", SIDE_SOLVERS)
@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
@pytest.mark.parametrize("features", [False, True])
def test_side_solvers_get_the_anchor_pair_and_features_of_their_velocity(solver, cfg_scale, features):
    backbone, sidenet = _models(features)
    labels = torch.tensor([0, 1, 2, 1])
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    grid = time_grid(solver, 4)
    anchor = anchor_for(backbone, sidenet) if features else None
    velocity_fn, side_fn = sampling_fns(solver, backbone.velocity, labels, null_class=3, side_velocity=sidenet.velocity,
                                        cfg_scale=cfg_scale, interval=INTERVAL, anchor=anchor)
    got = solve(velocity_fn, noise, solver, grid, side_fn, **OPTIONS.get(solver, {}))
    # The same velocity field, with the pair and features handed over by the independent closures.
    independent = IndependentClosures(backbone, sidenet, labels, cfg_scale)
    expected = solve(independent.velocity, noise, solver, grid, independent.side, **OPTIONS.get(solver, {}))
    torch.testing.assert_close(got.x, expected.x, rtol=1e-5, atol=1e-6)
    assert got.nfe == expected.nfe
    # The anchor's extras make a difference (else the test could not fail).
    if cfg_scale != 1.0 or features:
        blind_v, blind_side = sampling_fns(solver, backbone.velocity, labels, null_class=3,
                                           side_velocity=lambda x, v, t, h, y, *f: v + 0.0 * h[:, None, None, None],
                                           cfg_scale=cfg_scale, interval=INTERVAL)
        other = solve(blind_v, noise, solver, grid, blind_side, **OPTIONS.get(solver, {}))
        assert (other.x - got.x).abs().max() > 1e-4


def test_a_velocity_not_from_the_paired_closure_is_refused():
    backbone, sidenet = _models(features=True)
    labels = torch.tensor([0, 1])
    velocity_fn, side_fn = sampling_fns("ba", backbone.velocity, labels, null_class=3, side_velocity=sidenet.velocity,
                                        anchor=anchor_for(backbone, sidenet))
    x, t = torch.randn(2, 1, 8, 8), torch.ones(2)
    v = velocity_fn(x, t)
    side_fn(x, v, t, 0.1 * t)  # its own output is accepted
    with pytest.raises(ValueError, match="did not come from its paired velocity_fn"):
        side_fn(x, v.clone(), t, 0.1 * t)


def test_select_rows_merges_velocities_and_what_the_sidenet_reads_with_them():
    backbone, sidenet = _models(features=True)
    labels = torch.tensor([0, 1, 2])
    velocity_fn, side_fn = sampling_fns("ba", backbone.velocity, labels, null_class=3, side_velocity=sidenet.velocity,
                                        cfg_scale=2.0, interval=None, anchor=anchor_for(backbone, sidenet))
    xa, xb = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    ta, tb = torch.full((3,), 0.9), torch.full((3,), 0.4)
    va, vb = velocity_fn(xa, ta), velocity_fn(xb, tb)
    keep = torch.tensor([True, False, True])
    merged = select_rows(side_fn, keep, va, vb)
    rows = keep.view(-1, 1, 1, 1)
    x, t, h = torch.where(rows, xa, xb), torch.where(keep, ta, tb), torch.full((3,), 0.05)
    # The interval is None here: guidance at every time.
    null = torch.full_like(labels, 3)
    tap = BackboneFeatures(backbone)
    v_c, f_c = tap(x, t, labels)
    v_u, f_u = tap(x, t, null)
    want = torch.lerp(sidenet.velocity(x, v_u, t, h, null, f_u), sidenet.velocity(x, v_c, t, h, labels, f_c), 2.0)
    torch.testing.assert_close(side_fn(x, merged, t, h), want, rtol=1e-5, atol=1e-6)


def test_backbone_features_are_the_tokens_of_the_chosen_block():
    backbone, _ = _models(features=False)
    x, t, y = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), torch.tensor([0, 2])
    seen = []
    handle = backbone.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    v_plain = backbone.velocity(x, t, y)
    handle.remove()
    v, tokens = BackboneFeatures(backbone, layer=0)(x, t, y)
    torch.testing.assert_close(v, v_plain)
    torch.testing.assert_close(tokens, seen[0])
    assert tokens.shape == (2, 16, 32)
    # The hook lives only during the call.
    assert not backbone.blocks[0]._forward_hooks
    with pytest.raises(ValueError, match="feature_layer 5 is out of range"):
        BackboneFeatures(backbone, layer=5)


def test_a_feature_sidenet_without_features_says_what_it_needs():
    _, sidenet = _models(features=True)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"reads backbone features \(feature_dim 32\)"):
        sidenet.velocity(x, x, torch.ones(2), torch.ones(2) * 0.1, torch.tensor([0, 1]))
