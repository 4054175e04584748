"""The evaluation engine on an analytic Gaussian-mixture backbone with a tiny feature extractor."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from bafm.eval.engine import COLUMNS, ReferenceCache, SweepInputError, evaluate_sweep, plan_sweep
from bafm.eval.plan import SweepSettings
from bafm.eval.features import FeatureBatch, FeatureExtractor
from bafm.eval.metrics import ReferenceStats, feature_statistics, frechet_distance, precision_recall
from bafm.eval.report import log_tensorboard, read_csv, rows_to_csv, write_reports
from bafm.models.analytic import GaussianMixtureFlow
from bafm.sampling import SamplingSettings, generate, sample_labels, sample_noise
from bafm.solvers.ground_truth import Reference

SHAPE = (1, 4, 4)
SAMPLING = SamplingSettings(grid="uniform", shift=1.0, cfg_scale=1.0, guidance_interval=(0.0, 0.7))


class TinyFeatures(FeatureExtractor):
    """Identity features (flattened pixels) and 3 logits read off them."""

    name = "tiny"
    feature_dim = 16

    def forward(self, images):
        flat = images.flatten(1).float()
        return flat, 4.0 * flat[:, :3]


class OracleSideNet(nn.Module):
    """SideNet interface around the analytic model's exact side velocity."""

    def __init__(self, flow: GaussianMixtureFlow) -> None:
        super().__init__()
        self.flow = flow

    def velocity(self, x, v, t, h, y):
        return self.flow.side_velocity(x, v, t, h, y)


class CountingBackbone(nn.Module):
    """Counts velocity calls of a wrapped backbone."""

    def __init__(self, flow: GaussianMixtureFlow) -> None:
        super().__init__()
        self.flow, self.num_classes, self.data_shape, self.calls = flow, flow.num_classes, flow.data_shape, 0

    def velocity(self, x, t, y):
        self.calls += 1
        return self.flow.velocity(x, t, y)


class ExplodingBackbone(nn.Module):
    """Fails if sampling ever starts."""

    num_classes = 2
    data_shape = SHAPE

    def velocity(self, x, t, y):
        raise AssertionError("sampling started before the input was checked")


def decode(latents):
    return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)




@pytest.fixture(scope="module")
def flow():
    gm = GaussianMixtureFlow.random(SHAPE, num_classes=2, components_per_class=2, std=0.3,
                                    generator=torch.Generator().manual_seed(0))
    gm.oracle_substeps = 16  # exact enough for a SideNet stand-in, 4x cheaper than the default
    return gm


@pytest.fixture(scope="module")
def ref_stats(flow):
    labels = sample_labels(torch.arange(400), 2)
    data = flow.sample_data(400, labels, generator=torch.Generator().manual_seed(1)).float()
    return feature_statistics(TinyFeatures()(decode(data))[0])


def _sweep(backbone, sidenet, ref_stats, **kw):
    """``evaluate_sweep`` with test defaults; keyword arguments that name a ``SweepSettings`` field set it."""
    settings = dict(seed=3, sampling=SAMPLING, batch_size=8, reference=Reference(rtol=1e-6, atol=1e-6), grid_images=4)
    args = dict(solvers=["euler"], budgets={"euler": [4]}, num_samples=8, decoder=decode,
                feature_extractor=TinyFeatures(), reference_stats=ref_stats, device="cpu", progress=False)
    for key, value in kw.items():
        (settings if key in SweepSettings.__dataclass_fields__ else args)[key] = value
    return evaluate_sweep(backbone, sidenet, settings=SweepSettings(**settings), **args)


def test_noise_and_labels_are_per_sample():
    a = sample_noise(torch.arange(6), SHAPE, seed=11)
    b = torch.cat([sample_noise([0, 1, 2, 3], SHAPE, seed=11), sample_noise([4, 5], SHAPE, seed=11)])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[2], torch.randn(SHAPE, generator=torch.Generator().manual_seed(13)), rtol=0, atol=0)
    assert sample_labels(torch.tensor([0, 1, 2, 9]), 3).tolist() == [0, 1, 2, 0]
    assert sample_labels(torch.tensor([0, 5]), 0).tolist() == [0, 0]  # unconditional: the null class


