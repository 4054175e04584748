"""``bafm train``: SideNet training beside the frozen backbone, end to end."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from bafm.config import ConfigError, ExperimentConfig, exported_sidenet_path, missing_backbone, run_dir, to_container
from bafm.data.vae import LatentShapeError
from bafm.errors import Interrupted
from bafm.io import atomic_write_text, check_not_tracked
from bafm.models.anchor_features import feature_width
from bafm.models.loading import load_backbone, save_sidenet
from bafm.models.model_size import check_model_size
from bafm.models.sidenet import SideNet
from bafm.sampling import latent_shape
from bafm.training.ba_loss import ChainLossConfig
from bafm.training.callbacks import NFESweepCallback
from bafm.training.checkpoints import (
    AtomicCheckpointIO,
    FiniteModelCheckpoint,
    InterruptCheckpoint,
    check_fresh_run_folder,
    check_resume_fits,
    resolve_resume,
)
from bafm.training.module import SideNetModule
from bafm.training.run_lock import RunFolderLock


def training_checkpoint_dir(cfg: ExperimentConfig) -> Path:
    """Resumable Lightning checkpoints: ``runs/<experiment>/checkpoints``."""
    return run_dir(cfg) / "checkpoints"


def build_trainer(cfg: ExperimentConfig, callbacks: List[Callback]) -> L.Trainer:
    """A Lightning Trainer whose options come from ``cfg.trainer`` (devices, nodes, strategy, ...)."""
    tc = cfg.trainer
    precision = tc.precision
    if precision == "auto":
        on_gpu = tc.accelerator in ("gpu", "cuda") or (tc.accelerator == "auto" and torch.cuda.is_available())
        precision = "bf16-mixed" if on_gpu else "32-true"
    logger = TensorBoardLogger(save_dir=str(Path(cfg.runs_dir)), name=cfg.name, version="train",
                               default_hp_metric=False)
    return L.Trainer(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes, strategy=tc.strategy,
        precision=precision, max_steps=tc.max_steps, log_every_n_steps=tc.log_every_n_steps,
        gradient_clip_val=cfg.optim.grad_clip, logger=logger, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],  # temp file + rename beside the target, not in $TMPDIR
        fast_dev_run=tc.fast_dev_run, deterministic=tc.deterministic,
        enable_progress_bar=tc.enable_progress_bar, enable_model_summary=False,
        use_distributed_sampler=False,  # the WebDataset loader splits by node itself
        **validation_options(tc),
    )


def validation_options(tc: Any) -> Dict[str, Any]:
    """Lightning's validation loop: a fixed subset of the val split every ``val_every_n_steps`` steps."""
    if tc.val_every_n_steps <= 0:
        return {"limit_val_batches": 0}
    # Counted in training batches (the training loader has no epochs), no sanity pass.
    return {"limit_val_batches": int(tc.val_batches), "val_check_interval": int(tc.val_every_n_steps),
            "check_val_every_n_epoch": None, "num_sanity_val_steps": 0}


def build_sidenet(cfg: ExperimentConfig, in_channels: int, num_classes: int, feature_dim: int = 0) -> SideNet:
    """The trainable SideNet of ``cfg.sidenet`` (its size checked before it is allocated);
    ``feature_dim``: the backbone's token width when ``sidenet.backbone_features`` is on."""
    sc = cfg.sidenet
    kwargs = dict(in_channels=in_channels, channels=sc.channels, emb_dim=sc.emb_dim, depth=sc.depth,
                  num_heads=sc.num_heads, num_classes=num_classes,
                  feature_dim=feature_dim if sc.backbone_features else 0, feature_layer=sc.feature_layer)
    check_model_size(SideNet, kwargs, "sidenet.* settings")
    sidenet = SideNet(**kwargs)
    # NHWC activations: fused channel RMSNorm and faster (depthwise) convolutions, CPU and GPU.
    return sidenet.to(memory_format=torch.channels_last) if sc.channels_last else sidenet


FEATURE_KEYS = ("feature_map.", "feature_emb.")


def init_sidenet_from(sidenet: SideNet, path: Path) -> None:
    """Copy an exported SideNet's weights into ``sidenet`` (``sidenet.init_from``).

    Raises:
        ValueError: the export's tensors do not fit (other sizes), or it lacks weights other
            than the feature maps a feature-free export cannot have.
    """
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"sidenet.init_from: no SideNet export at {path.resolve()}")
    state = load_file(str(path))
    own = sidenet.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(FEATURE_KEYS)]
    unknown = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unknown or wrong:
        raise ValueError(
            f"sidenet.init_from={path}: its weights do not fit sidenet.* (missing {missing[:3]}, unexpected "
            f"{unknown[:3]}, other shapes {wrong[:3]}); use the sizes it was trained with")
    sidenet.load_state_dict(state, strict=False)


