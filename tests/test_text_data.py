"""``bafm data`` for image-caption pairs: listing, the pipeline's own VAE and encode_prompt, shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from t2i_text_factories import flux_pipeline_with_text, save_pipeline, sd3_pipeline_with_text, write_caption_pairs

from bafm.cli import main
from bafm.config import load_config
from bafm.data.captions import list_caption_pairs
from bafm.data.datamodule import LatentDataModule
from bafm.data.images import load_image
from bafm.data.manifest import read_manifest
from bafm.data.npy_codec import decode_npy
from bafm.data.prepare import run as run_data
from bafm.data.shard_reader import iter_samples, open_shard
from bafm.data.text_prepare import bytes_per_sample, load_null_condition

CAPTIONS = ["a red cat", "a blue dog on the green", "small cat", "", "big dog with a red cat"]
BUILDERS = {"sd3": sd3_pipeline_with_text, "flux": flux_pipeline_with_text}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def prepared(request, tmp_path_factory):
    """Pairs, the saved pipeline, and the shards ``bafm data`` wrote from them."""
    family = request.param
    root = tmp_path_factory.mktemp(f"text_data_{family}")
    pipe = BUILDERS[family]()
    pipeline_dir = save_pipeline(pipe, root / "pipeline")
    images = write_caption_pairs(root / "pairs", CAPTIONS, size=8)
    cfg = load_config(None, [f"backbone.source={family}", f"backbone.path={pipeline_dir}", "data.source=captions",
                             f"data.image_dir={images}", f"data.root={root / 'data'}", "data.dataset=pairs",
                             "data.resolution=8", "data.max_sequence_length=6", "data.samples_per_shard=2",
                             "data.encode_batch_size=3"])  # fmt: skip
    assert run_data(cfg) == 0
    return family, pipe, cfg, root / "data" / "pairs"


def _samples(folder):
    manifest = read_manifest(folder)
    out = []
    for rec in manifest["splits"]["train"]["shards"]:
        out += list(iter_samples(open_shard(str(folder / rec["name"])), rec["name"]))
    return manifest, out


def test_shards_hold_the_pipelines_own_latents_and_prompt_embeddings(prepared):
    family, pipe, cfg, folder = prepared
    manifest, samples = _samples(folder)
    assert manifest["splits"]["train"]["num_shards"] == 3 and len(samples) == len(CAPTIONS)
    assert manifest["scaling_factor"] == pytest.approx(pipe.vae.config.scaling_factor)
    assert manifest["shift_factor"] == pytest.approx(pipe.vae.config.shift_factor)
    tokens = 77 + 6 if family == "sd3" else 6
    pooled_dim = 64 if family == "sd3" else 32
    assert manifest["extra_arrays"] == {"prompt_embeds.npy": [tokens, 32], "pooled.npy": [pooled_dim]}
    # Independent values: the in-memory pipeline's own encode_prompt and VAE on the same inputs.
    with torch.no_grad():
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=6)  # fmt: skip
        else:
            embeds, pooled, _ = pipe.encode_prompt(CAPTIONS, None, max_sequence_length=6)
        image = torch.stack([load_image(folder.parent.parent / "pairs" / f"img{i:03d}.png", 8) for i in range(5)])
        posterior = pipe.vae.encode(image).latent_dist
    for i, sample in enumerate(samples):
        assert bytes(sample["txt"]).decode() == CAPTIONS[i]
        np.testing.assert_array_equal(decode_npy(sample["prompt_embeds.npy"]), embeds[i].half().numpy())
        np.testing.assert_array_equal(decode_npy(sample["pooled.npy"]), pooled[i].half().numpy())
        moments = decode_npy(sample["moments.npy"]).astype(np.float32)
        c = moments.shape[0] // 2
        np.testing.assert_allclose(moments[:c], posterior.mean[i].numpy(), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(moments[c:], posterior.std[i].numpy(), rtol=1e-3, atol=1e-3)
    null = load_null_condition(folder)
    np.testing.assert_array_equal(null.pooled[0].numpy(), pooled[CAPTIONS.index("")].half().numpy())


def test_loader_batches_carry_embeddings_and_shifted_scaled_latents(prepared):
    family, pipe, cfg, folder = prepared
    data = LatentDataModule(cfg.data, seed=0)
    batch = next(iter(data.eval_dataloader("train", batch_size=5)))
    assert batch["prompt_embeds"].dtype == torch.float16 and batch["pooled"].shape[0] == 5
    _, samples = _samples(folder)
    moments = torch.stack([torch.from_numpy(decode_npy(s["moments.npy"]).astype(np.float32)) for s in samples])
    c = moments.shape[1] // 2
    # latent = (mean + std * eps - shift) * scale, so eps recovered this way is standard normal.
    eps = (batch["latent"] / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor - moments[:, :c])
    eps = eps / moments[:, c:]
    assert abs(eps.mean().item()) < 0.15 and abs(eps.std().item() - 1.0) < 0.15


def test_a_lost_shard_is_rewritten_identically(prepared):
    family, pipe, cfg, folder = prepared
    before = json.loads((folder / "manifest.json").read_text())
    (folder / "train-000001.tar").unlink()
    assert run_data(cfg) == 0
    assert json.loads((folder / "manifest.json").read_text())["splits"] == before["splits"]


def test_caption_lists(tmp_path):
    images = write_caption_pairs(tmp_path / "pairs", ["one", "two"], size=4)
    (tmp_path / "list.jsonl").write_text('{"path": "pairs/img001.png", "caption": " two "}\n\n'
                                         '{"path": "pairs/img000.png", "caption": "one"}\n')
    pairs = list_caption_pairs("", tmp_path / "list.jsonl")
    assert (pairs.paths, pairs.captions, pairs.root) == (["pairs/img001.png", "pairs/img000.png"], ["two", "one"], tmp_path)
    (tmp_path / "list.csv").write_text('path,caption\nimg000.png,"one, with a comma"\n')
    pairs = list_caption_pairs(images, tmp_path / "list.csv")
    assert pairs.captions == ["one, with a comma"] and pairs.root == images
    (tmp_path / "bad.jsonl").write_text('{"path": "pairs/img000.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected string fields 'path' and 'caption'"):
        list_caption_pairs("", tmp_path / "bad.jsonl")
    (images / "img001.txt").unlink()
    with pytest.raises(ValueError, match="img001.png' has no caption file 'img001.txt'"):
        list_caption_pairs(images)


def test_missing_pipeline_is_one_line(tmp_path, capsys):
    images = write_caption_pairs(tmp_path / "pairs", ["one"], size=4)
    args = ["data", "backbone.source=sd3", f"backbone.path={tmp_path / 'nothing'}", "data.source=captions",
            f"data.image_dir={images}", f"data.root={tmp_path}"]  # fmt: skip
    assert main(args) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bafm")]
    assert len(ours) == 1 and "cannot load the sd3 pipeline" in ours[0] and "nothing" in ours[0]


def test_bytes_per_sample_from_shapes():
    # SD3-medium at 1024^2: 16 x 128 x 128 latents, 77 CLIP + 256 T5 tokens of width 4096, pooled 2048.
    # float16: 2 x (524,288 moments + 1,363,968 token values + 2,048 pooled) = 3,780,608 bytes.
    assert bytes_per_sample((16, 128, 128), 333, 4096, 2048) == 3_780_608
