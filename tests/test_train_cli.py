"""``bafm train`` end to end on the embedded default with tiny models (and DDP, slow)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bafm.cli import main
from bafm.models.loading import load_sidenet
from factories import synthetic_shards, tiny_digits_overrides

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "digits.yaml")


def _events(run: Path) -> EventAccumulator:
    files = sorted((run / "train").glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard events in {run / 'train'}"
    acc = EventAccumulator(str(run / "train"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_train_logs_sweeps_exports_and_resumes(tmp_path, capsys):
    args = ["train", "--config", DIGITS, *tiny_digits_overrides(tmp_path), "trainer.max_steps=4",
            "eval.every_n_steps=2", "trainer.checkpoint_every_n_steps=2", "eval.callback_budgets=[4]"]
    assert main(args) == 0
    out = capsys.readouterr().out
    exported = tmp_path / "runs" / "digits" / "sidenet.safetensors"
    assert f"EMA SideNet:        {exported} (+ sidenet.json); make eval-nfe-sweep / make edit use it" in out
    assert exported.is_file() and not (tmp_path / "checkpoints" / "digits").exists()
    sidenet = load_sidenet(exported)
    assert sidenet.config["channels"] == 8 and not any(p.requires_grad for p in sidenet.parameters())

    acc = _events(tmp_path / "runs" / "digits")
    scalars = set(acc.Tags()["scalars"])
    for solver in ("ba", "euler"):
        for metric in ("fid", "is", "precision", "recall", "traj_rmse"):
            assert f"sweep/{metric}/{solver}_nfe4" in scalars
        assert f"sweep/sfid/{solver}_nfe4" not in scalars  # the digits classifier has no spatial features
        assert f"samples/{solver}_nfe4" in acc.Tags()["images"]
    assert [e.step for e in acc.Scalars("sweep/fid/ba_nfe4")] == [2, 4]
    assert {"train/loss", "params/trainable"} <= scalars
    # LearningRateMonitor: the linear warm-up of experiments/digits.yaml (lr 1e-3 over 50 steps).
    lr = acc.Scalars("train/lr")
    assert [e.step for e in lr] == [0, 1, 2, 3]
    assert [e.value for e in lr] == pytest.approx([1e-3 * (k + 1) / 50 for k in range(4)], rel=1e-6)
    # ThroughputMonitor: images seen so far (batch 16) and images/s once its 2-step window is full.
    samples = acc.Scalars("train/samples")
    assert [e.value for e in samples] == [16, 32, 48, 64]
    assert [e.step for e in acc.Scalars("train/device/samples_per_sec")] == [e.step for e in samples[1:]]
    assert min(e.value for e in acc.Scalars("train/device/samples_per_sec")) > 0
    assert (tmp_path / "runs" / "digits" / "train_sweeps" / "step0000004.csv").is_file()

    # Resume from the newest checkpoint and train two more steps.
    assert main(args[:-3] + ["trainer.max_steps=6", "trainer.resume=last", "eval.every_n_steps=0"]) == 0
    summary = json.loads((tmp_path / "runs" / "digits" / "train_summary.json").read_text())
    assert summary["steps"] == 6


def test_short_run_sweeps_at_end_only_when_asked(tmp_path):
    args = ["train", "--config", DIGITS, *tiny_digits_overrides(tmp_path), "trainer.max_steps=2",
            "eval.every_n_steps=5", "eval.callback_budgets=[4]", "trainer.checkpoint_every_n_steps=10"]
    sweeps = tmp_path / "runs" / "digits" / "train_sweeps"
    assert main(args) == 0
    assert not sweeps.exists()  # no sweep fell due in 2 steps, none was asked for
    asked = tmp_path / "asked"  # a fresh run folder (a folder with last.ckpt would be resumed)
    assert main(args + [f"runs_dir={asked}", "eval.sweep_at_end=true", "eval.every_n_steps=0"]) == 0
    assert sorted(p.name for p in (asked / "digits" / "train_sweeps").iterdir()) == ["step0000002.csv"]


def test_end_sweep_schedule(tmp_path):
    from bafm.config import load_config
    from bafm.training.callbacks import NFESweepCallback

    def cfg(*overrides):
        return load_config(DIGITS, list(overrides))

    def wanted(*overrides):
        c = cfg(*overrides)
        return NFESweepCallback.wanted(c.eval, c.trainer.max_steps)

    def callback(*overrides):
        return NFESweepCallback(cfg(*overrides).eval, lambda device: None, tmp_path)

    assert not wanted("trainer.max_steps=2", "eval.every_n_steps=5")
    assert not wanted("trainer.max_steps=10", "eval.every_n_steps=0")
    assert wanted("trainer.max_steps=5", "eval.every_n_steps=5")
    assert wanted("trainer.max_steps=-1", "eval.every_n_steps=5")
    assert wanted("trainer.max_steps=2", "eval.every_n_steps=5", "eval.sweep_at_end=true")
    assert [callback("eval.every_n_steps=5").sweeps_at_end(s) for s in (2, 5, 7)] == [False, True, True]
    assert callback("eval.every_n_steps=5", "eval.sweep_at_end=true").sweeps_at_end(2)


def test_shape_mismatch_fails_before_training(tmp_path, capsys):
    overrides = tiny_digits_overrides(tmp_path)
    synthetic_shards(tmp_path / "data" / "syn4", shape=(4, 16, 16))
    assert main(["train", "--config", DIGITS, *overrides, "data.source=folder", "data.dataset=syn4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert re.fullmatch(r"bafm train: latent shape mismatch: .*\(4, 16, 16\).*\(1, 8, 8\).*", err)
    assert not (tmp_path / "runs" / "digits" / "checkpoints").exists()


@pytest.mark.parametrize("experiment", sorted(p.name for p in (ROOT / "experiments").glob("*.yaml")))
def test_fast_dev_run_every_experiment(tmp_path, experiment):
    """Every experiment's training path runs one step (tiny models and data of its latent shape)."""
    from bafm.config import load_config

    cfg = load_config(ROOT / "experiments" / experiment)
    overrides = tiny_digits_overrides(tmp_path)
    if cfg.backbone.source in ("sd3", "flux"):  # text-to-image: a tiny pipeline and its caption shards
        from t2i_text_factories import PIPELINES, save_pipeline, tiny_text_overrides, write_caption_pairs

        family = str(cfg.backbone.source)
        pairs = write_caption_pairs(tmp_path / "pairs", ["a red cat", "a blue dog"], size=8)
        overrides = tiny_text_overrides(tmp_path, family, save_pipeline(PIPELINES[family](), tmp_path / "pipe"), pairs)
        assert main(["data", "--config", str(ROOT / "experiments" / experiment), *overrides]) == 0
    elif cfg.data.source != "digits":  # real-data experiments: synthetic latents of a tiny shape
        from bafm.models.loading import save_backbone
        from bafm.models.sit import build_sit

        synthetic_shards(tmp_path / "data" / cfg.data.dataset, shape=(4, 8, 8))
        backbone = build_sit(cfg.backbone.arch, input_size=8, in_channels=4, num_classes=10, depth=1,
                             hidden_size=32, num_heads=2)
        save_backbone(backbone, tmp_path / "models" / "big.safetensors")
        overrides += [f"backbone.path={tmp_path / 'models' / 'big.safetensors'}", "backbone.depth=1",
                      "backbone.hidden_size=32", "backbone.num_heads=2"]
    overrides += ["trainer.fast_dev_run=true", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    assert main(["train", "--config", str(ROOT / "experiments" / experiment), *overrides]) == 0


@pytest.mark.slow
def test_two_process_cpu_ddp(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "bafm", "train", "--config", DIGITS, *tiny_digits_overrides(tmp_path),
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=3",
           "eval.every_n_steps=3", "eval.callback_budgets=[4]"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    acc = _events(tmp_path / "runs" / "digits")
    assert "sweep/fid/ba_nfe4" in acc.Tags()["scalars"]
    assert (tmp_path / "runs" / "digits" / "sidenet.safetensors").is_file()


def test_feature_sidenet_trains_validates_and_lays_out_its_dashboard(tmp_path):
    args = ["train", "--config", DIGITS, *tiny_digits_overrides(tmp_path), "trainer.max_steps=4",
            "sidenet.backbone_features=true", "trainer.val_every_n_steps=2", "trainer.val_batches=1",
            "trainer.side_error_samples=8", "eval.every_n_steps=4", "eval.callback_budgets=[4]"]
    assert main(args) == 0
    run = tmp_path / "runs" / "digits"
    sidenet = load_sidenet(run / "sidenet.safetensors")
    assert sidenet.uses_backbone_features and sidenet.config["feature_layer"] == -1
    acc = _events(run)
    scalars = set(acc.Tags()["scalars"])
    for tag in ("val/loss", "val/loss_over_identity", "val/side_rel_err", "val/side_rel_err_worst"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 3], tag  # logged at the step index of the check
    assert 0.0 < acc.Scalars("val/side_rel_err")[0].value < 1.5
    assert {"sweep/fd_ref/ba_nfe4", "sweep/fd_ref/euler_nfe4", "sweep/traj_rmse/ba_nfe4"} <= scalars
    # The custom-scalars layout: every callback solver at one budget on one chart per metric.
    from tensorboard.plugins.custom_scalar import layout_pb2

    (event,) = [e for e in acc.Tensors("custom_scalars__config__")]
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["FD to the reference samples at 4 NFE"] == [r"^sweep/fd_ref/.*_nfe4$"]
    assert "FID at 4 NFE" in charts and "sFID at 4 NFE" not in charts  # the classifier has no spatial features
    # One run per solver sharing each tag: a coloured line per solver on one chart.
    for solver in ("ba", "euler"):
        per_solver = EventAccumulator(str(run / "train" / "solvers" / solver)).Reload()
        assert [e.step for e in per_solver.Scalars("sweep/fd_ref_nfe4")] == [4]
        assert per_solver.Scalars("sweep/fd_ref_nfe4")[0].value == acc.Scalars(f"sweep/fd_ref/{solver}_nfe4")[0].value


def test_grid_aware_fine_tuning_from_an_export(tmp_path):
    first = ["train", "--config", DIGITS, *tiny_digits_overrides(tmp_path), "trainer.max_steps=2", "name=base"]
    assert main(first) == 0
    export = tmp_path / "runs" / "base" / "sidenet.safetensors"
    # A feature SideNet fine-tuned from the feature-free export, the grid-aware loss for both steps.
    second = ["train", "--config", DIGITS, *tiny_digits_overrides(tmp_path), "trainer.max_steps=2", "name=tuned",
              f"sidenet.init_from={export}", "sidenet.backbone_features=true", "loss.grid_steps=2",
              "loss.grid_budgets=[2,3]"]
    assert main(second) == 0
    acc = _events(tmp_path / "runs" / "tuned")
    assert [e.step for e in acc.Scalars("train/loss")][-1] >= 0
    # Its first-step loss is the grid loss of the exported SideNet, not of an identity one.
    assert acc.Scalars("train/loss")[0].value < acc.Scalars("train/mse_identity")[0].value


def test_init_from_copies_weights_and_refuses_other_sizes(tmp_path):
    import torch

    from bafm.models.loading import save_sidenet
    from bafm.models.sidenet import SideNet
    from bafm.training.train import init_sidenet_from

    source = SideNet(in_channels=1, channels=8, emb_dim=16, depth=2, num_heads=1, num_classes=10)
    torch.nn.init.normal_(source.output_conv.weight)
    save_sidenet(source, tmp_path / "s.safetensors")
    target = SideNet(in_channels=1, channels=8, emb_dim=16, depth=2, num_heads=1, num_classes=10, feature_dim=32)
    init_sidenet_from(target, tmp_path / "s.safetensors")
    torch.testing.assert_close(target.output_conv.weight, source.output_conv.weight)
    assert float(target.feature_map.weight.abs().sum()) == 0.0  # kept zero: starts as the source network
    wider = SideNet(in_channels=1, channels=16, emb_dim=16, depth=2, num_heads=1, num_classes=10)
    with pytest.raises(ValueError, match="do not fit sidenet"):
        init_sidenet_from(wider, tmp_path / "s.safetensors")


def test_a_bad_callback_plan_stops_before_the_first_training_step(tmp_path, capsys):
    args = ["train", "--config", DIGITS, *tiny_digits_overrides(tmp_path), "trainer.max_steps=4",
            "eval.every_n_steps=2", "eval.callback_solvers=[ba,heun]", "eval.callback_budgets=[5]"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("bafm train: config error: eval.callback_budgets: solver 'heun' cannot spend exactly 5 NFE "
                   "(2 per step); nearest: 4 or 6.")
    assert not (tmp_path / "runs").exists()  # no run folder, checkpoint or training step
