"""``bafm eval-nfe-sweep``: FID / IS / trajectory error / time per solver and NFE budget.

A thin layer over ``bafm.eval.engine``: check every input, load the models, run the sweep,
write ``results.csv``, ``results.md``, the ``*_vs_nfe.png`` and ``*_vs_flops.png`` plots,
``grids/``, TensorBoard scalars (``tensorboard/``) and optionally ADM-style ``samples/*.npz`` to ``--out`` (default
``eval.out_dir`` or ``runs/<experiment>/nfe_sweep``), then print the Markdown table.
Runs on one device or under ``torchrun`` (samples split across processes, rank 0 writes).

The outputs are one set: they are written into a hidden sibling of the output folder, which
then replaces the folder as a whole. A re-run into the same folder leaves none of the previous
sweep's files (per-row images, event files) behind, and an interrupted or failed run leaves the
previous complete results as they were. A folder holding anything but a sweep's outputs is
refused rather than replaced.
"""

from __future__ import annotations

import os
import shutil
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
from bafm.eval.report import NpzSampleWriter, log_solver_runs, log_tensorboard, markdown_table, write_reports
from bafm.experiment import describe_sidenet, load_models
from bafm.errors import Interrupted
from bafm.io import OutputFolderError, atomic_write_text, check_output_folder, replace_folder, staging_folder
from bafm.sampling import REFERENCE, latent_shape


def output_dir(cfg: ExperimentConfig, out: Optional[str] = None) -> Path:
    """``--out``, else ``eval.out_dir``, else ``runs/<experiment>/nfe_sweep``."""
    if out:
        return Path(out)
    return Path(cfg.eval.out_dir) if cfg.eval.out_dir else run_dir(cfg) / "nfe_sweep"


# What a sweep writes at the top of its folder; a folder holding anything else is not replaced.
SWEEP_OUTPUTS = ("results.csv", "results.md", "config.yaml", "*_vs_nfe.png", "*_vs_flops.png", "grids", "tensorboard",
                 "samples")


def check_sweep_folder(folder: Path) -> None:
    """Raise unless ``folder`` is absent, empty or holds only an earlier sweep's outputs.

    Raises:
        SweepInputError: names the folder and the first entries that are not a sweep's.
    """
    if not folder.is_dir():
        return
    foreign = sorted(p.name for p in folder.iterdir() if not any(p.match(g) for g in SWEEP_OUTPUTS))
    if foreign:
        raise SweepInputError(f"output folder '{folder}' holds files that are not a sweep's ({', '.join(foreign[:3])}); "
                              "a sweep replaces its folder as a whole: pass an empty or new folder (--out)")


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
    dest = output_dir(cfg, out).absolute()
    try:  # before sampling, not after: the folder itself and its parent (for the staging sibling)
        check_output_folder(dest)
        check_output_folder(dest.parent)
    except OutputFolderError as err:
        raise SweepInputError(str(err)) from None
    check_sweep_folder(dest)
    if print_table and int(os.environ.get("RANK", "0")) == 0:
        print(describe_sidenet(cfg, solvers), flush=True)
    if ec.device not in ("auto", "cpu") and not str(ec.device).startswith("cuda"):
        raise SweepInputError(f"eval.device is '{ec.device}', expected auto, cpu, cuda or cuda:<i>.")
    try:
        device, created = init_from_env(str(ec.device))
    except ValueError as err:
        raise SweepInputError(str(err)) from None
    staging: Optional[Path] = None
    try:
        rank, _ = world_info()
        backbone, sidenet = load_models(cfg.backbone, cfg.sidenet, sidenet_path(cfg), solvers, device)
        try:  # before the engine computes reference statistics for the experiment's data
            check_latent_shape(cfg.data, latent_shape(backbone), cfg.backbone.path)
        except LatentShapeError as err:
            raise SweepInputError(str(err)) from None
        engine = build_sweep_engine(cfg, device=device)
        if rank == 0:
            staging = staging_folder(dest)
        sink = NpzSampleWriter(staging / "samples") if ec.save_npz and staging is not None else None
        with torch.no_grad():
            result = engine.run(backbone, sidenet, solvers=solvers, budgets=budgets, tolerances=tolerances,
                                num_samples=int(ec.num_samples),
                                device=device, progress=progress, sample_sink=sink)
        if staging is not None:
            write_reports(result.rows, result.grids, staging, title=cfg.name)
            atomic_write_text(staging / "config.yaml", OmegaConf.to_yaml(to_container(cfg)))
            _log_tensorboard(staging / "tensorboard", result)
            replace_folder(staging, dest)
            staging = None
            if print_table:
                print(markdown_table(result.rows), end="")
                ref = [row for row in result.rows if row["solver"] == REFERENCE]
                if ref:  # which ground truth traj_rmse is measured against, and what it cost
                    print("reference: " + engine.settings.reference.describe(float(ref[0]["nfe"])))
                print(f"results: {dest}")
    except KeyboardInterrupt:
        kept = "the previous sweep there is left as it was" if dest.is_dir() else "it was not created"
        raise Interrupted(f"nothing written to '{dest}'; {kept}") from None
    finally:
        if staging is not None:  # a failed or interrupted run: the previous results stay
            shutil.rmtree(staging, ignore_errors=True)
        if created:
            dist.destroy_process_group()
    return result


def _log_tensorboard(folder: Path, result: SweepResult) -> None:
    """Scalars per solver with step = NFE, and the grids, under ``folder``; one run per solver under
    ``folder/solvers/`` (a coloured line per solver on each metric's chart)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    try:
        log_tensorboard(writer, result.rows, result.grids)
    finally:
        writer.close()
    log_solver_runs(folder / "solvers", result.rows)


def run(cfg: ExperimentConfig, out: Optional[str] = None) -> int:
    """CLI entry (``bafm eval-nfe-sweep --config X [--out DIR] [overrides]``).

    Returns:
        0 on success.

    Raises:
        SweepInputError: bad input, before anything is sampled (``bafm.cli`` reports it).
    """
    if str(cfg.backbone.source) in ("sd3", "flux"):  # text-to-image: prompts, CLIP score (bafm.eval.text_sweep)
        from bafm.eval.text_sweep import run as run_text_sweep

        return run_text_sweep(cfg, out)
    sweep(cfg, out, print_table=True)
    return 0
