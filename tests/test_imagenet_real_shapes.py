"""The ImageNet path at real latent shapes (slow): data -> train -> eval-nfe-sweep -> edit.

Everything is random and built in ``tmp_path``: a few ImageNet-style JPEGs in class folders, an
SD-VAE-architecture diffusers ``AutoencoderKL``, a SiT of XL width and patch (hidden 1152,
patch 2, 16 heads) with two blocks in a REPA training checkpoint, torch-fidelity-layout
Inception weights and ADM-layout reference statistics. The experiment file is the real
``experiments/imagenet256_sit_xl2.yaml``; only paths and sizes are overridden.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from bafm.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "imagenet256_sit_xl2.yaml"

# stabilityai/sd-vae-ft-ema's architecture (diffusers AutoencoderKL config).
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=256,
    block_out_channels=[128, 256, 512, 512], act_fn="silu", scaling_factor=0.18215,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)


def _sd_vae(folder: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(folder, safe_serialization=True)


def _xl_width_sit(path: Path) -> None:
    """SiT-XL/2 width, patch and heads, two blocks, 1000 classes, as a REPA training checkpoint."""
    from bafm.models.sit import build_sit

    torch.manual_seed(0)
    model = build_sit("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000, depth=2)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero starts at zero: give the field some structure
            p.add_(0.02 * torch.randn_like(p))
    ema = model.state_dict()
    torch.save({"ema": ema, "args": argparse.Namespace(model="SiT-XL/2", resolution=256)}, path)


def _inception(path: Path) -> None:
    """A random state dict in torch-fidelity's inception-v3-compat layout."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    torch.manual_seed(0)
    with mock.patch.object(fidelity, "load_state_dict_from_url", return_value={}), mock.patch.object(
        fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None
    ):
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)


def _adm_stats(path: Path) -> None:
    """ADM reference-batch layout: ``mu``/``sigma`` (2048-d pool) and ``mu_s``/``sigma_s`` (2023-d spatial)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for suffix, dim in (("", 2048), ("_s", 2023)):
        a = rng.standard_normal((dim, 64)) * 0.1
        arrays.update({f"mu{suffix}": rng.standard_normal(dim) * 0.1, f"sigma{suffix}": a @ a.T + 1e-3 * np.eye(dim)})
    np.savez(path, **arrays)


def _imagenet_folder(root: Path) -> None:
    """Two classes of two JPEGs each, not square and larger than 256 (the ADM crop is exercised)."""
    rng = np.random.default_rng(0)
    for cls in ("n01440764", "n01443537"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (300, 340, 3), dtype=np.uint8)).save(root / cls / f"{i}.JPEG")


def _rows(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_imagenet_path_at_real_shapes(tmp_path, capsys):
    start = time.perf_counter()
    images = tmp_path / "imagenet"
    _imagenet_folder(images)
    _sd_vae(tmp_path / "vae")
    _xl_width_sit(tmp_path / "repa.pt")
    _inception(tmp_path / "inception.pth")
    _adm_stats(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    setup = time.perf_counter() - start
    common = [
        "--config", str(EXPERIMENT),
        f"data.root={tmp_path / 'data'}", f"runs_dir={tmp_path / 'runs'}", f"checkpoints_dir={tmp_path / 'ckpt'}",
        f"data.image_dir={images}", f"data.vae_path={tmp_path / 'vae'}", "data.encode_batch_size=2",
        "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4",
        f"backbone.path={tmp_path / 'repa.pt'}", "backbone.depth=2",
        f"eval.inception_weights={tmp_path / 'inception.pth'}",
        f"eval.reference_stats={tmp_path / 'VIRTUAL_imagenet256_labeled.npz'}",
    ]

    assert main(["data", *common]) == 0
    shards = sorted((tmp_path / "data" / "imagenet256").glob("train-*.tar"))
    assert shards

    assert main(["train", *common, "trainer.max_steps=1", "trainer.accelerator=cpu", "trainer.precision=32-true",
                 "trainer.enable_progress_bar=false"]) == 0
    sidenet = tmp_path / "runs" / "imagenet256_sit_xl2" / "sidenet.safetensors"  # the training export
    assert sidenet.is_file()
    assert not (tmp_path / "runs" / "imagenet256_sit_xl2" / "train_sweeps").exists()  # no sweep fell due

    capsys.readouterr()
    assert main(["eval-nfe-sweep", *common, "--out", str(tmp_path / "sweep"), "eval.num_samples=2",
                 "eval.batch_size=2", "eval.reference_batch_size=2", "eval.solvers=[ba,euler]",
                 "eval.budgets={ba: [2], euler: [2]}", "eval.reference_steps=2", "eval.device=cpu",
                 "eval.grid_images=2", "eval.is_splits=1"]) == 0
    out = capsys.readouterr().out
    rows = _rows(tmp_path / "sweep" / "results.csv")
    assert [(r["solver"], int(r["nfe"])) for r in rows] == [("reference", 8), ("ba", 2), ("euler", 2)]
    assert all(np.isfinite(float(r["fid"])) and np.isfinite(float(r["sfid"])) for r in rows)
    assert "reference: rk4, 2 steps, 8 NFE per sample" in out
    npz = np.load(next((tmp_path / "sweep" / "samples").glob("ba*.npz")))
    assert npz["arr_0"].shape == (2, 256, 256, 3) and npz["arr_0"].dtype == np.uint8

    assert main(["edit", *common, "--out", str(tmp_path / "edit"), f"edit.image_dir={images / 'n01440764'}",
                 "edit.source_class=0", "edit.target_class=1", "edit.center_crop=true", "edit.solvers=[ba,euler]",
                 "edit.budgets={ba: [2], euler: [2]}", "edit.device=cpu", "edit.batch_size=2"]) == 0
    rows = _rows(tmp_path / "edit" / "edit_results.csv")
    assert [(r["solver"], int(r["nfe"]), int(r["n_images"])) for r in rows] == [("ba", 2, 2), ("euler", 2, 2)]
    assert all(np.isfinite(float(r["recon_psnr"])) for r in rows)
    print(f"ImageNet real-shape path: {time.perf_counter() - start:.0f} s ({setup:.0f} s making the models)")
