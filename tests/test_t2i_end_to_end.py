"""SD3 and Flux end to end at tiny size on the CPU: image-caption pairs -> ``bafm data`` ->
``bafm train`` (2 steps) -> ``bafm eval-nfe-sweep`` -> ``bafm sample``, from the experiment files."""

from __future__ import annotations

import csv
import json
import math

import pytest
from factories import random_inception_weights
from PIL import Image
from t2i_text_factories import (
    EXPERIMENTS,
    PIPELINES,
    save_pipeline,
    save_tiny_clip,
    tiny_text_overrides,
    write_caption_pairs,
)

from bafm.cli import main
from bafm.data.manifest import read_manifest
from bafm.models.text_sidenet import load_text_sidenet

CAPTIONS = ["a red cat", "a blue dog on the green", "small cat", "big dog with a red cat", "a green dog", ""]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pairs_to_shards_to_sidenet_to_sweep_to_pngs(family, tmp_path, capsys):
    exp = EXPERIMENTS[family]
    name = "sd3_medium" if family == "sd3" else "flux1_dev"
    pipeline = PIPELINES[family](guidance_embeds=True) if family == "flux" else PIPELINES[family]()
    pipeline_dir = save_pipeline(pipeline, tmp_path / "pipeline")
    pairs = write_caption_pairs(tmp_path / "pairs", CAPTIONS, size=8)
    args = ["--config", exp, *tiny_text_overrides(tmp_path, family, pipeline_dir, pairs)]

    # Data: latents and prompt embeddings of the pipeline's own VAE and text encoders.
    assert main(["data", *args]) == 0
    manifest = read_manifest(tmp_path / "data" / f"{name}_captions")
    assert manifest["splits"]["train"]["count"] == len(CAPTIONS) and manifest["text"]["family"] == family

    # Training: two steps of the chain loss beside the frozen transformer; the EMA export.
    assert main(["train", *args, "trainer.max_steps=2"]) == 0
    export = tmp_path / "runs" / name / "sidenet.safetensors"
    assert load_text_sidenet(export).pooled_dim == (64 if family == "sd3" else 32)

    # Sweep: BA on the trained SideNet against Euler, reference rk4; FID against the pairs' images.
    (tmp_path / "prompts.txt").write_text("\n".join(CAPTIONS[:3]) + "\n")
    features = (["eval.feature_extractor=inception",
                 f"eval.inception_weights={random_inception_weights(tmp_path / 'inception.pth')}"]
                if family == "sd3" else ["eval.feature_extractor=clip"])  # fmt: skip
    sweep = tmp_path / "sweep"
    assert main(["eval-nfe-sweep", *args, *features, f"eval.captions_file={tmp_path / 'prompts.txt'}",
                 f"eval.reference_images={pairs}", f"eval.clip_model={save_tiny_clip(tmp_path / 'clip')}",
                 "eval.solvers=[ba,euler]", "eval.budgets={ba: [3], euler: [3]}", "eval.num_samples=3",
                 "eval.batch_size=3", "eval.reference_steps=4", "eval.device=cpu", "--out", str(sweep)]) == 0
    with open(sweep / "results.csv") as f:
        rows = {r["solver"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"reference", "ba", "euler"} and rows["ba"]["nfe"] == "3"
    assert all(math.isfinite(float(rows[s][m])) for s in rows for m in ("fid", "clip_score", "fd_ref", "traj_rmse"))

    # Sampling: PNGs from the trained SideNet through the pipeline.
    out = tmp_path / "samples"
    assert main(["sample", *args, "prompt=a red cat", "sample.nfe=3", "sample.num_images=2", "--out", str(out)]) == 0
    assert Image.open(out / "000001.png").size == (16, 16)
    assert json.loads((out / "samples.json").read_text())["sidenet"] == str(export)
    capsys.readouterr()