def test_samples_independent_of_batch_size(flow):
    whole = generate(flow, None, "heun", torch.arange(8), seed=5, sampling=SAMPLING, nfe=6)
    parts = [generate(flow, None, "heun", idx, seed=5, sampling=SAMPLING, nfe=6).x for idx in torch.arange(8).split(3)]
    torch.testing.assert_close(torch.cat(parts), whole.x, rtol=0, atol=0)
    assert whole.nfe == 6


def test_rows_identical_across_batch_sizes(flow, ref_stats):
    kw = dict(solvers=["euler", "heun", "ba"], budgets={"euler": [4, 8], "heun": [4], "ba": [3]})
    side = OracleSideNet(flow)
    rows3, grids3 = _sweep(flow, side, ref_stats, batch_size=3, **kw)
    rows8, grids8 = _sweep(flow, side, ref_stats, batch_size=8, **kw)
    assert [(r["solver"], r["nfe"], r["steps"]) for r in rows8] == [
        ("reference", rows8[0]["nfe"], 1), ("euler", 4, 4), ("euler", 8, 8), ("heun", 4, 2), ("ba", 3, 3)]
    for r3, r8 in zip(rows3, rows8):  # same samples (the reference solves fixed groups), same metrics
        assert r3["n_samples"] == r8["n_samples"] == 8
        for key in ("nfe", "fid", "is", "traj_rmse"):
            assert r3[key] == pytest.approx(r8[key], rel=1e-6, abs=1e-12), (r3["solver"], key)
    for key in grids8:
        torch.testing.assert_close(grids3[key], grids8[key], rtol=0, atol=0)
    assert set(grids8) == {("reference", rows8[0]["nfe"]), ("euler", 4), ("euler", 8), ("heun", 4), ("ba", 3)}
    assert grids8[("euler", 4)].shape == (3, 2 * 4 + 3, 2 * 4 + 3)  # 4 images of 4x4 in a 2x2 grid, padding 1


def test_trajectory_error_falls_with_nfe_and_vanishes_for_the_reference(flow, ref_stats):
    rows, _ = _sweep(flow, None, ref_stats, solvers=["euler", "rk4"],
                     budgets={"euler": [2, 4, 8, 16, 32], "rk4": [64]},
                     reference=Reference(rtol=1e-7, atol=1e-7))
    ref, euler, rk4 = rows[0], rows[1:6], rows[6]
    assert ref["solver"] == "reference" and ref["traj_rmse"] == 0.0 and ref["nfe"] > 6
    errs = [r["traj_rmse"] for r in euler]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    ratios = [a / b for a, b in zip(errs[2:], errs[3:])]
    assert all(1.6 < q < 2.6 for q in ratios), ratios  # first order: halving the step halves the error
    assert rk4["traj_rmse"] < 1e-4


def test_reference_cache_is_reused(flow, ref_stats):
    counting = CountingBackbone(flow)
    cache = ReferenceCache()
    rows1, _ = _sweep(counting, None, ref_stats, reference_cache=cache)
    first = counting.calls
    # One more call than the NFE: the FLOP count's probe batch (measured once, kept in the cache).
    assert first == rows1[0]["nfe"] + 4 + 1 and len(cache.latents) == 8
    rows2, _ = _sweep(counting, None, ref_stats, reference_cache=cache)
    assert counting.calls - first == 4  # only euler's 4 NFE: the reference came from the cache
    assert rows2 == [dict(r, seconds=r2["seconds"]) for r, r2 in zip(rows1, rows2)]
    _sweep(counting, None, ref_stats, reference_cache=cache, seed=4)  # another seed invalidates it
    assert cache.key[1] == 4


def test_bad_input_fails_before_sampling(ref_stats):
    boom = ExplodingBackbone()
    with pytest.raises(SweepInputError, match="unknown solver 'eular'.*euler.*heun.*reference"):
        _sweep(boom, None, ref_stats, solvers=["eular"], budgets={"eular": [4]})
    with pytest.raises(SweepInputError, match="heun.*7 NFE.*nearest: 6 or 8"):
        _sweep(boom, None, ref_stats, solvers=["euler", "heun"], budgets={"euler": [4], "heun": [7]})
    with pytest.raises(SweepInputError, match=r"ba.*SideNet.*ckpt/side\.safetensors.*make train"):
        _sweep(boom, None, ref_stats, solvers=["ba"], budgets={"ba": [5]}, sidenet_hint="ckpt/side.safetensors")
    with pytest.raises(SweepInputError, match="eval.budgets.midpoint"):
        _sweep(boom, None, ref_stats, solvers=["midpoint"], budgets={"euler": [4]})
    with pytest.raises(SweepInputError, match="not a positive integer"):
        plan_sweep(["euler"], [0], sidenet_available=False)
    assert plan_sweep(["euler", "heun"], [4, 8], sidenet_available=False)[-1].steps == 4


