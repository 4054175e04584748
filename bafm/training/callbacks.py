"""``NFESweepCallback``: BA-solver vs. baselines at several NFE budgets while the SideNet trains."""

from __future__ import annotations

import math

from pathlib import Path
from typing import Any, Callable, Dict, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from bafm.eval.report import DASHBOARD_METRICS
from bafm.io import atomic_write_text

CALLBACK_METRICS = ("fid", "fd_ref", "sfid", "is", "precision", "recall", "traj_rmse")
# device -> the sweep engine (its feature extractor and reference statistics built on that device).
EngineFactory = Callable[[torch.device], Any]


class NFESweepCallback(Callback):
    """Every ``eval.every_n_steps`` (and at the end, see below), sample with the EMA SideNet and log metrics.

    For each solver in ``eval.callback_solvers`` and budget in ``eval.callback_budgets`` it runs
    the evaluation engine on ``eval.callback_num_samples`` fixed per-sample seeds and logs
    ``sweep/<metric>/<solver>_nfe<N>`` (FID, ``fd_ref``, sFID with Inception, IS, precision,
    recall, trajectory RMSE) and sample grids to TensorBoard, plus a CSV per evaluation in ``out_dir``
    (``runs/<experiment>/train_sweeps/``). A custom-scalars layout puts every solver at one budget
    on one chart per metric (``BA vs baselines`` in TensorBoard's "Custom Scalars" tab). Samples
    are split across ranks by the engine; only rank 0 writes. Its plan was checked with the config
    (``bafm.plans.callback_plan``).

    At the end of training the final weights are swept once more (unless the last step was just
    swept) when a scheduled sweep fell due during the run (``global_step >= every_n_steps``) or
    when ``eval.sweep_at_end`` asks for it; a short debug run draws no samples otherwise.
    """

    def __init__(self, evaluation: Any, build_engine: EngineFactory, out_dir: Path | str) -> None:
        """
        Args:
            evaluation: the ``eval`` config section (``every_n_steps``, ``sweep_at_end``,
                ``callback_*``, ``tolerances``).
            build_engine: builds the sweep engine on a device (``bafm.eval.inputs.build_sweep_engine``).
            out_dir: where the per-evaluation CSVs go.
        """
        super().__init__()
        self.evaluation, self.build_engine, self.out_dir = evaluation, build_engine, Path(out_dir)
        self.every = int(evaluation.every_n_steps)
        self.at_end = bool(evaluation.sweep_at_end)
        self._engine: Optional[Any] = None
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._engine is None:
            # Builds the feature extractor and reference statistics now, so missing files fail
            # before the first training step.
            self._engine = self.build_engine(pl_module.device)
            experiment = getattr(trainer.logger, "experiment", None)
            if trainer.is_global_zero and hasattr(experiment, "add_custom_scalars"):
                experiment.add_custom_scalars(self.layout())

    def layout(self) -> Dict[str, Any]:
        """Custom-scalars charts: per metric and budget, every callback solver over training steps."""
        ec = self.evaluation
        charts = {}
        # sFID needs Inception's spatial features; other extractors leave it blank.
        metrics = [m for m in CALLBACK_METRICS if m != "sfid" or ec.feature_extractor == "inception"]
        for metric, label in DASHBOARD_METRICS:
            if metric in metrics:
                for nfe in ec.callback_budgets:
                    charts[f"{label} at {nfe} NFE"] = ["Multiline", [rf"^sweep/{metric}/.*_nfe{int(nfe)}$"]]
        return {"BA vs baselines during training": charts}

    @staticmethod
    def _log_solver_runs(folder: Path, rows: Any, step: int) -> None:
        """One TensorBoard run per solver (``<log_dir>/solvers/<solver>``) with tags ``sweep/<metric>_nfe<N>``:
        each metric at each budget is one chart over training steps with a coloured line per solver."""
        from torch.utils.tensorboard import SummaryWriter

        for solver in dict.fromkeys(row["solver"] for row in rows):
            if solver == "reference":
                continue
            writer = SummaryWriter(log_dir=str(folder / solver))
            try:
                for row in (r for r in rows if r["solver"] == solver):
                    for key in CALLBACK_METRICS:
                        if row.get(key) is not None and not math.isnan(float(row[key])):
                            writer.add_scalar(f"sweep/{key}_nfe{row['nfe']}", float(row[key]), global_step=step)
            finally:
                writer.close()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0 and step != self._last_step:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step and not trainer.fast_dev_run and self.sweeps_at_end(
            trainer.global_step
        ):
            self._evaluate(trainer, pl_module)

    def sweeps_at_end(self, final_step: int) -> bool:
        """Whether a run ending at ``final_step`` gets an end-of-training sweep."""
        return self.at_end or (self.every > 0 and final_step >= self.every)

    @staticmethod
    def wanted(evaluation: Any, max_steps: int) -> bool:
        """Whether a run of ``max_steps`` steps sweeps at all (else the callback, and its Inception set-up,
        is skipped), by the ``eval`` section's ``every_n_steps`` and ``sweep_at_end``."""
        every, max_steps = int(evaluation.every_n_steps), int(max_steps)
        return bool(evaluation.sweep_at_end) or (every > 0 and (max_steps < 0 or every <= max_steps))

    @torch.no_grad()
    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from bafm.eval.report import rows_to_csv

        assert self._engine is not None
        self._last_step = step = trainer.global_step
        ec = self.evaluation
        solvers = list(ec.callback_solvers)  # checked with the config (bafm.plans.callback_plan)
        budgets: Dict[str, list] = {s: list(ec.callback_budgets) for s in solvers}
        tolerances = {k: [float(t) for t in v] for k, v in ec.tolerances.items()}
        was_training = pl_module.training
        pl_module.eval()
        try:
            result = self._engine.run(
                backbone=pl_module.backbone, sidenet=pl_module.ema_sidenet, solvers=solvers,
                budgets=budgets, tolerances=tolerances, num_samples=ec.callback_num_samples,
                device=pl_module.device, progress=False,
            )
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        metrics = {}
        for row in result.rows:
            tag = f"{row['solver']}_nfe{row['nfe']}"
            for key in CALLBACK_METRICS:
                if row.get(key) is not None:
                    metrics[f"sweep/{key}/{tag}"] = float(row[key])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            for (solver, nfe), grid in result.grids.items():
                experiment.add_image(f"samples/{solver}_nfe{nfe}", grid, global_step=step)
        log_dir = getattr(trainer.logger, "log_dir", None)
        if log_dir is not None:
            self._log_solver_runs(Path(log_dir) / "solvers", result.rows, step)
        atomic_write_text(self.out_dir / f"step{step:07d}.csv", rows_to_csv(result.rows))
        summary = ", ".join(f"{k.split('/', 2)[2]} {k.split('/')[1]}={v:.4g}" for k, v in metrics.items()
                            if k.startswith(("sweep/fd_ref/", "sweep/traj_rmse/")))
        pl_module.print(f"[step {step}] NFE sweep: {summary}")
