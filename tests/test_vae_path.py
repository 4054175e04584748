"""Real-data path on CPU: image folder -> ADM crop -> tiny AutoencoderKL -> shards -> loader -> decode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bafm.cli import main
from bafm.config import load_config
from bafm.data.datamodule import LatentDataModule
from bafm.data.images import center_crop_arr, list_images, load_image
from bafm.data.manifest import read_manifest
from bafm.data.npy_codec import decode_npy
from bafm.data.shard_reader import iter_samples, open_shard
from bafm.data.vae import build_decoder, decoder_options, load_autoencoder

RES = 32


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=RES,
    )
    with torch.no_grad():  # a visibly non-trivial posterior std
        vae.quant_conv.bias[4:].fill_(-1.0)
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images") / "train"
    rng = np.random.default_rng(0)
    sizes = [(50, 40), (90, 70), (33, 64), (128, 96), (40, 40)]
    for c, name in enumerate(["n02", "n01"]):  # sorted: n01 -> class 0, n02 -> class 1
        (root / name).mkdir(parents=True)
        for j in range(3 + c):
            w, h = sizes[(j + c) % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"img{j}.png")
    (root / "n01" / "notes.txt").write_text("not an image")
    return root


def test_center_crop_matches_adm(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    # Short side already the target: no resampling, only the center crop.
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(arr), 64), arr[:, 32:96])
    # 256 -> two BOX halvings (256 >= 128, 128 >= 128) -> 64, no bicubic step: 4x4 block means,
    # up to PIL's rounding after each halving.
    big = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    halved = Image.fromarray(big).resize((128, 128), Image.BOX).resize((64, 64), Image.BOX)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(big), 64), np.asarray(halved))
    blocks = big.reshape(64, 4, 64, 4, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_allclose(center_crop_arr(Image.fromarray(big), 64), blocks, atol=2.0)
    # 100x150 -> 64: no halving (100 < 128), bicubic to 64x96, 16 columns cut on each side.
    mid = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(mid).resize((96, 64), Image.BICUBIC))
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(mid), 64), resized[:, 16:80])
    out = center_crop_arr(Image.fromarray(rng.integers(0, 256, (100, 600, 3), dtype=np.uint8)), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_list_images_folder_and_list_file(image_dir: Path, tmp_path: Path) -> None:
    images = list_images(image_dir)
    assert images.class_names == ["n01", "n02"]
    assert images.paths == ["n01/img0.png", "n01/img1.png", "n01/img2.png", "n01/img3.png",
                            "n02/img0.png", "n02/img1.png", "n02/img2.png"]
    assert images.labels == [0, 0, 0, 0, 1, 1, 1]
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nn02/img1.png 7\n\nn01/img0.png 2\n")
    from_list = list_images(image_dir, listing)
    assert from_list.paths == ["n02/img1.png", "n01/img0.png"] and from_list.labels == [7, 2]
    assert len(from_list.class_names) == 8
    listing.write_text("n02/img1.png seven\n")
    with pytest.raises(ValueError, match=r"list.txt:1: expected '<relative path> <label>'"):
        list_images(image_dir, listing)
    with pytest.raises(FileNotFoundError, match="data.image_dir"):
        list_images(tmp_path / "missing")


def test_loading_from_folder_file_and_errors(vae_dir: Path, tmp_path: Path) -> None:
    x = torch.rand(2, 3, RES, RES) * 2 - 1
    ref_mean, ref_std = load_autoencoder(vae_dir).encode_moments(x)
    assert ref_mean.shape == (2, 4, RES // 2, RES // 2) and bool((ref_std > 0).all())
    # Single .safetensors file with its config.json beside it.
    codec = load_autoencoder(vae_dir / "diffusion_pytorch_model.safetensors")
    mean, std = codec.encode_moments(x)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=0)
    torch.testing.assert_close(std, ref_std, rtol=0, atol=0)
    # A pipeline folder with the VAE in vae/.
    shutil.copytree(vae_dir, tmp_path / "pipe" / "vae")
    torch.testing.assert_close(load_autoencoder(tmp_path / "pipe").encode_moments(x)[0], ref_mean, rtol=0, atol=0)

    with pytest.raises(FileNotFoundError, match="data.vae_path is empty.*checkpoints/vae"):
        load_autoencoder("")
    with pytest.raises(FileNotFoundError, match="does not exist.*checkpoints/vae"):
        load_autoencoder(tmp_path / "nowhere")
    lonely = tmp_path / "lonely" / "vae.safetensors"
    lonely.parent.mkdir()
    shutil.copy(vae_dir / "diffusion_pytorch_model.safetensors", lonely)
    with pytest.raises(FileNotFoundError, match="needs its config.json"):
        load_autoencoder(lonely)
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(vae_dir, partial)
    state = load_file(str(partial / "diffusion_pytorch_model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("decoder.")}, str(partial / "w.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['decoder\."):
        load_autoencoder(partial / "w.safetensors")


def test_bafm_data_folder_end_to_end(vae_dir: Path, image_dir: Path, tmp_path: Path) -> None:
    overrides = [f"data.root={tmp_path}", "data.dataset=tiny", "data.source=folder", f"data.image_dir={image_dir}",
                 f"data.vae_path={vae_dir}", f"data.resolution={RES}", "data.samples_per_shard=3",
                 "data.encode_batch_size=2"]
    assert main(["data", *overrides]) == 0
    folder = tmp_path / "tiny"
    manifest = read_manifest(folder)
    assert manifest["latent_shape"] == [4, RES // 2, RES // 2] and manifest["moments_shape"] == [8, RES // 2, RES // 2]
    assert manifest["has_flip"] and manifest["scaling_factor"] == 0.18215 and manifest["num_classes"] == 2
    assert manifest["encoder"]["kind"] == "autoencoder_kl" and manifest["preprocessing"]["resolution"] == RES
    split = manifest["splits"]["train"]
    assert split["count"] == 7 and split["num_shards"] == 3 and split["class_counts"] == [4, 3]

    codec = load_autoencoder(vae_dir)
    images = list_images(image_dir)
    samples = [s for rec in split["shards"] for s in iter_samples(open_shard(str(folder / rec["name"])), rec["name"])]
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(7)]
    for i, s in enumerate(samples):
        x = load_image(image_dir / images.paths[i], RES)[None]
        mean, std = codec.encode_moments(x)
        fmean, fstd = codec.encode_moments(x.flip(-1))
        moments, flipped = decode_npy(s["moments.npy"]), decode_npy(s["moments_flip.npy"])
        assert moments.dtype == np.float16 and int(s["cls"]) == images.labels[i]
        torch.testing.assert_close(torch.from_numpy(moments.copy()).float(), torch.cat([mean, std], 1)[0].half().float(),
                                   rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(torch.from_numpy(flipped.copy()).float(), torch.cat([fmean, fstd], 1)[0].half().float(),
                                   rtol=1e-3, atol=1e-3)

    # Loader -> decoder round trip.
    cfg = load_config(None, overrides + ["data.batch_size=4"])  # at most the split's 7 images
    dm = LatentDataModule(cfg.data, seed=cfg.seed)
    dm.setup("fit")
    assert dm.latent_shape == (4, RES // 2, RES // 2) and dm.has_flip
    batch = next(iter(dm.eval_dataloader("train", batch_size=4)))
    assert batch["latent"].shape == (4, 4, RES // 2, RES // 2)
    decode = build_decoder(**decoder_options(cfg.data))
    images_out = decode(batch["latent"])
    assert images_out.shape == (4, 3, RES, RES) and float(images_out.min()) >= 0 and float(images_out.max()) <= 1
    expected = ((codec.decode(batch["latent"] / 0.18215) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(images_out, expected)

    # Re-running finds everything done and changes nothing.
    before = json.loads((folder / "manifest.json").read_text())
    assert main(["data", *overrides]) == 0
    assert json.loads((folder / "manifest.json").read_text()) == before


def test_bafm_data_reports_missing_weights(image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["data", f"data.root={tmp_path}", "data.source=folder", f"data.image_dir={image_dir}",
                 f"data.vae_path={tmp_path / 'no-vae'}"])
    assert code == 2  # bad input, one line (bafm.cli's mapping)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bafm data: VAE path ") and "does not exist" in err