def test_reports(flow, ref_stats, tmp_path):
    rows, grids = _sweep(flow, None, ref_stats, solvers=["euler", "midpoint"],
                         budgets={"euler": [2, 4], "midpoint": [4]})
    paths = write_reports(rows, grids, tmp_path, title="test")
    text = paths["csv"].read_text().splitlines()
    header = "solver,grid,tol,nfe,flops,steps,fid,fd_ref,sfid,is,precision,recall,traj_rmse,seconds,n_samples"
    assert text[0] == header == ",".join(COLUMNS)
    # FID-only reference statistics and no spatial features: blank sfid, precision and recall.
    assert text[1].split(",")[8] == text[1].split(",")[10] == text[1].split(",")[11] == ""
    assert float(text[1].split(",")[7]) == 0.0 and float(text[2].split(",")[7]) > 0.0  # fd_ref
    # No SideNet: each backbone row is one unit, so flops equals the NFE.
    assert [float(line.split(",")[4]) for line in text[1:]] == pytest.approx([float(r["nfe"]) for r in rows], rel=1e-12)
    assert len(text) == 1 + len(rows)
    back = read_csv(paths["csv"])
    assert [r["solver"] for r in back] == ["reference", "euler", "euler", "midpoint"]
    for r, b in zip(rows, back):
        assert b["nfe"] == r["nfe"] and b["fid"] == pytest.approx(r["fid"], rel=1e-7)
        assert b["sfid"] is b["precision"] is b["recall"] is None
    lines = paths["md"].read_text().splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |" and len(lines) == 2 + len(rows)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[:4] + [c[5]] for c in cells] == [["reference", "adaptive", "", str(rows[0]["nfe"]), "1"],
                                      ["euler", "uniform", "", "2", "2"], ["euler", "uniform", "", "4", "4"],
                                      ["midpoint", "uniform", "", "4", "2"]]
    for c, r in zip(cells, rows):  # fid as printed, to its shown digits; blank sfid, precision and recall
        assert float(c[6]) == pytest.approx(r["fid"], rel=1e-3) and c[8] == c[10] == c[11] == ""
    assert [r["grid"] for r in back] == ["adaptive", "uniform", "uniform", "uniform"]
    assert paths["plot_traj_flops"] == tmp_path / "traj_rmse_vs_flops.png"
    for plot in ("plot", "plot_fd_ref", "plot_traj", "plot_traj_flops"):
        assert paths[plot].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == [
        "euler_nfe002.png", "euler_nfe004.png", "midpoint_nfe004.png", f"reference_nfe{rows[0]['nfe']:03d}.png"]
    nan_row = dict(rows[1], fid=math.nan)
    assert ",nan," in rows_to_csv([nan_row])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    log_tensorboard(writer, rows, grids)
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    fid_euler = acc.Scalars("nfe_sweep/fid/euler")
    assert [e.step for e in fid_euler] == [2, 4]
    assert fid_euler[1].value == pytest.approx(rows[2]["fid"], rel=1e-6)
    assert "nfe_sweep/traj_rmse/midpoint" in acc.Tags()["scalars"]
    assert not [t for t in acc.Tags()["scalars"] if "/sfid/" in t or "/precision/" in t]  # blank: not logged
    assert "nfe_sweep/samples/euler" in acc.Tags()["images"]


