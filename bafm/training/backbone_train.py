"""``bafm backbone``: train the embedded default's backbone (a small SiT) and digits classifier.

The backbone is trained with the standard flow-matching loss in bafm's convention
(``x_t = (1 - t) x + t eps``, target ``v = eps - x``), label dropout for CFG and an EMA of its
weights; the EMA weights are exported as ``.safetensors`` + JSON config.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from bafm.config import ConfigError, ExperimentConfig, run_dir, to_container
from bafm.errors import Interrupted
from bafm.io import check_not_tracked
from bafm.data.digits import digits_options, load_digits_images
from bafm.models.layers import drop_labels
from bafm.models.loading import save_backbone
from bafm.models.model_size import check_model_size
from bafm.models.sit import build_sit, resolve_size
from bafm.training.module import step_seed, warmup_factor


class FlowMatchingModule(L.LightningModule):
    """Flow-matching training of a backbone with ``forward(x, t, y) -> v`` (bafm convention)."""

    def __init__(
        self, model: nn.Module, *, num_classes: int, lr: float, ema_decay: float,
        label_dropout: float, warmup_steps: int = 200, seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.num_classes, self.lr, self.label_dropout = num_classes, lr, label_dropout
        self.warmup_steps, self.seed = warmup_steps, seed

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x0, y = batch
        generator = torch.Generator(device=self.device).manual_seed(
            step_seed(self.seed, self.global_step, self.global_rank))
        b = x0.shape[0]
        t = torch.rand(b, generator=generator, device=self.device)
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        y = drop_labels(y, self.label_dropout, self.num_classes, generator)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1.0 - tb) * x0 + tb * noise
        loss = F.mse_loss(self.model.velocity(x_t, t, y), noise - x0)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ema.update_parameters(self.model)

    def configure_optimizers(self) -> Dict[str, Any]:
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_factor(s, self.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class EMASnapshots(L.Callback):
    """Export the EMA weights every ``every`` steps, for a quality-versus-training-length curve.

    With a constant learning rate the snapshot at step N equals the result of a run of N steps,
    so a curve measured on snapshots tells how long ``backbone_train.steps`` has to be.
    """

    def __init__(self, folder: Path, every: int, extra_config: Dict[str, Any]) -> None:
        self.folder, self.every, self.extra_config = folder, every, extra_config

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every == 0:
            ema = copy.deepcopy(pl_module.ema.module).cpu().eval()
            save_backbone(ema, self.folder / f"ema_step{step:06d}.safetensors",
                          extra_config={**self.extra_config, "snapshot_step": step})

    # Checked before a batch and at the end, when the EMA holds exactly ``global_step`` updates.
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module)


def train_backbone(cfg: ExperimentConfig) -> Dict[str, Any]:
    """Train the digits backbone and export its EMA weights to ``cfg.backbone_train.out``.

    Returns:
        A summary (steps, final loss, wall time, parameter count, output path).
    """
    bt = cfg.backbone_train
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    images, labels = load_digits_images("train", **digits_options(cfg.data, cfg.seed))  # (N, 1, S, S) in [-1, 1]
    if bt.batch_size > images.shape[0]:  # drop_last would leave no batch at all
        raise ConfigError(f"'backbone_train.batch_size' is {bt.batch_size}, more than the {images.shape[0]} "
                          f"training digits; use at most {images.shape[0]}.")
    size = resolve_size(cfg.backbone.arch, cfg.backbone.depth, cfg.backbone.hidden_size, cfg.backbone.num_heads)
    shape = dict(input_size=images.shape[-1], in_channels=images.shape[1], num_classes=10, depth=size.depth,
                 hidden_size=size.hidden_size, num_heads=size.num_heads)
    check_model_size(lambda **kw: build_sit(cfg.backbone.arch, **kw), shape, "backbone.* settings")
    model = build_sit(cfg.backbone.arch, **shape)
    module = FlowMatchingModule(model, num_classes=10, lr=bt.lr, ema_decay=bt.ema_decay,
                                label_dropout=bt.label_dropout, seed=cfg.seed)
    loader = DataLoader(TensorDataset(images.float(), labels.long()), batch_size=bt.batch_size,
                        shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))
    logger = TensorBoardLogger(save_dir=str(run_dir(cfg)), name="backbone", version="")
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=1, max_steps=bt.steps, logger=logger,
        log_every_n_steps=50, enable_checkpointing=False, gradient_clip_val=1.0,
        callbacks=[TQDMProgressBar(refresh_rate=20)], enable_model_summary=False,
    )
    if bt.snapshot_every > 0:
        trainer.callbacks.append(EMASnapshots(
            run_dir(cfg) / "backbone" / "snapshots", bt.snapshot_every,
            {"experiment": to_container(cfg)["name"]}))
    start = time.perf_counter()
    try:
        trainer.fit(module, loader)
    except SystemExit:  # Lightning exits after a graceful Ctrl-C shutdown
        if not trainer.interrupted:
            raise
    if trainer.interrupted:
        raise Interrupted(f"backbone training stopped at step {trainer.global_step}; '{bt.out}' is unchanged")
    seconds = time.perf_counter() - start
    final_loss = float(trainer.callback_metrics.get("train/loss", torch.tensor(float("nan"))))
    ema_model = module.ema.module.cpu().eval()
    summary = {
        "steps": bt.steps, "batch_size": bt.batch_size, "lr": bt.lr, "ema_decay": bt.ema_decay,
        "label_dropout": bt.label_dropout, "final_train_loss": final_loss,
        "wall_seconds": round(seconds, 1), "parameters": sum(p.numel() for p in ema_model.parameters()),
        "train_images": int(images.shape[0]), "torch": torch.__version__,
    }
    save_backbone(ema_model, bt.out, extra_config={"training": summary, "experiment": to_container(cfg)["name"]})
    summary["out"] = bt.out
    return summary


def run(cfg: ExperimentConfig, out: Optional[str] = None) -> int:
    """CLI entry: backbone, then the classifier that serves as this experiment's feature extractor."""
    from bafm.training.classifier_train import classifier_destination, run as run_classifier

    if cfg.data.source != "digits":
        raise ConfigError(
            "bafm backbone trains the embedded default's small SiT only; for ImageNet bring a "
            "pretrained REPA/SiT checkpoint and set backbone.path (see README)."
        )
    # Logs and snapshots go to the run folder; the weights to the files named in backbone_train.*.
    check_not_tracked(run_dir(cfg) / "backbone", "bafm backbone's log folder", "choose another runs_dir= or name=")
    classifier_destination(cfg, out)  # checked now, not after the backbone's training
    summary = train_backbone(cfg)
    Path(run_dir(cfg)).mkdir(parents=True, exist_ok=True)
    print(json.dumps(summary, indent=2))
    print(f"backbone EMA weights: {summary['out']}")
    return run_classifier(cfg, out)
