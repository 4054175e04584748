"""``bafm edit`` end to end on tiny models, and its input checks."""

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from bafm.cli import main
from bafm.config import load_config
from bafm.editing.inputs import load_inputs
from bafm.editing.report import COLUMNS, latent_rmse, psnr
from bafm.models.classifier import DigitsClassifier, save_classifier
from bafm.models.loading import load_backbone, save_backbone
from bafm.models.sit import build_sit
from factories import tiny_model_overrides






def _args(repo_root, tiny, tmp_path, *extra):
    return [
        "edit", "--config", str(repo_root / "experiments/digits.yaml"), "--out", str(tmp_path / "out"),
        *tiny_model_overrides(tiny, tmp_path), "edit.device=cpu", "edit.indices=[0,1,2]", "edit.target_class=3",
        "edit.solvers=[ba,euler]", "edit.budgets={ba: [2], euler: [2, 3]}", "edit.batch_size=2", *extra,
    ]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_edit_writes_csv_grid_and_table(repo_root, tiny, tmp_path, capsys):
    assert main(_args(repo_root, tiny, tmp_path)) == 0
    out = tmp_path / "out"
    assert (out / "edit_results.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    rows = _read(out / "edit_results.csv")
    points = [(r["solver"], int(r["nfe"]), int(r["steps"])) for r in rows]
    assert points == [("ba", 2, 2), ("euler", 2, 2), ("euler", 3, 3)]
    for r in rows:
        assert int(r["n_images"]) == 3
        assert float(r["recon_latent_rmse"]) > 0.0 and np.isfinite(float(r["recon_psnr"]))
        assert 0.0 <= float(r["edit_target_prob"]) <= 1.0
        # Accuracy over 3 images is k/3; the CSV keeps 6 significant digits ("0.333333").
        hits = 3 * float(r["edit_target_acc"])
        assert hits == pytest.approx(round(hits), abs=1e-5) and 0 <= round(hits) <= 3, r["edit_target_acc"]
    markdown = (out / "edit_results.md").read_text()
    assert markdown.split("\n\n")[0] + "\n" in capsys.readouterr().out
    assert "ba 2 NFE edit->3" in markdown and "euler 3 NFE recon" in markdown
    with Image.open(out / "edit_grid.png") as grid:
        # Header strip and 1 + 2 * 3 rows of digits enlarged to 64 pixels, 2-pixel gaps.
        assert grid.format == "PNG" and grid.size[1] == 14 + 7 * (64 + 2)
    assert (out / "config.yaml").is_file() and not list(out.rglob("*.tmp"))


def test_edit_scores_come_from_the_classifier(repo_root, tiny, tmp_path):
    # A classifier that ignores its input: logits = bias, so every edit gets the same softmax.
    model = DigitsClassifier(channels=(8, 16, 32), image_size=8).eval()
    bias = torch.linspace(-1.0, 1.0, 10)
    bias[3] = 2.0  # the target class wins every vote
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(bias)
    path = save_classifier(model, tmp_path / "constant.safetensors")
    args = _args(repo_root, tiny, tmp_path, f"eval.classifier_path={path}", "edit.solvers=[euler]",
                 "edit.budgets={euler: [2]}")
    assert main(args) == 0
    (row,) = _read(tmp_path / "out" / "edit_results.csv")
    expected_prob = math.exp(2.0) / sum(math.exp(b) for b in bias.tolist())  # softmax by hand
    assert float(row["edit_target_prob"]) == pytest.approx(expected_prob, rel=1e-5)
    assert float(row["edit_target_acc"]) == 1.0


def test_edit_from_an_image_folder(repo_root, tiny, tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    grey = {name: rng.integers(0, 256, (8, 8), dtype=np.uint8) for name in ("b.png", "sub/a.png")}
    for name, arr in grey.items():
        Image.fromarray(arr).save(folder / name)
    Image.fromarray(rng.integers(0, 256, (32, 40), dtype=np.uint8)).save(folder / "big.png")
    args = _args(repo_root, tiny, tmp_path, f"edit.image_dir={folder}", "edit.source_class=1", "edit.center_crop=true",
                 "edit.solvers=[euler]", "edit.budgets={euler: [2]}", "eval.feature_extractor=inception")
    assert main(args) == 0
    rows = _read(tmp_path / "out" / "edit_results.csv")
    assert [(r["solver"], int(r["n_images"])) for r in rows] == [("euler", 3)]
    # No classifier configured (as for ImageNet with Inception): the class scores are NaN, and say so.
    assert rows[0]["edit_target_prob"] == rows[0]["edit_target_acc"] == "nan"
    assert "NaN: eval.feature_extractor is 'inception'" in (tmp_path / "out" / "edit_results.md").read_text()
    # The identity "VAE" of the digits: latents are the pixels in [-1, 1], in sorted path order.
    cfg = load_config(args[2], args[5:])
    inputs = load_inputs(cfg, load_backbone(tiny / "backbone.safetensors"), torch.device("cpu"))
    assert inputs.names == ["b.png", "big.png", "sub/a.png"]
    assert inputs.latents.shape == (3, 1, 8, 8) and inputs.source.tolist() == [1, 1, 1]
    expected = torch.from_numpy(grey["sub/a.png"]).float()[None] / 127.5 - 1.0
    torch.testing.assert_close(inputs.latents[2], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(inputs.images, (inputs.latents + 1) / 2, rtol=0, atol=1e-6)


def test_bad_input_fails_before_any_work(repo_root, tiny, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(small / "x.png")
    missing_side = tmp_path / "none.safetensors"
    cases = [
        (["edit.target_class=10"], ["edit.target_class is 10", "10 classes"]),
        (["edit.target_class=-1"], ["edit.target_class is -1"]),
        (["edit.source_class=12"], ["edit.source_class is 12"]),
        ([f"sidenet.path={missing_side}"], [str(missing_side), "make train"]),
        ([f"edit.image_dir={tmp_path / 'nowhere'}", "edit.source_class=1"], [str(tmp_path / "nowhere"), "not found"]),
        ([f"edit.image_dir={small}", "edit.source_class=1"], ["x.png", "4x4", "8x8", "edit.center_crop"]),
        ([f"edit.image_dir={small}"], ["edit.source_class must be set"]),
        (["edit.solvers=[eular]"], ["unknown solver 'eular'", "euler"]),
        (["edit.solvers=[heun]", "edit.budgets={heun: [7]}"], ["edit.budgets.heun", "nearest: 6 or 8"]),
        (["edit.indices=[0,5000]"], ["edit.indices", "5000"]),
        ([f"backbone.path={tmp_path / 'bb.safetensors'}"], [str(tmp_path / "bb.safetensors"), "make backbone"]),
        (["data.digits_size=16"], ["(1, 16, 16)", "(1, 8, 8)"]),
        ([f"eval.classifier_path={tmp_path / 'c.safetensors'}"], [str(tmp_path / "c.safetensors"), "make backbone"]),
        (["data.source=folder"], ["edit.image_dir is empty"]),
    ]
    for extra, needles in cases:
        assert main(_args(repo_root, tiny, tmp_path, *extra)) == 2, extra
        captured = capsys.readouterr()
        assert "done in" not in captured.err, extra  # nothing was sampled
        for needle in needles:
            assert needle in captured.err, (extra, captured.err)
    assert not (tmp_path / "out").exists()


def test_psnr_and_latent_rmse():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full((2, 1, 4, 4), 0.1)
    b[1] = 0.01
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0, 40.0], dtype=torch.float64))
    assert latent_rmse(a, b) == pytest.approx(((0.01 + 0.0001) / 2) ** 0.5)


def test_edit_with_guidance_spends_the_same_nfe(repo_root, tiny, tmp_path):
    args = _args(repo_root, tiny, tmp_path, "edit.cfg_scale=1.5", "edit.solvers=[ba,heun]",
                 "edit.budgets={ba: [3], heun: [4]}")
    assert main(args) == 0
    rows = _read(tmp_path / "out" / "edit_results.csv")
    assert [(r["solver"], int(r["nfe"]), int(r["steps"])) for r in rows] == [("ba", 3, 3), ("heun", 4, 2)]
    assert "Guidance scale 1.5" in (tmp_path / "out" / "edit_results.md").read_text()


def test_edit_encodes_a_folder_with_the_vae(tmp_path, capsys):
    """Latent experiments: RGB images -> AutoencoderKL posterior means (scaled) -> edit -> decode."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    backbone = build_sit("SiT-S/2", input_size=8, in_channels=4, num_classes=5, depth=1, hidden_size=32, num_heads=2)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_backbone(backbone, tmp_path / "bb.safetensors")
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(1)
    for name in ("x.png", "y.jpg"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / name)
    args = [
        "edit", "--out", str(tmp_path / "out"), "name=tiny_latents", "data.source=folder", "data.resolution=16",
        f"data.vae_path={tmp_path / 'vae'}", f"data.root={tmp_path / 'data'}", "data.vae_scaling_factor=0.5",
        f"backbone.path={tmp_path / 'bb.safetensors'}", "backbone.depth=1",
        "backbone.hidden_size=32", "backbone.num_heads=2", "eval.feature_extractor=inception",
        f"edit.image_dir={images}", "edit.source_class=2", "edit.target_class=4", "edit.device=cpu",
        "edit.solvers=[euler]", "edit.budgets={euler: [2]}",
    ]
    assert main(args) == 0
    rows = _read(tmp_path / "out" / "edit_results.csv")
    assert [(r["solver"], int(r["n_images"])) for r in rows] == [("euler", 2)]
    assert np.isfinite(float(rows[0]["recon_psnr"])) and float(rows[0]["recon_latent_rmse"]) > 0
    assert rows[0]["edit_target_prob"] == "nan"
    cfg = load_config(None, args[3:])
    inputs = load_inputs(cfg, load_backbone(tmp_path / "bb.safetensors"), torch.device("cpu"))
    pixels = torch.from_numpy(np.asarray(Image.open(images / "x.png"), dtype=np.float32)).permute(2, 0, 1)
    with torch.no_grad():
        mean = vae.encode(pixels[None] / 127.5 - 1.0).latent_dist.mean
    torch.testing.assert_close(inputs.latents[:1], 0.5 * mean, rtol=1e-5, atol=1e-5)
    with Image.open(tmp_path / "out" / "edit_grid.png") as grid:
        assert grid.mode == "RGB" and grid.size[1] == 14 + 3 * (16 * 4 + 2)
    # Images that do not fit the backbone (8 x 2 = 16 pixels) fail before any sampling.
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(images / "z.png")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "z.png' is 24x24 pixels" in err and "expects 16x16" in err


def test_edit_runs_on_optimized_grids_from_the_grid_file(repo_root, tiny, tmp_path, capsys):
    from bafm.solvers.grid_store import save_grid_table
    from bafm.solvers.grids import shifted_grid

    def run(name, *extra):
        assert main(_args(repo_root, tiny, tmp_path, "edit.solvers=[ba,euler,reference]", *extra)) == 0
        return _read((tmp_path / "out").rename(tmp_path / name) / "edit_results.csv")

    points = {("ba", 2): 2, ("euler", 2): 2, ("euler", 3): 3}
    grid_file = tmp_path / "grids.json"
    save_grid_table(grid_file, {p: shifted_grid(steps, 2.0, dtype=torch.float64).tolist()
                                for p, steps in points.items()}, {})
    optimized = run("optimized", "sampling.grid=optimized", f"sampling.grid_file={grid_file}")
    shift = run("shift", "sampling.grid=shift", "sampling.shift=2")
    uniform = run("uniform")
    assert [(r["solver"], r["grid"]) for r in optimized] == [
        ("ba", "optimized"), ("euler", "optimized"), ("euler", "optimized"), ("reference", "adaptive")]
    assert [r["grid"] for r in shift] == ["shift:2"] * 3 + ["adaptive"]
    for a, b, c in zip(optimized, shift, uniform):  # the stored grids are the shift-2 grids, so the numbers agree
        assert a["recon_latent_rmse"] == b["recon_latent_rmse"] and a["edit_target_prob"] == b["edit_target_prob"]
        if a["solver"] != "reference":
            assert a["recon_latent_rmse"] != c["recon_latent_rmse"]
    # A (solver, NFE) the file lacks stops the command before any sampling, naming the file.
    save_grid_table(grid_file, {("euler", 2): [1.0, 0.4, 0.0]}, {})
    capsys.readouterr()
    assert main(_args(repo_root, tiny, tmp_path, "sampling.grid=optimized", f"sampling.grid_file={grid_file}")) == 2
    err = capsys.readouterr().err
    assert f"'{grid_file}' has no grid for solver 'ba' at 2 NFE" in err and "done in" not in err
    assert not (tmp_path / "out").exists()


def test_every_sidenet_solver_edits_with_guidance(repo_root, tiny, tmp_path):
    side_solvers = ["ba", "ba-single", "ba-adaptive"]
    args = _args(repo_root, tiny, tmp_path, "edit.cfg_scale=1.5", "edit.indices=[0,1]",
                 f"edit.solvers=[{','.join(side_solvers)}]", "edit.budgets={ba: [2], ba-single: [2]}",
                 "eval.tolerances={ba-adaptive: [0.05]}")
    assert main(args) == 0
    rows = _read(tmp_path / "out" / "edit_results.csv")
    assert [r["solver"] for r in rows] == side_solvers
    assert all(math.isfinite(float(r["recon_psnr"])) for r in rows)


def test_edit_solves_ba_adaptive_at_eval_tolerances_and_the_reference_as_configured(repo_root, tiny, tmp_path,
                                                                                      monkeypatch):
    import bafm.sampling as sampling

    calls = []
    real = sampling.solve

    def recording(velocity_fn, x, solver, t_grid, side_fn=None, **options):  # every solve of the run
        calls.append((solver, options.get("rtol"), options.get("atol"), len(t_grid) - 1))
        return real(velocity_fn, x, solver, t_grid, side_fn, **options)

    monkeypatch.setattr(sampling, "solve", recording)
    extra = ["edit.solvers=[ba-adaptive,reference]", "eval.tolerances={ba-adaptive: [0.05, 0.002]}",
             "edit.batch_size=3", "eval.reference_rtol=1e-4", "eval.reference_atol=1e-6"]
    assert main(_args(repo_root, tiny, tmp_path, *extra)) == 0
    # One batch of 3 images: inversion, reconstruction and edit per row.
    assert calls == 3 * [("ba-adaptive", 0.05, 0.05, 1)] + 3 * [("ba-adaptive", 0.002, 0.002, 1)] + 3 * [
        ("reference", 1e-4, 1e-6, 1)]
    rows = _read(tmp_path / "out" / "edit_results.csv")
    assert [(r["solver"], r["grid"], r["tol"]) for r in rows] == [
        ("ba-adaptive", "adaptive", "0.05"), ("ba-adaptive", "adaptive", "0.002"), ("reference", "adaptive", "")]
    # An RK4 reference (eval.reference_solver) solves the reference row on its own uniform grid.
    calls.clear()
    assert main(_args(repo_root, tiny, tmp_path, "edit.solvers=[reference]", "eval.reference_solver=rk4",
                      "eval.reference_steps=3", "edit.batch_size=3")) == 0
    assert calls == 3 * [("rk4", None, None, 3)]
    rows = _read(tmp_path / "out" / "edit_results.csv")
    assert [(r["solver"], r["grid"], int(r["nfe"]), int(r["steps"])) for r in rows] == [("reference", "uniform", 12, 3)]
