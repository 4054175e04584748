"""``bafm edit``: invert images under their class and regenerate them under another one.

Inputs are digits from the val split (``edit.indices``, embedded default) or the images of a
folder (``edit.image_dir``, encoded with the experiment's VAE). For every solver and NFE budget
(``edit.solvers``, ``edit.budgets``; on ``sampling.grid``, an ``optimized`` grid read per solver
and NFE from the grid file and run backwards for the inversion) each latent is inverted to noise
under its source class (``t`` from 0 up to 1) and the noise is regenerated twice: under the source
class (the reconstruction) and under ``edit.target_class`` (the edit). Written atomically to ``--out``
(default ``edit.out_dir`` or ``runs/<experiment>/edit``):

* ``edit_results.csv`` / ``edit_results.md``: per solver and NFE, ``recon_psnr`` (dB, decoded
  images in ``[0, 1]`` against the decoded input latents, so the VAE's own error is left out),
  ``recon_latent_rmse``, ``edit_target_prob`` and ``edit_target_acc`` (the classifier's mean
  target-class probability and accuracy on the edits; NaN when ``eval.feature_extractor`` is not
  ``classifier``, e.g. ImageNet with Inception) and the seconds spent;
* ``edit_grid.png``: the inputs, then a reconstruction row and an edit row per solver and budget,
  labelled on the left (the legend is repeated in ``edit_results.md``);
* ``config.yaml``: the resolved config.

Every input is checked before anything is sampled.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from bafm.config import ExperimentConfig, run_dir, sampling_settings, sidenet_path, to_container
from bafm.editing.inputs import EditInputs, check_inputs, load_inputs, point_grids
from bafm.editing.plan import REFERENCE, EditInputError, EditPoint, edit_plan
from bafm.editing.inversion import edit_latents
from bafm.editing.report import (Row, latent_rmse, markdown_table, notes, psnr, render_grid, rows_to_csv,
                                 target_scores)  # fmt: skip
from bafm.sampling import grid_label
from bafm.solvers.ground_truth import Reference
from bafm.solvers.grids import GridSpec, steps_for_budget


def output_dir(cfg: ExperimentConfig, out: Optional[str] = None) -> Path:
    """``--out``, else ``edit.out_dir``, else ``runs/<experiment>/edit``."""
    if out:
        return Path(out)
    return Path(cfg.edit.out_dir) if cfg.edit.out_dir else run_dir(cfg) / "edit"


def decode_batched(decode: Callable[[Tensor], Tensor], latents: Tensor, batch: int) -> Tensor:
    """``decode`` (latents -> images in ``[0, 1]``) applied ``batch`` latents at a time."""
    return torch.cat([decode(latents[i : i + batch]) for i in range(0, latents.shape[0], batch)])


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_models(
    cfg: ExperimentConfig, points: Sequence[EditPoint], device: torch.device
) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The frozen backbone, and the SideNet when a solver needs one (the sweep's loader)."""
    from bafm.experiment import load_models
    from bafm.models.checkpoint_io import CheckpointError

    try:
        return load_models(cfg.backbone, cfg.sidenet, sidenet_path(cfg), [point.solver for point in points], device)
    except (CheckpointError, ValueError, TypeError) as err:
        raise EditInputError(str(err)) from None


def _check_latent_shape(cfg: ExperimentConfig, backbone: nn.Module) -> None:
    """The experiment's latents (shards, or data.resolution with the VAE) must fit the backbone."""
    from bafm.data.vae import LatentShapeError, check_latent_shape
    from bafm.sampling import latent_shape

    try:
        check_latent_shape(cfg.data, latent_shape(backbone), cfg.backbone.path)
    except LatentShapeError as err:
        raise EditInputError(str(err)) from None


def _load_classifier(cfg: ExperimentConfig, decoded: Tensor, device: torch.device) -> Optional[nn.Module]:
    """The digits classifier, checked against the decoded images and the target class; None without one."""
    if cfg.eval.feature_extractor != "classifier":
        return None
    from bafm.models.classifier import load_classifier

    try:
        model = load_classifier(cfg.eval.classifier_path, device=device)
    except (FileNotFoundError, ValueError) as err:
        raise EditInputError(f"eval.classifier_path: {err}") from None
    expected = (model.in_channels, model.image_size, model.image_size)
    if tuple(decoded.shape[1:]) != expected or cfg.edit.target_class >= model.num_classes:
        raise EditInputError(
            f"eval.classifier_path: the classifier takes {expected} images and {model.num_classes} classes; the "
            f"edits are {tuple(decoded.shape[1:])} with target class {cfg.edit.target_class}."
        )
    return model


