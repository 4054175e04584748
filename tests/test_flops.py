"""The sweep's ``flops`` column: rows through each network, times FLOPs per row counted by PyTorch.

Every expected value is a hand count: the networks here are linear maps whose FLOPs are
``2 * in * out`` per row, and the rows each solver sends through them follow from the algorithm
(Euler: one backbone call per step; BA: one per anchor, three SideNet rows per step in the
forward probe and one in the backward probe, except on the last step, which has none).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bafm.eval.engine import evaluate_sweep
from bafm.eval.features import FeatureExtractor
from bafm.solvers.ground_truth import Reference
from bafm.eval.plan import SweepSettings
from bafm.eval.report import plot_metric_vs_nfe, read_csv, sweep_layout, write_reports
from bafm.models.fast import optimize_for_inference
from bafm.models.flops import NetworkFlops, count_flops, describe, measure_flops
from bafm.models.sidenet import SideNet
from bafm.models.sit import SiT
from bafm.sampling import SamplingSettings
from bafm.solvers.counting import NetworkRows

SHAPE = (1, 4, 4)
PIXELS = 16
BACKBONE_FLOPS = 2 * PIXELS * PIXELS  # Linear(16, 16) per row
SIDE_FLOPS = 2 * PIXELS * 2 + 2 * 2 * PIXELS  # Linear(16, 2) then Linear(2, 16) per row
RATIO = SIDE_FLOPS / BACKBONE_FLOPS  # 0.25


class LinearBackbone(nn.Module):
    """``v = A x``: 512 FLOPs per row (one 16 x 16 matrix product)."""

    num_classes = 2
    data_shape = SHAPE

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(PIXELS, PIXELS)

    def velocity(self, x, t, y):
        return 0.1 * self.lin(x.flatten(1)).view_as(x)


class LowRankSideNet(nn.Module):
    """``v + h B (C x)``: 128 FLOPs per row (16 -> 2 -> 16)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.down, self.up = nn.Linear(PIXELS, 2), nn.Linear(2, PIXELS)

    def velocity(self, x, v, t, h, y):
        return v + h.view(-1, 1, 1, 1) * self.up(self.down(x.flatten(1))).view_as(x)


class Pixels(FeatureExtractor):
    name = "pixels"
    feature_dim = PIXELS

    def forward(self, images):
        return images.flatten(1).float(), None


def _rows(solvers, budgets, *, cfg_scale=1.0, interval=None, num_samples=4, batch_size=3, **settings):
    sampling = SamplingSettings(cfg_scale=cfg_scale, guidance_interval=interval)
    st = SweepSettings(sampling=sampling, seed=0, batch_size=batch_size, reference=Reference("rk4", steps=3),
                       reference_batch_size=2, grid_images=0, **settings)
    rows, _ = evaluate_sweep(LinearBackbone(), LowRankSideNet(), solvers=solvers, budgets=budgets,
                             num_samples=num_samples, settings=st, decoder=lambda x: x.clamp(0, 1),
                             feature_extractor=Pixels(), reference_stats=None, device="cpu", progress=False)
    return {(r["solver"], r["nfe"]): r for r in rows}


def test_network_flops_are_counted_per_row():
    flops = measure_flops(LinearBackbone(), LowRankSideNet(), SHAPE)
    assert (flops.backbone, flops.sidenet) == (BACKBONE_FLOPS, SIDE_FLOPS)
    assert measure_flops(LinearBackbone(), LowRankSideNet(), SHAPE, rows=5) == flops  # linear in the batch
    assert flops.side_ratio == RATIO
    work = NetworkRows()
    work.backbone, work.sidenet = 6, 8
    assert flops.backbone_calls(work) == 6 + 8 * RATIO
    assert math.isnan(NetworkFlops(backbone=0.0).backbone_calls(work))  # no unit to count in
    assert math.isnan(NetworkFlops(backbone=1.0).backbone_calls(work))  # SideNet rows without a count
    summary = describe(flops)
    assert summary["backbone_mflop_per_sample"] == BACKBONE_FLOPS / 1e6
    assert summary["ba_step_sidenet_in_backbone_calls"] == 4 * RATIO


def test_attention_on_the_cpu_is_counted():
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    # Two batched products per head: scores (5 x 4 @ 4 x 5) and output (5 x 5 @ 5 x 4).
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * 3 * (2 * 5 * 4 * 5 + 2 * 5 * 5 * 4)


