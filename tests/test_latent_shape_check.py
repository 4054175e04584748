"""A latent shape that does not fit the backbone is a one-line error at train, sweep and edit start."""

import json
from pathlib import Path

import pytest

from bafm.cli import main
from bafm.config import load_config
from bafm.data.vae import LatentShapeError, check_latent_shape, expected_latent_shape
from factories import synthetic_shards

ROOT = Path(__file__).resolve().parents[1]
SD_VAE = {"_class_name": "AutoencoderKL", "latent_channels": 4, "block_out_channels": [128, 256, 512, 512]}


def _vae_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SD_VAE))
    return folder


@pytest.mark.parametrize("experiment, shape", [("imagenet256_sit_xl2", (4, 32, 32)),
                                               ("imagenet512_sit_xl2", (4, 64, 64))])
def test_imagenet_experiments_expect_their_latents(tmp_path, experiment, shape):
    vae = _vae_folder(tmp_path)
    cfg = load_config(ROOT / "experiments" / f"{experiment}.yaml", [f"data.vae_path={vae}", f"data.root={tmp_path}"])
    assert expected_latent_shape(cfg.data)[0] == shape
    check_latent_shape(cfg.data, shape)
    other = (4, 96 - shape[1], 96 - shape[1])  # the other resolution's latents
    with pytest.raises(LatentShapeError) as err:
        check_latent_shape(cfg.data, other, cfg.backbone.path)
    message = str(err.value)
    assert "\n" not in message
    assert (f"data.resolution={cfg.data.resolution} with the VAE at '{vae}' gives latents of shape {shape} (C, H, W), "
            f"but the backbone '{cfg.backbone.path}' expects {other}") in message
    assert "change data.resolution to match it" in message


def test_sources_of_the_expected_shape(tmp_path):
    vae = _vae_folder(tmp_path)
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    single = load_config(None, ["data.source=folder", f"data.vae_path={vae / 'diffusion_pytorch_model.safetensors'}",
                                "data.resolution=128", f"data.root={tmp_path}"])
    assert expected_latent_shape(single.data)[0] == (4, 16, 16)  # config.json beside a single weights file
    unknown = load_config(None, ["data.source=folder", f"data.vae_path={tmp_path / 'none'}", f"data.root={tmp_path}"])
    assert expected_latent_shape(unknown.data) is None  # reported where the VAE is loaded, not here
    check_latent_shape(unknown.data, (4, 32, 32))
    digits = load_config(None, [f"data.root={tmp_path}", "data.digits_size=12"])
    assert expected_latent_shape(digits.data) == ((1, 12, 12), "data.digits_size=12", "data.digits_size")
    # Shards win over the settings: they are what training reads.
    synthetic_shards(tmp_path / "digits", shape=(4, 8, 8))
    shape, where, key = expected_latent_shape(digits.data)
    assert (shape, where, key) == ((4, 8, 8), f"the shards in {tmp_path / 'digits'}", "data.dataset")


def _common(tiny: Path, tmp_path: Path) -> list:
    return ["--config", str(ROOT / "experiments" / "digits.yaml"), f"backbone.path={tiny / 'backbone.safetensors'}",
            "backbone.depth=1", "backbone.hidden_size=32", "backbone.num_heads=2",
            f"sidenet.path={tiny / 'sidenet.safetensors'}", f"eval.classifier_path={tiny / 'classifier.safetensors'}",
            f"data.root={tmp_path / 'data'}", f"runs_dir={tmp_path / 'runs'}", "data.digits_size=16"]


@pytest.mark.parametrize("command, extra", [
    ("eval-nfe-sweep", ["eval.solvers=[euler]", "eval.budgets={euler: [2]}", "eval.device=cpu", "eval.num_samples=2"]),
    ("edit", ["edit.solvers=[euler]", "edit.budgets={euler: [2]}", "edit.device=cpu"]),
])
def test_sweep_and_edit_refuse_mismatched_latents(tiny, tmp_path, capsys, command, extra):
    assert main([command, *_common(tiny, tmp_path), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"bafm {command}: latent shape mismatch: data.digits_size=16 gives latents of shape (1, 16, 16) "
                   f"(C, H, W), but the backbone '{tiny / 'backbone.safetensors'}' expects (1, 8, 8); use a backbone "
                   "trained on latents of that shape, or change data.digits_size to match it.")
    assert not (tmp_path / "out").exists()
