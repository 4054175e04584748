"""Embedded default data: scikit-learn digits -> identity "VAE" -> shards, via `bafm data`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from bafm.cli import main
from bafm.config import load_config
from bafm.data.datamodule import LatentDataModule
from bafm.data.digits import (digits_options, digits_pixels, digits_split_indices, ensure_digits_shards,
                               load_digits_images)  # fmt: skip
from bafm.data.manifest import read_manifest
from bafm.data.npy_codec import decode_npy
from bafm.data.shard_reader import iter_samples, open_shard
from bafm.data.vae import build_decoder, decoder_options


def _ensure(cfg):
    return ensure_digits_shards(cfg.data, cfg.seed)


def test_split_is_fixed_by_seed_disjoint_and_covering() -> None:
    a, b, c = digits_split_indices(0, 0.2), digits_split_indices(0, 0.2), digits_split_indices(1, 0.2)
    np.testing.assert_array_equal(a["train"], b["train"])
    assert not np.array_equal(a["val"], c["val"])
    assert len(a["val"]) == 359 and len(a["train"]) == 1438
    assert not set(a["train"]) & set(a["val"])
    np.testing.assert_array_equal(np.sort(np.concatenate([a["train"], a["val"]])), np.arange(1797))
    with pytest.raises(ValueError, match="val_fraction"):
        digits_split_indices(0, 1.0)


def test_pixels_scaling_and_upsampling() -> None:
    raw = torch.from_numpy(load_digits().images).float()  # (1797, 8, 8) in 0..16
    images8, labels = digits_pixels(8)
    torch.testing.assert_close(images8[:, 0], raw / 8.0 - 1.0, rtol=0, atol=0)
    images16, _ = digits_pixels(16)
    assert images16.shape == (1797, 1, 16, 16) and images16.dtype == torch.float32
    assert float(images16.min()) == -1.0 and float(images16.max()) == 1.0
    # Bilinear, align_corners=False, 2x: an interior output pixel is 3/4 of its source pixel
    # plus 1/4 of the neighbour on each axis.
    x = images8[:, 0]
    expected = (9 * x[:, 2, 2] + 3 * x[:, 2, 1] + 3 * x[:, 1, 2] + x[:, 1, 1]) / 16
    torch.testing.assert_close(images16[:, 0, 4, 4], expected)
    torch.testing.assert_close(images16, F.interpolate(images8, size=16, mode="bilinear", align_corners=False))
    np.testing.assert_array_equal(labels.numpy(), load_digits().target)


def test_bafm_data_writes_digits_shards(tmp_path: Path) -> None:
    assert main(["data", f"data.root={tmp_path}", "data.samples_per_shard=500"]) == 0
    cfg = load_config(None, [f"data.root={tmp_path}"])
    folder = tmp_path / "digits"
    manifest = read_manifest(folder)
    assert manifest["scaling_factor"] == 1.0 and manifest["moments_shape"] == [2, 16, 16]
    assert manifest["latent_shape"] == [1, 16, 16] and not manifest["has_flip"] and manifest["num_classes"] == 10
    counts = {s: e["count"] for s, e in manifest["splits"].items()}
    assert counts == {"train": 1438, "val": 359} and sum(counts.values()) == 1797
    assert manifest["splits"]["train"]["num_shards"] == 3
    for split in ("train", "val"):
        images, labels = load_digits_images(split, **digits_options(cfg.data, cfg.seed))
        samples = [s for rec in manifest["splits"][split]["shards"]
                   for s in iter_samples(open_shard(str(folder / rec["name"])), rec["name"])]
        assert len(samples) == len(labels) and all("moments_flip.npy" not in s for s in samples)
        idx = digits_split_indices(0, 0.2)[split]
        assert [s["__key__"] for s in samples] == [f"{i:04d}" for i in idx]
        moments = torch.from_numpy(np.stack([decode_npy(s["moments.npy"]) for s in samples]))
        assert moments.dtype == torch.float16
        torch.testing.assert_close(moments[:, :1], images.half(), rtol=0, atol=0)
        torch.testing.assert_close(moments[:, 1:], torch.zeros_like(moments[:, 1:]), rtol=0, atol=0)
        assert [int(s["cls"]) for s in samples] == labels.tolist()
        assert float(moments.min()) >= -1.0 and float(moments.max()) <= 1.0


def test_ensure_digits_shards_writes_once_and_checks_settings(tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.root={tmp_path}"])
    folder = ensure_digits_shards(cfg.data, cfg.seed)
    assert folder == tmp_path / "digits"
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")}
    assert ensure_digits_shards(cfg.data, cfg.seed) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")} == stamp  # nothing rewritten
    with pytest.raises(ValueError, match="other settings"):
        _ensure(load_config(None, [f"data.root={tmp_path}", "seed=3"]))
    other = _ensure(load_config(None, [f"data.root={tmp_path}", "seed=3", "data.dataset=digits_s3"]))
    assert read_manifest(other)["preprocessing"]["seed"] == 3

    dm = LatentDataModule(cfg.data, seed=cfg.seed)
    dm.setup("fit")
    assert dm.latent_shape == (1, 16, 16) and dm.num_classes == 10 and dm.scaling_factor == 1.0
    batch = next(iter(dm.eval_dataloader("val", batch_size=359)))
    images, labels = load_digits_images("val", **digits_options(cfg.data, cfg.seed))
    torch.testing.assert_close(batch["latent"], images.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(batch["cls"], labels, rtol=0, atol=0)
    decoded = build_decoder(**decoder_options(cfg.data))(batch["latent"])
    torch.testing.assert_close(decoded, ((images.half().float() + 1) / 2).clamp(0, 1))


def test_out_folder_and_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "--out", str(tmp_path / "elsewhere"), f"data.root={tmp_path / 'unused'}"]) == 0
    assert (tmp_path / "elsewhere" / "manifest.json").is_file() and not (tmp_path / "unused").exists()
    capsys.readouterr()
    assert main(["data", f"data.root={tmp_path}", "data.val_fraction=0"]) == 2  # checked at load
    assert capsys.readouterr().err == "bafm data: config error: 'data.val_fraction' is 0.0, expected a fraction in (0, 1).\n"
