"""``bafm train`` for SD3/Flux experiments: the chain loss on text conditions, dropout, the CLI path."""

from __future__ import annotations

import json

import pytest
import torch
from t2i_factories import sd3_conditions, tiny_sd3_transformer
from t2i_text_factories import EXPERIMENTS, PIPELINES, save_pipeline, tiny_text_overrides, write_caption_pairs

from bafm.cli import main
from bafm.models.diffusers_flow import FlowTransformerBackbone
from bafm.models.layers import drop_labels
from bafm.models.text_condition import TextCondition, drop_conditions
from bafm.models.text_sidenet import TextSideNet, load_text_sidenet
from bafm.training.ba_loss import ChainLossConfig, chain_loss

CAPTIONS = ["a red cat", "a blue dog", "small cat", "", "big dog"]


def test_chain_loss_on_text_conditions_starts_at_the_identity_mse():
    # A fresh SideNet is the identity S = v, so every link's loss is the "reuse v" MSE.
    backbone = FlowTransformerBackbone(tiny_sd3_transformer(), "sd3")
    sidenet = TextSideNet(in_channels=4, pooled_dim=64, channels=8, emb_dim=8, depth=2, num_heads=2)
    cond, _ = sd3_conditions(3)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    loss, stats = chain_loss(backbone.velocity, sidenet.velocity, x0, cond, ChainLossConfig(links=2),
                             torch.Generator().manual_seed(1))  # fmt: skip
    torch.testing.assert_close(loss, stats["mse_identity"])
    loss.backward()
    assert sidenet.output_conv.weight.grad.abs().sum() > 0


def test_text_dropout_drops_the_rows_label_dropout_would():
    cond = TextCondition(torch.randn(64, 3, 5), torch.randn(64, 4))
    null = TextCondition(torch.zeros(1, 3, 5), torch.full((1, 4), 7.0))
    dropped = drop_conditions(cond, null, 0.3, torch.Generator().manual_seed(5))
    labels = drop_labels(torch.zeros(64, dtype=torch.int64), 0.3, 1, torch.Generator().manual_seed(5))
    is_null = (dropped.pooled == 7.0).all(dim=1)
    assert torch.equal(is_null, labels == 1) and 0 < int(is_null.sum()) < 64
    torch.testing.assert_close(dropped.prompt_embeds[~is_null], cond.prompt_embeds[~is_null])
    assert dropped.prompt_embeds[is_null].abs().sum() == 0
    assert drop_conditions(cond, null, 0.0) is cond


@pytest.fixture(scope="module", params=["sd3", "flux"])
def tiny_text_run(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"train_{family}")
    pipeline_dir = save_pipeline(PIPELINES[family](), root / "pipeline")
    images = write_caption_pairs(root / "pairs", CAPTIONS, size=8)
    overrides = tiny_text_overrides(root, family, pipeline_dir, images)
    assert main(["data", "--config", EXPERIMENTS[family], *overrides]) == 0
    return family, root, overrides


def test_train_exports_a_text_sidenet(tiny_text_run, capsys):
    family, root, overrides = tiny_text_run
    assert main(["train", "--config", EXPERIMENTS[family], *overrides, "trainer.max_steps=2",
                 "optim.ema_decay=0.0", "optim.lr=1e-2"]) == 0  # fmt: skip
    name = "sd3_medium" if family == "sd3" else "flux1_dev"
    export = root / "runs" / name / "sidenet.safetensors"
    assert f"EMA SideNet:        {export}" in capsys.readouterr().out
    sidenet = load_text_sidenet(export)
    assert (sidenet.in_channels, sidenet.pooled_dim) == ((4, 64) if family == "sd3" else (1, 32))
    assert json.loads(export.with_suffix(".json").read_text())["backbone_family"] == family
    # Two AdamW steps at lr 1e-2 moved the zero-initialised output conv (EMA decay 0: the live weights).
    assert sidenet.output_conv.weight.abs().max() > 1e-3
    summary = json.loads((root / "runs" / name / "train_summary.json").read_text())
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["metrics"]["train/loss"]))


def test_train_refuses_data_of_another_backbone(tiny_text_run, tmp_path, capsys):
    family, root, overrides = tiny_text_run
    other = "flux" if family == "sd3" else "sd3"
    other_dir = save_pipeline(PIPELINES[other](), tmp_path / "other")
    args = [*overrides, f"backbone.path={other_dir}", f"backbone.source={other}", f"runs_dir={tmp_path}"]
    assert main(["train", "--config", EXPERIMENTS[family], *args, "trainer.max_steps=1"]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bafm")]
    assert len(ours) == 1 and ours[0].startswith("bafm train: latent shape mismatch")


def test_chain_loss_with_a_bfloat16_backbone_under_autocast():
    # The GPU recipe's dtypes (bfloat16 backbone weights, bf16-mixed autocast), run on the CPU.
    backbone = FlowTransformerBackbone(tiny_sd3_transformer().to(torch.bfloat16), "sd3")
    sidenet = TextSideNet(in_channels=4, pooled_dim=64, channels=8, emb_dim=8, depth=2, num_heads=2)
    torch.nn.init.normal_(sidenet.output_conv.weight, std=0.05)
    cond, _ = sd3_conditions(2)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = chain_loss(backbone.velocity, sidenet.velocity, x0, cond, ChainLossConfig(links=2),
                                 torch.Generator().manual_seed(1))  # fmt: skip
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(stats["mse_identity"])
    assert sidenet.text_embedder.weight.grad.abs().sum() > 0  # the pooled projection is trained


def test_train_resumes_from_the_last_checkpoint(tiny_text_run, tmp_path):
    family, root, overrides = tiny_text_run
    args = ["--config", EXPERIMENTS[family], *overrides, f"runs_dir={tmp_path}"]
    assert main(["train", *args, "trainer.max_steps=2"]) == 0
    assert main(["train", *args, "trainer.max_steps=3", "trainer.resume=last"]) == 0
    name = "sd3_medium" if family == "sd3" else "flux1_dev"
    assert json.loads((tmp_path / name / "train_summary.json").read_text())["steps"] == 3
    assert not any("backbone." in k for k in torch.load(tmp_path / name / "checkpoints" / "last.ckpt",
                                                        weights_only=True)["state_dict"])  # fmt: skip