def check_shapes(backbone: torch.nn.Module, data_shape: tuple, num_classes: int, what: str) -> None:
    """Fail before the first step if the backbone cannot take the data's latents.

    Raises:
        LatentShapeError: one line naming both shapes, or both class counts.
    """
    expected = latent_shape(backbone)
    if tuple(data_shape) != expected:
        raise LatentShapeError(
            f"latent shape mismatch: the data ({what}) has latents of shape {tuple(data_shape)} (C, H, W) "
            f"but the backbone expects {expected}; check data.* and backbone.path")
    if num_classes > backbone.num_classes:
        raise LatentShapeError(
            f"the data ({what}) has {num_classes} classes but the backbone only {backbone.num_classes}")


def is_launching_process() -> bool:
    """True in the process a user started; False in the extra ranks a launcher starts (Lightning's
    DDP launcher, torchrun, SLURM), which share the first one's run folder and lock."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
    return all(os.environ.get(name, "0") in ("", "0") for name in ranks)


def run(cfg: ExperimentConfig, out: Optional[str] = None) -> int:
    """Train the SideNet, export its EMA weights and say where everything went.

    Before any work: the run folder must not hold committed files, no other run may be using it
    (``RunFolderLock``, held until the end), and a fresh run must find no earlier run's outputs.

    Raises:
        RunFolderError: another run holds the folder, an earlier run's outputs are there, or the
            resumed checkpoint does not fit the configured SideNet.
        OutputFolderError: the run folder holds files that git tracks.
        Interrupted: Ctrl-C during training (after ``interrupted.ckpt`` is written).
    """
    from bafm.training.text_training import is_text_to_image

    # SD3/Flux: a diffusers folder or hub id, whose loader names what is missing.
    if not is_text_to_image(cfg) and missing_backbone(cfg):
        raise FileNotFoundError(missing_backbone(cfg))
    folder = run_dir(cfg)
    check_not_tracked(folder, "bafm train's run folder", "choose another runs_dir= or name=")
    if cfg.trainer.fast_dev_run:
        return _train(cfg, first=False)  # a debug step writes nothing
    if not is_launching_process():
        # Extra ranks run under the first process's lock, which has checked the folder already
        # (and may have started writing into it by the time they start).
        return _train(cfg, first=False)
    with RunFolderLock(folder, "bafm train"):
        return _train(cfg, first=True)


def _train(cfg: ExperimentConfig, first: bool) -> int:
    """The training run; ``first``: this process checks that a fresh run folder is empty."""
    from bafm.data.datamodule import LatentDataModule
    from bafm.data.digits import ensure_digits_shards
    from bafm.training.text_training import is_text_to_image

    ckpt_dir = training_checkpoint_dir(cfg)
    text = is_text_to_image(cfg)
    # A run resumes only when asked, and never mixes with an earlier run.
    resume = resolve_resume(cfg.trainer.resume, ckpt_dir)
    if resume is None and first:
        check_fresh_run_folder(ckpt_dir, run_dir(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.data.source == "digits":
        ensure_digits_shards(cfg.data, cfg.seed)
    datamodule = LatentDataModule(cfg.data, seed=cfg.seed)
    datamodule.setup("fit")  # shards there, batch size within the split
    if text:
        from bafm.data.text_prepare import load_null_condition
        from bafm.training.text_training import build_text_sidenet, check_text_data, load_text_backbone

        if cfg.sidenet.backbone_features:
            raise ConfigError("'sidenet.backbone_features' is for SiT backbones; the text SideNet reads the pooled "
                              "prompt embedding only (set sidenet.backbone_features=false)")
        backbone, null_condition = load_text_backbone(cfg), load_null_condition(datamodule.folder)
        try:
            check_text_data(backbone, datamodule.manifest, datamodule.describe())
        except LatentShapeError:
            raise
        except ValueError as err:  # shards of another pipeline or size: one line, nothing started
            raise LatentShapeError(str(err)) from err
        if cfg.sidenet.init_from:
            raise ConfigError("'sidenet.init_from' starts a class-conditional SideNet from an export; "
                              "the text SideNet trains from scratch (leave it empty)")
        sidenet = build_text_sidenet(cfg, backbone)
    else:
        bc = cfg.backbone
        backbone = load_backbone(bc.path, arch=bc.arch, source=bc.source, depth=bc.depth,
                                 hidden_size=bc.hidden_size, num_heads=bc.num_heads)
        null_condition = None
        check_shapes(backbone, datamodule.latent_shape, datamodule.num_classes, datamodule.describe())
        features = feature_width(backbone, cfg.sidenet.feature_layer) if cfg.sidenet.backbone_features else 0
        sidenet = build_sidenet(cfg, backbone.in_channels, backbone.num_classes, features)
        if cfg.sidenet.init_from:
            init_sidenet_from(sidenet, Path(cfg.sidenet.init_from))
    lc = cfg.loss
    module = SideNetModule(
        backbone, sidenet, num_classes=1 if text else backbone.num_classes, null_condition=null_condition,
        loss=ChainLossConfig(links=lc.links, offset_rate=lc.offset_rate, p_backward=lc.p_backward),
        label_dropout=lc.label_dropout, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        betas=tuple(cfg.optim.betas), warmup_steps=cfg.optim.warmup_steps, ema_decay=cfg.optim.ema_decay,
        # val/side_rel_err's exact-ODE probes are class-conditional; text runs log val/loss only.
        seed=cfg.seed, side_error_samples=0 if text else cfg.trainer.side_error_samples,
        grid_from_step=cfg.trainer.max_steps - lc.grid_steps if lc.grid_steps > 0 else None,
        grid_budgets=tuple(lc.grid_budgets),
        side_error_budgets=tuple(cfg.eval.callback_budgets), hparams=to_container(cfg),
    )
    if resume is not None:
        sizes = {k: cfg.sidenet[k] for k in ("channels", "emb_dim", "depth", "num_heads", "patch_size",
                                             "backbone_features", "feature_layer") if k in cfg.sidenet}
        check_resume_fits(resume, module, sizes)
    callbacks: List[Callback] = [
        FiniteModelCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                              every_n_train_steps=cfg.trainer.checkpoint_every_n_steps, save_top_k=-1,
                              save_last=True, enable_version_counter=False),
        InterruptCheckpoint(ckpt_dir),
        LearningRateMonitor(logging_interval="step"),  # train/lr
        # train/device/samples_per_sec (images/s), averaged over the steps between two logs.
        ThroughputMonitor(batch_size_fn=lambda batch: batch["latent"].shape[0],
                          window_size=max(2, cfg.trainer.log_every_n_steps)),
    ]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.trainer.log_every_n_steps)))
    # The in-training sweep is class-conditional; text-to-image runs are swept by `bafm eval-nfe-sweep`.
    if NFESweepCallback.wanted(cfg.eval, cfg.trainer.max_steps) and not cfg.trainer.fast_dev_run and not text:
        from bafm.eval.inputs import build_sweep_engine

        callbacks.append(NFESweepCallback(cfg.eval, lambda device: build_sweep_engine(cfg, device=device),
                                          run_dir(cfg) / "train_sweeps"))
    trainer = build_trainer(cfg, callbacks)
    if cfg.trainer.max_steps == -1:
        print(f"trainer.max_steps=-1: training until stopped with Ctrl-C (checkpoints every "
              f"{cfg.trainer.checkpoint_every_n_steps} steps in {ckpt_dir})", file=sys.stderr)
    start = time.perf_counter()
    try:
        # weights_only: resuming never unpickles code, even from a checkpoint of unknown origin.
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except SystemExit:  # Lightning exits after a graceful Ctrl-C shutdown
        if not trainer.interrupted:
            raise
    seconds = time.perf_counter() - start
    if trainer.interrupted:
        raise Interrupted(f"training stopped at step {trainer.global_step}; checkpoints in {ckpt_dir}; resume with "
                          f"trainer.resume=last")
    if trainer.is_global_zero and not cfg.trainer.fast_dev_run:
        export = exported_sidenet_path(cfg)
        if text:
            from bafm.training.text_training import export_text_sidenet

            export_text_sidenet(module.ema_sidenet, export, cfg)
        else:
            save_sidenet(module.ema_sidenet, export)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        summary = {"experiment": cfg.name, "steps": trainer.global_step, "seconds": round(seconds, 1),
                   "backbone": cfg.backbone.path, "sidenet": str(export), "metrics": metrics}
        atomic_write_text(run_dir(cfg) / "train_summary.json", json.dumps(summary, indent=2))
        print(f"\nTrained {trainer.global_step} steps in {seconds / 60:.1f} min.")
        print(f"  EMA SideNet:        {export} (+ {export.with_suffix('.json').name}); "
              f"make eval-nfe-sweep / make edit use it")
        print(f"  resumable ckpts:    {ckpt_dir}")
        print(f"  TensorBoard logs:   {Path(trainer.logger.log_dir)}  (make tensorboard)")
        print(f"  NFE-sweep metrics:  {run_dir(cfg) / 'train_sweeps'}")
    return 0