def _distributed_worker(rank, world, init_file, out_dir, kwargs):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gm = GaussianMixtureFlow.random(SHAPE, num_classes=2, components_per_class=2, std=0.3,
                                        generator=torch.Generator().manual_seed(0))
        samples = {}
        rows, grids = _sweep(gm, None, None, **kwargs, sample_sink=lambda s, n, x: samples.__setitem__((s, n), x))
        torch.save({"rows": rows, "grids": grids, "samples": samples}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


_DIST_KW = dict(solvers=["euler", "heun"], budgets={"euler": [3], "heun": [4]}, num_samples=10, batch_size=2,
                reference_batch_size=3, grid_images=5)


def test_distributed_matches_single_process(flow, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path), _DIST_KW), nprocs=2, join=True)
    gm = GaussianMixtureFlow.random(SHAPE, num_classes=2, components_per_class=2, std=0.3,
                                    generator=torch.Generator().manual_seed(0))
    samples = {}
    rows, grids = _sweep(gm, None, None, **_DIST_KW, sample_sink=lambda s, n, x: samples.__setitem__((s, n), x))
    got0, got1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert repr(got0["rows"]) == repr(got1["rows"])  # every rank returns rank 0's rows (repr: nan == nan)
    assert got1["grids"] == {} and got1["samples"] == {}  # only rank 0 writes
    for mine, theirs in zip(rows, got0["rows"]):
        assert theirs["n_samples"] == 10
        assert math.isnan(theirs["fid"]) and math.isnan(mine["fid"])  # no reference statistics given
        assert (theirs["solver"], theirs["nfe"], theirs["steps"]) == (mine["solver"], mine["nfe"], mine["steps"])
        for key in ("is", "traj_rmse"):
            assert theirs[key] == pytest.approx(mine[key], rel=1e-6, abs=1e-12), key
    assert set(got0["grids"]) == set(grids) and set(got0["samples"]) == set(samples)
    for key in grids:
        torch.testing.assert_close(got0["grids"][key], grids[key], rtol=0, atol=0)
        torch.testing.assert_close(got0["samples"][key], samples[key], rtol=0, atol=0)
    assert samples[("euler", 3)].shape == (10, 4, 4, 1) and samples[("euler", 3)].dtype == torch.uint8


def test_distributed_rank_without_samples(tmp_path):
    """Fewer sample groups than ranks: the idle rank joins every collective and gets the rows."""
    import torch.multiprocessing as mp

    kwargs = {**_DIST_KW, "num_samples": 3, "reference_batch_size": 4, "grid_images": 3}
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path), kwargs), nprocs=2, join=True)
    got0, got1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert repr(got0["rows"]) == repr(got1["rows"])
    assert [r["n_samples"] for r in got0["rows"]] == [3, 3, 3]


class TinySpatialFeatures(TinyFeatures):
    """``TinyFeatures`` plus 4 "spatial" features (every 4th pixel, doubled) for sFID."""

    name = "tiny-spatial"
    spatial_dim = 4

    def extract(self, images):
        flat, logits = self(images)
        return FeatureBatch(flat, logits, 2.0 * flat[:, ::4])


def test_sfid_precision_recall_columns(flow, tmp_path):
    labels = sample_labels(torch.arange(300), 2)
    real = TinySpatialFeatures().extract(decode(flow.sample_data(300, labels, generator=torch.Generator().manual_seed(1))))
    ref = ReferenceStats(pool=feature_statistics(real.features), spatial=feature_statistics(real.spatial),
                         features=real.features[:200])
    cache = ReferenceCache()
    kw = dict(solvers=["euler"], budgets={"euler": [2, 8]}, num_samples=12, feature_extractor=TinySpatialFeatures(),
              reference_cache=cache, batch_size=5)
    rows, _ = _sweep(flow, None, ref, **kw)
    for row in rows[1:]:  # the same samples, scored by the pure metric functions
        x = generate(flow, None, "euler", torch.arange(12), seed=3, sampling=SAMPLING, nfe=row["nfe"]).x
        gen = TinySpatialFeatures().extract(decode(x))
        assert row["fid"] == pytest.approx(frechet_distance(feature_statistics(gen.features), ref.pool), rel=1e-6)
        assert row["sfid"] == pytest.approx(frechet_distance(feature_statistics(gen.spatial), ref.spatial), rel=1e-6)
        assert (row["precision"], row["recall"]) == precision_recall(gen.features, ref.features)
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("precision", "recall")) and rows[1]["sfid"] > 0.0
    # The reference row again, from the cache (spatial features included): the same metrics.
    again, _ = _sweep(flow, None, ref, **kw)
    assert [{k: r[k] for k in ("fid", "sfid", "precision", "recall")} for r in again] == \
        [{k: r[k] for k in ("fid", "sfid", "precision", "recall")} for r in rows]

    paths = write_reports(rows, {}, tmp_path)
    back = read_csv(paths["csv"])
    assert [b["recall"] for b in back] == [r["recall"] for r in rows]
    assert back[1]["sfid"] == pytest.approx(rows[1]["sfid"], rel=1e-7)
    assert "| solver | grid | tol | nfe | flops | steps | fid | fd_ref | sfid | is | precision | recall |" in paths["md"].read_text()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    log_tensorboard(writer, rows, {})
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("nfe_sweep/recall/euler")] == [
        (2, pytest.approx(rows[1]["recall"])), (8, pytest.approx(rows[2]["recall"]))]
    assert [e.step for e in acc.Scalars("nfe_sweep/sfid/euler")] == [2, 8]