def test_sweep_rows_count_euler_ba_and_the_reference():
    rows = _rows(["euler", "ba"], {"euler": [3, 5], "ba": [3, 5]})
    assert rows[("reference", 12)]["flops"] == pytest.approx(12.0, rel=1e-12)  # rk4, 3 steps: 12 backbone calls
    for n in (3, 5):
        assert rows[("euler", n)]["flops"] == pytest.approx(n, rel=1e-12)
        side_rows = 3 * n + (n - 1)  # forward probes on every step, backward probes on all but the last
        assert rows[("ba", n)]["flops"] == pytest.approx(n + side_rows * RATIO, rel=1e-12)
        assert rows[("ba", n)]["nfe"] == n


def test_guidance_doubles_the_flops_not_the_nfe():
    rows = _rows(["euler", "ba"], {"euler": [4], "ba": [4]}, cfg_scale=1.5, interval=None)
    assert rows[("reference", 12)]["flops"] == pytest.approx(24.0, rel=1e-12)
    assert (rows[("euler", 4)]["nfe"], rows[("euler", 4)]["flops"]) == (4, pytest.approx(8.0, rel=1e-12))
    assert rows[("ba", 4)]["flops"] == pytest.approx(2 * 4 + 2 * (3 * 4 + 3) * RATIO, rel=1e-12)
    # Euler, 10 steps, guidance only for 0 < t <= 0.55: calls at t = 1.0, 0.9, ..., 0.1, doubled at 0.5 ... 0.1.
    rows = _rows(["euler"], {"euler": [10]}, cfg_scale=1.5, interval=(0.0, 0.55), include_reference=False)
    assert rows[("euler", 10)]["flops"] == pytest.approx(10 + 5, rel=1e-12)


def _sit_and_sidenet(feature_dim: int):
    torch.manual_seed(0)
    backbone = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    sidenet = SideNet(in_channels=1, channels=8, emb_dim=16, depth=2, num_heads=1, num_classes=3,
                      feature_dim=feature_dim)
    return backbone.eval().requires_grad_(False), sidenet.eval().requires_grad_(False)


def test_feature_sidenet_counts_what_it_does_with_the_tokens():
    backbone, plain = _sit_and_sidenet(0)
    _, reader = _sit_and_sidenet(32)
    base = measure_flops(backbone, plain, (1, 8, 8))
    with_features = measure_flops(backbone, reader, (1, 8, 8))
    assert with_features.backbone == base.backbone > 0
    tokens, width = 16, 32  # 4 x 4 patches of the 8 x 8 latent, hidden size 32
    per_token = 2 * width * 8  # feature_map: Linear(32, channels 8) on every token
    pooled = 2 * width * 16  # feature_emb: Linear(32, emb 16) on the mean token
    assert with_features.sidenet - base.sidenet == tokens * per_token + pooled


def test_fast_path_wrappers_are_counted_through_their_eager_module():
    backbone, sidenet = _sit_and_sidenet(0)
    plain = measure_flops(backbone, sidenet, (1, 8, 8))
    fast = measure_flops(optimize_for_inference(copy.deepcopy(backbone), compile=False, channels_last=True),
                         optimize_for_inference(copy.deepcopy(sidenet), compile=False, channels_last=True), (1, 8, 8))
    assert fast == plain


def test_flops_plot_is_written_and_skips_missing_costs(tmp_path):
    rows = [{"solver": "reference", "nfe": 12, "flops": 12.0, "traj_rmse": 0.0},
            {"solver": "euler", "nfe": 4, "flops": 4.0, "traj_rmse": 0.1},
            {"solver": "ba", "nfe": 4, "flops": 5.2, "traj_rmse": 0.02},
            {"solver": "ba", "nfe": 8, "flops": math.nan, "traj_rmse": 0.01}]
    path = plot_metric_vs_nfe(rows, tmp_path / "traj_rmse_vs_flops.png", "traj_rmse", "RMSE", x="flops")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_column_in_csv_markdown_and_dashboard(tmp_path):
    rows = list(_rows(["euler", "ba"], {"euler": [3], "ba": [3]}, include_reference=False).values())
    paths = write_reports(rows, {}, tmp_path, title="toy")
    back = read_csv(paths["csv"])
    assert [b["flops"] for b in back] == pytest.approx([3.0, 3 + 11 * RATIO], rel=1e-7)
    assert "| nfe | flops | steps |" in paths["md"].read_text()
    assert (tmp_path / "traj_rmse_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (charts,) = sweep_layout(rows).values()
    assert charts["FLOPs per sample (backbone calls) vs NFE"] == ["Multiline", [r"^nfe_sweep/flops/"]]
