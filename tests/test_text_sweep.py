"""``bafm eval-nfe-sweep`` for SD3/Flux experiments on tiny local models (no network)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image
from t2i_text_factories import (
    EXPERIMENTS,
    save_pipeline,
    save_tiny_clip,
    sd3_pipeline_with_text,
    tiny_text_overrides,
    write_caption_pairs,
)

from bafm.cli import main
from bafm.eval.clip_score import clip_score_sum, load_clip_score
from bafm.eval.text_sweep import solve_text_batch
from bafm.models.diffusers_flow import FlowTransformerBackbone
from bafm.models.text_sidenet import TextSideNet, save_text_sidenet
from bafm.pipelines import ba_sample_latents, encode_prompts
from bafm.sampling import sample_noise

PROMPTS = ["a red cat", "a blue dog", "small green cat"]


@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_sweep")
    pipe = sd3_pipeline_with_text()
    pipeline_dir = save_pipeline(pipe, root / "pipeline")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    real = root / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # real images of another size: center-cropped to the samples' 16 pixels
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(real / f"{i}.png")
    torch.manual_seed(0)
    sidenet = TextSideNet(in_channels=4, pooled_dim=64, channels=8, emb_dim=8, depth=2, num_heads=2)
    torch.nn.init.normal_(sidenet.output_conv.weight, std=0.05)
    save_text_sidenet(sidenet, root / "sidenet.safetensors")
    overrides = tiny_text_overrides(root, "sd3", pipeline_dir, write_caption_pairs(root / "pairs", PROMPTS, 8))
    overrides += [f"eval.captions_file={root / 'prompts.txt'}", f"eval.reference_images={real}",
                  f"eval.clip_model={save_tiny_clip(root / 'clip')}", f"sidenet.path={root / 'sidenet.safetensors'}",
                  "eval.solvers=[ba,euler,heun]", "eval.budgets={ba: [3], euler: [3, 6], heun: [4]}",
                  "eval.num_samples=3", "eval.batch_size=2", "eval.reference_steps=8", "eval.grid_images=2",
                  "sampling.cfg_scale=2.0", "eval.device=cpu", "eval.feature_extractor=clip"]  # fmt: skip
    return pipe, root, overrides


def test_sweep_rows(sweep_inputs, capsys):
    pipe, root, overrides = sweep_inputs
    out = root / "sweep"
    assert main(["eval-nfe-sweep", "--config", EXPERIMENTS["sd3"], *overrides, "--out", str(out)]) == 0
    assert f"results: {out}" in capsys.readouterr().out
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["solver"], r["nfe"]) for r in rows] == [("reference", "32"), ("ba", "3"), ("euler", "3"),
                                                       ("euler", "6"), ("heun", "4")]  # fmt: skip
    assert {r["grid"] for r in rows[1:]} == {"sd3:3"} and rows[0]["grid"] == "uniform"
    metrics = [{k: float(r[k]) for k in ("fid", "clip_score", "fd_ref", "traj_rmse")} for r in rows]
    assert metrics[0]["fd_ref"] == 0.0 and metrics[0]["traj_rmse"] == 0.0
    assert all(m["traj_rmse"] > 0 and m["fd_ref"] > 0 for m in metrics[1:])
    assert metrics[3]["traj_rmse"] < metrics[2]["traj_rmse"]  # Euler converges toward the reference
    assert all(math.isfinite(m["fid"]) and 0.0 <= m["clip_score"] <= 100.0 for m in metrics)
    assert sorted(p.name for p in (out / "grids").iterdir())[0] == "ba_nfe003.png"


def test_sweep_batches_match_the_plug_in(sweep_inputs):
    # The sweep's solve of a batch is the pipeline plug-in's, from the same noise and prompts.
    pipe, _, _ = sweep_inputs
    noise = sample_noise(torch.arange(2), (4, 16, 16), seed=7)
    with torch.no_grad():  # as the plug-in encodes (autograd would pick other attention kernels)
        cond, negative = encode_prompts(pipe, "sd3", PROMPTS[:2], "", True, 6)
    backbone = FlowTransformerBackbone(pipe.transformer, "sd3")
    ours = solve_text_batch(backbone, None, "euler", 4, noise, cond, negative, cfg_scale=2.0, interval=(0.0, 1.0),
                            grid="sd3", shift=3.0)  # fmt: skip
    plug_in = ba_sample_latents(pipe, None, PROMPTS[:2], nfe=4, solver="euler", guidance_scale=2.0,
                                negative_prompt="", latents=noise, max_sequence_length=6, interval=(0.0, 1.0))
    torch.testing.assert_close(ours.x, plug_in.x, rtol=0, atol=0)
    assert ours.nfe == plug_in.nfe == 4


def test_clip_score_is_torchmetrics_cosine(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = save_tiny_clip(tmp_path / "clip")
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    total, count = clip_score_sum(load_clip_score(str(folder)), images, PROMPTS)
    model, processor = CLIPModel.from_pretrained(str(folder)), CLIPProcessor.from_pretrained(str(folder))
    uint8 = (images * 255).round().to(torch.uint8)
    inputs = processor(text=PROMPTS, images=list(uint8), return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
    expected = 100 * torch.nn.functional.cosine_similarity(image, text).sum()
    assert count == 3 and total == pytest.approx(float(expected), rel=1e-5)


def test_offline_clip_model_is_one_line(sweep_inputs, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _, root, overrides = sweep_inputs
    args = [*overrides, "eval.clip_model=openai/clip-vit-large-patch14", "--out", str(root / "offline")]
    assert main(["eval-nfe-sweep", "--config", EXPERIMENTS["sd3"], *args]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bafm")]
    assert len(ours) == 1 and "eval.clip_model 'openai/clip-vit-large-patch14': cannot load CLIP" in ours[0]


def test_text_paths_resolve_against_the_checkout_and_hub_ids_stay(repo_root, tmp_path, monkeypatch):
    from bafm.config import load_config

    monkeypatch.chdir(tmp_path)  # any working folder gives the same paths
    cfg = load_config(repo_root / "experiments" / "sd3_medium.yaml")
    assert cfg.eval.captions_file == str(repo_root / "data" / "coco2014_val_captions.jsonl")
    assert cfg.eval.clip_model == "openai/clip-vit-large-patch14"
    assert cfg.backbone.path == "stabilityai/stable-diffusion-3-medium-diffusers"
    cfg = load_config(repo_root / "experiments" / "sd3_medium.yaml", ["eval.clip_model=clip", "data.captions_file=c.csv"])
    assert (cfg.eval.clip_model, cfg.data.captions_file) == (str(tmp_path / "clip"), str(tmp_path / "c.csv"))