def run_edit(cfg: ExperimentConfig, out: Optional[str] = None, *, print_table: bool = False) -> List[Row]:
    """Check the inputs, edit, and write the CSV, Markdown, grid and config.

    Args:
        cfg: experiment config (``edit``, ``sampling``, ``backbone``, ``sidenet``, ``data``, ``eval``).
        out: output folder (see ``output_dir``).
        print_table: print the Markdown table and the output folder.

    Returns:
        One row per solver and NFE, with the ``COLUMNS``.

    Raises:
        EditInputError: bad input, before anything is sampled.
    """
    from omegaconf import OmegaConf

    from bafm.data.vae import build_decoder, decoder_options
    from bafm.experiment import describe_sidenet
    from bafm.io import OutputFolderError, atomic_write_bytes, atomic_write_text, check_output_folder

    points = edit_plan(cfg.edit, cfg.eval)
    check_inputs(cfg, points)
    grids = point_grids(cfg, points)
    dest = output_dir(cfg, out)
    try:
        check_output_folder(dest)  # before sampling, not after
    except OutputFolderError as err:
        raise EditInputError(str(err)) from None
    if print_table:
        print(describe_sidenet(cfg, [point.solver for point in points]), flush=True)
    device = _resolve_device(str(cfg.edit.device))
    backbone, sidenet = _load_models(cfg, points, device)
    _check_latent_shape(cfg, backbone)
    inputs = load_inputs(cfg, backbone, device)
    decode = build_decoder(**decoder_options(cfg.data))
    with torch.no_grad():
        reference_images = decode_batched(decode, inputs.latents, int(cfg.edit.batch_size))
        classifier = _load_classifier(cfg, reference_images, device)
        rows, grid_rows = _edit_all(cfg, backbone, sidenet, inputs, decode, reference_images, classifier, grids)
    shown = slice(0, int(cfg.edit.grid_images))
    header = [f"{n} ({int(c)})" for n, c in zip(inputs.names[shown], inputs.source[shown].tolist())]
    table = markdown_table(rows)
    legend = "\n".join(f"{i + 1}. {label}" for i, (label, _) in enumerate(grid_rows))
    if shown.stop > 0:
        grid = render_grid([("input", inputs.images[shown].cpu())] + grid_rows, header)
        atomic_write_bytes(dest / "edit_grid.png", grid)
    atomic_write_text(dest / "edit_results.csv", rows_to_csv(rows))
    note = notes(cfg, classifier is not None)
    rows_md = f"Rows of edit_grid.png (columns: input, source class):\n0. input\n{legend}\n"
    atomic_write_text(dest / "edit_results.md", f"{table}\n{note}\n{rows_md}")
    atomic_write_text(dest / "config.yaml", OmegaConf.to_yaml(to_container(cfg)))
    if print_table:
        print(table, end="")
        print(note, end="")
        print(f"results: {dest}")
    return rows


def _edit_all(cfg: ExperimentConfig, backbone: nn.Module, sidenet: Optional[nn.Module], inputs: EditInputs,
              decode: Any, reference_images: Tensor, classifier: Optional[nn.Module],
              grids: Mapping[EditPoint, GridSpec]) -> Tuple[List[Row], List[Tuple[str, Tensor]]]:
    """Every point (with its grid) over all inputs, in batches: metric rows and grid rows.

    The reference row is solved by the sweep's reference (``eval.reference_solver`` and its options);
    an adaptive solver's row by its ``eval.tolerances`` level (``rtol = atol``).
    """
    ec, settings = cfg.edit, sampling_settings(cfg, cfg_scale=cfg.edit.cfg_scale)
    reference = Reference.from_eval(cfg.eval)
    target = torch.full_like(inputs.source, int(ec.target_class))
    rows: List[Row] = []
    grid_rows: List[Tuple[str, Tensor]] = []
    n, batch = inputs.latents.shape[0], int(ec.batch_size)
    for point, grid in grids.items():
        solver, nfe = point.solver, point.nfe
        if solver == REFERENCE:  # the sweep's reference, on its own grid
            grid_name, steps = reference.grid_label, len(reference.grid()) - 1
        else:
            grid_name, steps = grid_label(solver, settings), steps_for_budget(solver, nfe)
        options = {"rtol": point.tol, "atol": point.tol} if point.tol is not None else {}
        recon, edits, counted = [], [], 0
        start = time.perf_counter()
        for lo in range(0, n, batch):
            res = edit_latents(
                backbone, sidenet, inputs.latents[lo : lo + batch], inputs.source[lo : lo + batch],
                target[lo : lo + batch], solver, settings, nfe=nfe, grid=grid, reference=reference, **options,
            )
            recon.append(res.reconstruction)
            edits.append(res.edit)
            counted = max(counted, res.nfe)
        if inputs.latents.is_cuda:
            torch.cuda.synchronize(inputs.latents.device)
        seconds = time.perf_counter() - start
        recon_latents, edit_latents_ = torch.cat(recon), torch.cat(edits)
        recon_images = decode_batched(decode, recon_latents, batch)
        edit_images = decode_batched(decode, edit_latents_, batch)
        prob, acc = target_scores(classifier, edit_images, int(ec.target_class))
        rows.append({
            "solver": point.solver, "grid": grid_name, "tol": point.tol, "nfe": counted, "steps": steps,
            "recon_psnr": float(psnr(recon_images, reference_images).mean()),
            "recon_latent_rmse": latent_rmse(recon_latents, inputs.latents),
            "edit_target_prob": prob, "edit_target_acc": acc, "seconds": seconds, "n_images": n,
        })
        name, shown = f"{point.label} {counted} NFE", int(ec.grid_images)  # keep only what the grid shows
        grid_rows += [(f"{name} recon", recon_images[:shown].cpu()),
                      (f"{name} edit->{ec.target_class}", edit_images[:shown].cpu())]
        print(f"bafm edit: {name} done in {seconds:.3g} s", file=sys.stderr)
    return rows, grid_rows


def run(cfg: ExperimentConfig, out: Optional[str] = None) -> int:
    """CLI entry (``bafm edit --config X [--out DIR] [overrides]``).

    Returns:
        0 on success.

    Raises:
        EditInputError: bad input, before anything is sampled or written (``bafm.cli`` reports it).
    """
    run_edit(cfg, out, print_table=True)
    return 0
