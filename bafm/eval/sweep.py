"""``bafm eval-nfe-sweep``: FID / IS / trajectory error / time per solver and NFE budget.

A thin layer over ``bafm.eval.engine``: check every input, load the models, run the sweep,
write ``results.csv``, ``results.md``, ``fid_vs_nfe.png``, ``grids/``, TensorBoard scalars
(``tensorboard/``) and optionally ADM-style ``samples/*.npz`` to ``--out`` (default
``eval.out_dir`` or ``runs/<experiment>/nfe_sweep``), then print the Markdown table.
Runs on one device or under ``torchrun`` (samples split across processes, rank 0 writes).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from bafm.config import ExperimentConfig, run_dir, sidenet_path, to_container
from bafm.data.vae import LatentShapeError, check_latent_shape
from bafm.eval.distributed import init_from_env, world_info
from bafm.eval.engine import SweepResult
from bafm.eval.inputs import build_sweep_engine, check_sweep_inputs
from bafm.eval.plan import SweepInputError
from bafm.eval.report import NpzSampleWriter, log_tensorboard, markdown_table, write_reports
from bafm.experiment import describe_sidenet, load_models
from bafm.io import OutputFolderError, atomic_write_text, check_output_folder
from bafm.sampling import REFERENCE, latent_shape


def output_dir(cfg: ExperimentConfig, out: Optional[str] = None) -> Path:
    """``--out``, else ``eval.out_dir``, else ``runs/<experiment>/nfe_sweep``."""
    if out:
        return Path(out)
    return Path(cfg.eval.out_dir) if cfg.eval.out_dir else run_dir(cfg) / "nfe_sweep"


def sweep(
    cfg: ExperimentConfig, out: Optional[str] = None, *, progress: bool = True, print_table: bool = False
) -> SweepResult:
    """Run the configured sweep and write its outputs (rank 0).

    Args:
        cfg: experiment config (``eval``, ``sampling``, ``backbone``, ``sidenet``, ``data``).
        out: output folder (see ``output_dir``).
        progress: tqdm progress bar on rank 0.
        print_table: print the Markdown table and the output folder (rank 0).

    Returns:
        The sweep's rows and grids.

    Raises:
        SweepInputError: bad solver, budget or missing file, before any model is loaded.
    """
    ec = cfg.eval
    solvers = list(ec.solvers)
    budgets = {k: list(v) for k, v in ec.budgets.items()}
    tolerances = {k: [float(t) for t in v] for k, v in ec.tolerances.items()}
    check_sweep_inputs(cfg, solvers, budgets, tolerances=tolerances)
    try:
        check_output_folder(output_dir(cfg, out))  # before sampling, not after
    except OutputFolderError as err:
        raise SweepInputError(str(err)) from None
    if print_table and int(os.environ.get("RANK", "0")) == 0:
        print(describe_sidenet(cfg, solvers), flush=True)
    if ec.device not in ("auto", "cpu") and not str(ec.device).startswith("cuda"):
        raise SweepInputError(f"eval.device is '{ec.device}', expected auto, cpu, cuda or cuda:<i>.")
    try:
        device, created = init_from_env(str(ec.device))
    except ValueError as err:
        raise SweepInputError(str(err)) from None
    try:
        rank, _ = world_info()
        dest = output_dir(cfg, out)
        backbone, sidenet = load_models(cfg.backbone, cfg.sidenet, sidenet_path(cfg), solvers, device)
        try:  # before the engine computes reference statistics for the experiment's data
            check_latent_shape(cfg.data, latent_shape(backbone), cfg.backbone.path)
        except LatentShapeError as err:
            raise SweepInputError(str(err)) from None
        engine = build_sweep_engine(cfg, device=device)
        sink = NpzSampleWriter(dest / "samples") if ec.save_npz else None
        with torch.no_grad():
            result = engine.run(backbone, sidenet, solvers=solvers, budgets=budgets, tolerances=tolerances,
                                num_samples=int(ec.num_samples),
                                device=device, progress=progress, sample_sink=sink)
        if rank == 0:
            write_reports(result.rows, result.grids, dest, title=cfg.name)
            atomic_write_text(dest / "config.yaml", OmegaConf.to_yaml(to_container(cfg)))
            _log_tensorboard(dest / "tensorboard", result)
            if print_table:
                print(markdown_table(result.rows), end="")
                ref = [row for row in result.rows if row["solver"] == REFERENCE]
                if ref:  # which ground truth traj_rmse is measured against, and what it cost
                    print("reference: " + engine.settings.reference.describe(float(ref[0]["nfe"])))
                print(f"results: {dest}")
    finally:
        if created:
            dist.destroy_process_group()
    return result


def _log_tensorboard(folder: Path, result: SweepResult) -> None:
    """Scalars per solver with step = NFE, and the grids, under ``folder``."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    try:
        log_tensorboard(writer, result.rows, result.grids)
    finally:
        writer.close()


def run(cfg: ExperimentConfig, out: Optional[str] = None) -> int:
    """CLI entry (``bafm eval-nfe-sweep --config X [--out DIR] [overrides]``).

    Returns:
        0 on success, 2 on bad input (message on stderr, nothing sampled).
    """
    try:
        sweep(cfg, out, print_table=True)
    except SweepInputError as err:
        print(f"bafm eval-nfe-sweep: {err}", file=sys.stderr)
        return 2
    return 0
