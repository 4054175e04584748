"""``bafm sample``: PNGs from a saved tiny SD3 / Flux pipeline folder, offline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from t2i_text_factories import flux_pipeline_with_text, save_pipeline, sd3_pipeline_with_text

from bafm.cli import main
from bafm.models.text_sidenet import TextSideNet, save_text_sidenet
from bafm.pipelines import ba_generate


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    pipe = sd3_pipeline_with_text()
    torch.manual_seed(0)
    sidenet = TextSideNet(in_channels=4, pooled_dim=64, channels=8, emb_dim=16, depth=1, num_heads=2, frequency_dim=16)
    save_text_sidenet(sidenet, root / "sidenet.safetensors")
    return save_pipeline(pipe, root / "pipe"), root / "sidenet.safetensors"


def _args(folder, sidenet, out, *extra):
    return ["sample", "backbone.source=sd3", f"backbone.path={folder}", f"sidenet.path={sidenet}",
            "sample.height=16", "sample.width=16", "sample.nfe=3", "sampling.grid=sd3", "sampling.shift=3.0",
            "sampling.cfg_scale=4.0", "sampling.guidance_interval=[0.0,1.0]", "--out", str(out), *extra]  # fmt: skip


def test_bafm_sample_writes_the_pngs_ba_generate_gives(sd3_folder, tmp_path, capsys):
    folder, sidenet = sd3_folder
    out = tmp_path / "samples"
    assert main(_args(folder, sidenet, out, 'prompt=a red cat', "sample.num_images=2", "sample.seed=4")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000004.png", "000005.png", "samples.json"]
    meta = json.loads((out / "samples.json").read_text())
    assert (meta["prompt"], meta["nfe"], meta["seeds"]) == ("a red cat", 3, [4, 5])
    # Independent path: the Python plug-in on the same pipeline files, SideNet and settings.
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    expected = ba_generate(pipe, sidenet, ["a red cat"] * 2, nfe=3, guidance_scale=4.0, interval=(0.0, 1.0),
                           height=16, width=16, seed=4)
    for index, image in enumerate(expected):
        written = np.asarray(Image.open(out / f"{4 + index:06d}.png"))
        assert written.shape == (16, 16, 3)
        np.testing.assert_array_equal(written, np.asarray(image))


def test_bafm_sample_flux_euler_needs_no_sidenet(tmp_path):
    folder = save_pipeline(flux_pipeline_with_text(guidance_embeds=True), tmp_path / "flux")
    out = tmp_path / "out"
    args = ["sample", "backbone.source=flux", f"backbone.path={folder}", "prompt=a dog", "sample.solver=euler",
            "sample.nfe=2", "sample.height=16", "sample.width=16", "sampling.grid=flux", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert Image.open(out / "000000.png").size == (16, 16)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["backbone.source=repa"], "draws from a text-to-image pipeline"),
        (['prompt="  "'], "no prompt"),
        (["prompt=x", "backbone.path=/nonexistent/pipe"], "no such folder, and not a hub id"),
        (["prompt=x", "sidenet.path=/nonexistent/side.safetensors"], "no trained text SideNet"),
        (["prompt=x", "sample.solver=bogus"], "not a registered solver"),
    ],
)
def test_bafm_sample_bad_input_is_one_line(sd3_folder, tmp_path, capsys, extra, message):
    folder, sidenet = sd3_folder
    assert main(_args(folder, sidenet, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bafm_sample_not_a_pipeline_folder(sd3_folder, tmp_path, capsys):
    _, sidenet = sd3_folder
    (tmp_path / "empty").mkdir()
    assert main(_args(tmp_path / "empty", sidenet, tmp_path / "o", "prompt=x")) == 2
    err = capsys.readouterr().err
    assert "not a diffusers pipeline folder (missing" in err and "model_index.json" in err


def test_bafm_sample_offline_hub_id_is_one_line(sd3_folder, tmp_path, capsys, monkeypatch):
    _, sidenet = sd3_folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert main(_args("owner/not-downloaded", sidenet, tmp_path / "o", "prompt=x")) == 2
    err = capsys.readouterr().err.strip()
    assert "owner/not-downloaded: cannot load a StableDiffusion3Pipeline (offline or not downloaded" in err
    assert len(err.splitlines()) == 1


def test_hub_ids_stay_hub_ids_and_folders_resolve(tmp_path, monkeypatch):
    from bafm.config import load_config

    exp = load_config("experiments/sd3_medium.yaml")
    assert exp.backbone.path == "stabilityai/stable-diffusion-3-medium-diffusers"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "pipe").mkdir(parents=True)  # a relative folder of the same shape is a path
    cfg = load_config(None, ["backbone.source=sd3", "backbone.path=local/pipe"])
    assert cfg.backbone.path == str(tmp_path / "local" / "pipe")
    sit = load_config(None, ["backbone.path=owner/name"])  # not a diffusers backbone: a path as before
    assert sit.backbone.path == str(tmp_path / "owner" / "name")


def test_bafm_sample_never_overwrites_committed_files(sd3_folder, tmp_path, capsys):
    import subprocess

    folder, sidenet = sd3_folder
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "000000.png").write_bytes(b"committed")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "000000.png"], check=True)
    assert main(_args(folder, sidenet, repo, "prompt=x")) == 2
    assert "would overwrite files committed to git" in capsys.readouterr().err
    assert (repo / "000000.png").read_bytes() == b"committed"
