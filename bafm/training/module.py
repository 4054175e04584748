"""``SideNetModule``: the frozen backbone and the trainable SideNet, composed for Lightning."""

from __future__ import annotations

import hashlib
from typing import Any, Dict, Optional, Sequence

import lightning as L
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bafm.models.anchor_features import anchor_for, plain_anchor, uses_backbone_features
from bafm.models.layers import count_parameters, drop_labels
from bafm.models.text_condition import Condition, TextCondition, condition_to, drop_conditions
from bafm.sampling import latent_shape
from bafm.training.ba_loss import ChainLossConfig, chain_loss
from bafm.training.grid_loss import grid_chain_loss
from bafm.training.side_error import ProbeSet, build_probe_set, side_relative_error, summarize

BACKBONE_PREFIX = "backbone."


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for one (run seed, global step, rank): resumed runs redraw the same numbers."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SideNetModule(L.LightningModule):
    """Trains a SideNet with the BA chain loss beside a frozen flow-matching backbone.

    Only the SideNet's parameters reach the optimizer; an EMA copy of the SideNet alone is
    kept for sampling. Checkpoints hold SideNet, EMA, optimizer and step, never the backbone.

    Args:
        backbone: module with ``.velocity(x, t, y)`` (frozen here: eval mode, no gradients).
        sidenet: module with ``.velocity(x, v, t, h, y)``.
        num_classes: class count; label ``num_classes`` is the null (CFG) class.
        loss: chain-rollout knobs.
        label_dropout: probability of replacing a label by the null class.
        lr, weight_decay, betas, warmup_steps: AdamW and its linear warm-up.
        ema_decay: EMA decay of the SideNet weights.
        seed: run seed; each step's randomness is derived from (seed, step, rank).
        side_error_samples: held-out noises for ``val/side_rel_err`` (0: not measured).
        side_error_budgets: NFE budgets whose uniform grids' SideNet offsets it measures.
        grid_from_step: from this step on, the grid-aware loss (``bafm.training.grid_loss``)
            replaces the chain loss; None: never.
        grid_budgets: the uniform grids' step counts the grid-aware loss trains for.
        hparams: the experiment config as a plain dict, logged and stored with checkpoints.
        null_condition: text-to-image only: the unconditional encoding (batch 1, the empty
            prompt's); batches then carry ``prompt_embeds`` / ``pooled`` and dropout swaps it in.
    """

    def __init__(
        self,
        backbone: nn.Module,
        sidenet: nn.Module,
        *,
        num_classes: int,
        loss: ChainLossConfig,
        label_dropout: float = 0.1,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        ema_decay: float = 0.9996,
        seed: int = 0,
        side_error_samples: int = 0,
        side_error_budgets: Sequence[int] = (5, 10),
        grid_from_step: Optional[int] = None,
        grid_budgets: Sequence[int] = (3, 4, 5, 6, 8, 10),
        hparams: Optional[Dict[str, Any]] = None,
        null_condition: Optional[TextCondition] = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.sidenet = sidenet
        # An EMA of the SideNet alone. Lightning's EMAWeightAveraging callback would average the
        # whole LightningModule, frozen backbone included (a second copy of the largest model),
        # and put that copy into every checkpoint, which must never hold backbone weights.
        self.ema = AveragedModel(sidenet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        # Backbone calls of the chain loss; with the backbone's tokens for a SideNet that reads them.
        self.anchor = anchor_for(self.backbone, sidenet) if uses_backbone_features(sidenet) else None
        self.num_classes = num_classes
        self.loss_cfg = loss
        self.label_dropout = label_dropout
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps = warmup_steps
        self.seed = seed
        self.null_condition = null_condition  # not a buffer: checkpoints hold the SideNet only
        self.side_error_samples = int(side_error_samples)
        self.side_error_budgets = tuple(int(b) for b in side_error_budgets)
        self.grid_from_step = grid_from_step
        self.grid_budgets = tuple(int(b) for b in grid_budgets)
        self._probes: Optional[ProbeSet] = None  # exact-ODE anchors, built at the first validation
        self.save_hyperparameters(hparams or {})
        # Read by ThroughputMonitor; FLOPs are not counted, it logs batches and images per second.
        self.flops_per_batch: Optional[int] = None

    # The frozen backbone stays in eval mode whatever Lightning toggles.
    def train(self, mode: bool = True) -> "SideNetModule":
        super().train(mode)
        self.backbone.eval()
        self.ema.eval()
        return self

    def _generator(self) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(step_seed(self.seed, self.global_step, self.global_rank))
        return generator

    def on_fit_start(self) -> None:
        trainable, total = count_parameters(self)
        side_trainable, _ = count_parameters(self.sidenet)
        backbone_trainable, backbone_total = count_parameters(self.backbone)
        if backbone_trainable:
            raise RuntimeError(f"backbone has {backbone_trainable} trainable parameters; it must be frozen")
        if trainable != side_trainable:
            raise RuntimeError(f"{trainable} trainable parameters but the SideNet has {side_trainable}")
        ratio = 100.0 * side_trainable / max(backbone_total, 1)
        self.print(
            f"SideNet: {side_trainable:,} trainable parameters ({ratio:.2f} % of the backbone's "
            f"{backbone_total:,}); {total:,} parameters in the module incl. EMA copy"
        )
        if self.logger is not None:
            self.logger.log_metrics(
                {"params/trainable": float(side_trainable), "params/backbone": float(backbone_total),
                 "params/total": float(total)}, step=self.global_step)

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = batch["latent"]
        generator = self._generator()
        y = self._dropped_condition(batch, x0, generator)
        if self.grid_from_step is not None and self.global_step >= self.grid_from_step:
            anchor = self.anchor or plain_anchor(self.backbone.velocity)
            loss, stats = grid_chain_loss(anchor, self.sidenet.velocity, x0, y, self.grid_budgets, self.loss_cfg.links,
                                          generator)
        else:
            loss, stats = chain_loss(self.backbone.velocity, self.sidenet.velocity, x0, y, self.loss_cfg, generator,
                                     anchor=self.anchor)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite SideNet loss ({loss.item()}) at step {self.global_step}; training stopped. "
                "The last good checkpoint is kept; lower optim.lr or check the data."
            )
        batch_size = x0.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/mse_identity", stats["mse_identity"], batch_size=batch_size)
        self.log("train/offset_abs", stats["offset_abs"], batch_size=batch_size)
        return loss

    def _dropped_condition(self, batch: Dict[str, Any], x0: torch.Tensor, generator: torch.Generator) -> Condition:
        """The batch's conditioning after CFG dropout: labels, or prompt embeddings (float16 in shards)."""
        if self.null_condition is None:
            return drop_labels(batch["cls"], self.label_dropout, self.num_classes, generator)
        cond = condition_to(TextCondition(batch["prompt_embeds"], batch["pooled"]), x0.device, x0.dtype)
        null = condition_to(self.null_condition, x0.device, x0.dtype)
        return drop_conditions(cond, null, self.label_dropout, generator)

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The chain loss of the EMA SideNet on a fixed validation batch (same draws at every validation)."""
        x0 = batch["latent"]
        generator = torch.Generator(device=self.device)
        generator.manual_seed(step_seed(self.seed, -1 - batch_idx, self.global_rank))  # never a training step's
        y = self._dropped_condition(batch, x0, generator)
        loss, stats = chain_loss(self.backbone.velocity, self.ema_sidenet.velocity, x0, y, self.loss_cfg, generator,
                                 anchor=self.anchor)
        batch_size = x0.shape[0]
        self.log("val/loss", loss, batch_size=batch_size, sync_dist=True)
        self.log("val/loss_over_identity", loss / stats["mse_identity"].clamp_min(1e-12), batch_size=batch_size,
                 sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        """``val/side_rel_err`` (mean and worst over the probes) of the EMA SideNet."""
        if self.side_error_samples <= 0 or self.trainer.sanity_checking:
            return
        if self._probes is None:
            self._probes = build_probe_set(
                self.backbone, self.ema_sidenet, latent_shape(self.backbone), num_samples=self.side_error_samples,
                budgets=self.side_error_budgets, device=self.device)
        summary = summarize(side_relative_error(self.ema_sidenet, self._probes))
        self.log("val/side_rel_err", summary["mean"], sync_dist=True)
        self.log("val/side_rel_err_worst", summary["worst"], sync_dist=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ema.update_parameters(self.sidenet)

    def configure_optimizers(self) -> Dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.sidenet.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_factor(step, self.warmup_steps)
        )
        # "name" is the tag LearningRateMonitor logs the rate under.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "train/lr"}}

    # Checkpoints never carry the backbone: drop it on save, put the live one back on load.
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(BACKBONE_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        stray = [k for k in state if k.startswith(BACKBONE_PREFIX)]
        if stray:
            raise ValueError(f"checkpoint unexpectedly holds backbone weights (e.g. '{stray[0]}')")
        for key, value in self.backbone.state_dict().items():
            state[BACKBONE_PREFIX + key] = value

    @property
    def ema_sidenet(self) -> nn.Module:
        """The EMA SideNet used for sampling and export."""
        return self.ema.module


def warmup_factor(step: int, warmup: int) -> float:
    """Linear learning-rate warm-up multiplier for optimizer step ``step``."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)