def test_shift_and_optimized_grids_are_used_and_recorded(flow, ref_stats, tmp_path):
    from bafm.solvers.grid_store import load_grid_table, save_grid_table
    from bafm.solvers.grids import shifted_grid

    kw = dict(solvers=["euler", "ba"], budgets={"euler": [4], "ba": [3]}, include_reference=False)
    side = OracleSideNet(flow)
    shift_cfg = dataclasses.replace(SAMPLING, grid="shift", shift=3.0)
    shifted, _ = _sweep(flow, side, ref_stats, sampling=shift_cfg, **kw)
    # The same grids, stored as "optimized" ones, give the same samples.
    path = save_grid_table(tmp_path / "side.grids.json", {("euler", 4): shifted_grid(4, 3.0, dtype=torch.float64).tolist(),
                                                          ("ba", 3): shifted_grid(3, 3.0, dtype=torch.float64).tolist()},
                           {"objective": "test"})
    opt_cfg = dataclasses.replace(SAMPLING, grid="optimized")
    optimized, _ = _sweep(flow, side, ref_stats, sampling=opt_cfg, grid_table=load_grid_table(path), **kw)
    uniform, _ = _sweep(flow, side, ref_stats, **kw)
    assert [r["grid"] for r in shifted] == ["shift:3", "shift:3"] and [r["grid"] for r in optimized] == ["optimized"] * 2
    for a, b, u in zip(shifted, optimized, uniform):
        assert a["fid"] == pytest.approx(b["fid"], rel=1e-9) and a["fid"] != pytest.approx(u["fid"], rel=1e-6)
    with pytest.raises(SweepInputError, match=r"side.grids.json' has no grid for solver 'euler' at 8 NFE"):
        _sweep(ExplodingBackbone(), None, ref_stats, sampling=opt_cfg, grid_table=load_grid_table(path),
               solvers=["euler"], budgets={"euler": [8]})


def test_adaptive_rows_report_their_measured_mean_nfe(flow, ref_stats, tmp_path):
    side = OracleSideNet(flow)
    rows, grids = _sweep(flow, side, ref_stats, solvers=["ba-adaptive"], budgets={},
                         tolerances={"ba-adaptive": [1e-2, 1e-5]})
    ref, loose, tight = rows
    assert (loose["solver"], loose["grid"], loose["tol"], tight["tol"]) == ("ba-adaptive", "adaptive", 1e-2, 1e-5)
    direct = generate(flow, side, "ba-adaptive", torch.arange(8), seed=3, sampling=SAMPLING,
                      rtol=1e-2, atol=1e-2)
    assert loose["nfe"] == round(direct.mean_nfe(), 2) and direct.nfe_per_sample is not None
    assert tight["nfe"] > loose["nfe"] and tight["traj_rmse"] < loose["traj_rmse"]
    assert ("ba-adaptive-tol0.01", int(round(loose["nfe"]))) in grids
    back = read_csv(write_reports(rows, grids, tmp_path)["csv"])
    assert [(r["tol"], r["nfe"]) for r in back[1:]] == [(1e-2, loose["nfe"]), (1e-5, tight["nfe"])]
    assert back[0]["tol"] is None and isinstance(back[0]["nfe"], int)
    with pytest.raises(SweepInputError, match=r"set eval.tolerances.ba-adaptive=\[...\]"):
        plan_sweep(["ba-adaptive"], {}, sidenet_available=True)
    with pytest.raises(SweepInputError, match="tolerance -1 is not a positive number"):
        plan_sweep(["ba-adaptive"], {}, sidenet_available=True, tolerances={"ba-adaptive": [-1]})
