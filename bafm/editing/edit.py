"""``bafm edit``: invert images under their class and regenerate them under another one.

Inputs are digits from the val split (``edit.indices``, embedded default) or the images of a
folder (``edit.image_dir``, encoded with the experiment's VAE). For every solver and NFE budget
(``edit.solvers``, ``edit.budgets``) each latent is inverted to noise under its source class
(``t`` from 0 up to 1) and the noise is regenerated twice: under the source class (the
reconstruction) and under ``edit.target_class`` (the edit). Written atomically to ``--out``
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

import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from bafm.config import ExperimentConfig, run_dir, sidenet_path, to_container
from bafm.data.images import IMAGE_EXTENSIONS
from bafm.data.manifest import latent_scaling_factor
from bafm.editing.inversion import edit_latents, is_adaptive, steps_for_budget
from bafm.eval import report
from bafm.solvers import SOLVERS

COLUMNS = ("solver", "nfe", "steps", "recon_psnr", "recon_latent_rmse", "edit_target_prob", "edit_target_acc",
           "seconds", "n_images")  # fmt: skip
Row = Dict[str, Any]
Point = Tuple[str, Optional[int]]  # (solver, NFE budget); None for the adaptive reference solver


class EditInputError(ValueError):
    """Bad ``bafm edit`` input (class, solver, budget, file, image size), found before sampling."""


@dataclass
class EditInputs:
    """What gets edited.

    Attributes:
        latents: scaled latents ``(N, C, H, W)`` at ``t = 0``.
        images: the input pictures ``(N, 1 or 3, H', W')`` in ``[0, 1]`` (the grid's first row).
        source: int64 source classes ``(N,)``.
        names: one name per input (file or dataset index).
    """

    latents: Tensor
    images: Tensor
    source: Tensor
    names: List[str]


def output_dir(cfg: ExperimentConfig, out: Optional[str] = None) -> Path:
    """``--out``, else ``edit.out_dir``, else ``runs/<experiment>/edit``."""
    if out:
        return Path(out)
    return Path(cfg.edit.out_dir) if cfg.edit.out_dir else run_dir(cfg) / "edit"


def plan_points(cfg: ExperimentConfig) -> List[Point]:
    """``(solver, nfe)`` pairs from ``edit.solvers`` / ``edit.budgets`` (nfe None for ``reference``).

    Raises:
        EditInputError: unknown or repeated solver, missing or infeasible budget.
    """
    ec = cfg.edit
    solvers = list(ec.solvers)
    if not solvers:
        raise EditInputError("edit.solvers is empty; name at least one solver, e.g. edit.solvers=[ba,euler].")
    points: List[Point] = []
    for name in solvers:
        if name not in SOLVERS:
            raise EditInputError(f"unknown solver '{name}' in edit.solvers; valid solvers: {', '.join(SOLVERS)}.")
        if solvers.count(name) > 1:
            raise EditInputError(f"edit.solvers lists '{name}' {solvers.count(name)} times.")
        if is_adaptive(name):
            points.append((name, None))  # its NFE is counted, no budget applies
            continue
        if name not in ec.budgets or not list(ec.budgets[name]):
            raise EditInputError(f"no NFE budgets for solver '{name}': set edit.budgets.{name}=[...].")
        for nfe in ec.budgets[name]:
            if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
                raise EditInputError(f"edit.budgets.{name}: budget {nfe!r} is not a positive integer.")
            try:
                steps_for_budget(name, int(nfe))
            except ValueError as err:
                raise EditInputError(f"edit.budgets.{name}: {err}.") from None
            points.append((name, int(nfe)))
    return points


def check_inputs(cfg: ExperimentConfig, points: Sequence[Point]) -> None:
    """The checks that need no model: classes, options, files, indices.

    Raises:
        EditInputError: naming the key, the value and what was expected.
    """
    ec, digits = cfg.edit, cfg.data.source == "digits"
    if ec.target_class < 0:
        raise EditInputError(f"edit.target_class is {ec.target_class}, expected a class id >= 0.")
    if ec.source_class is not None and ec.source_class < 0:
        raise EditInputError(f"edit.source_class is {ec.source_class}, expected a class id >= 0 or null.")
    if ec.batch_size < 1 or ec.grid_images < 0:
        raise EditInputError(
            f"edit.batch_size ({ec.batch_size}) must be >= 1 and edit.grid_images ({ec.grid_images}) >= 0."
        )
    if ec.device not in ("auto", "cpu") and not str(ec.device).startswith("cuda"):
        raise EditInputError(f"edit.device is '{ec.device}', expected auto, cpu, cuda or cuda:<i>.")
    if str(ec.device).startswith("cuda") and not torch.cuda.is_available():
        raise EditInputError(f"edit.device is '{ec.device}' but CUDA is not available.")
    if not Path(cfg.backbone.path).is_file():
        hint = "make it with `make backbone`" if digits else "download the pretrained checkpoint and set backbone.path"
        raise EditInputError(f"backbone checkpoint '{cfg.backbone.path}' not found; {hint}.")
    side = sidenet_path(cfg)
    for name, _ in points:
        if SOLVERS[name].uses_side_fn and not side.is_file():
            raise EditInputError(
                f"solver '{name}' needs a trained SideNet, none found at '{side}' (sidenet.path, else "
                f"<checkpoints_dir>/<name>/sidenet.safetensors). `make train` creates it there; or point "
                f"sidenet.path at one, or drop '{name}' from edit.solvers."
            )
    if ec.image_dir:
        if not Path(ec.image_dir).is_dir():
            raise EditInputError(f"edit.image_dir: folder '{ec.image_dir}' not found.")
        if not _image_files(Path(ec.image_dir)):
            raise EditInputError(f"edit.image_dir: '{ec.image_dir}' holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        if ec.source_class is None:
            raise EditInputError("edit.source_class must be set for edit.image_dir images (a folder has no labels).")
    elif not digits:
        raise EditInputError(
            f"edit.image_dir is empty: data.source='{cfg.data.source}' has no built-in images; set edit.image_dir."
        )
    else:
        from bafm.data.digits import digits_split_indices

        n_val = len(digits_split_indices(int(cfg.seed), float(cfg.data.val_fraction))["val"])
        indices = list(ec.indices)
        bad = [i for i in indices if not 0 <= i < n_val]
        if not indices or bad:
            raise EditInputError(
                f"edit.indices is {indices}: expected a non-empty list of indices into the digits val split "
                f"(0..{n_val - 1}){f'; out of range: {bad}' if bad else ''}."
            )
    if cfg.eval.feature_extractor == "classifier":
        from bafm.models.classifier import sidecar_path

        for p in (Path(cfg.eval.classifier_path), sidecar_path(cfg.eval.classifier_path)):
            if not p.is_file():
                raise EditInputError(
                    f"eval.classifier_path: '{p}' not found; train the classifier with `make backbone`."
                )
    if not digits and not Path(cfg.data.vae_path).exists():
        raise EditInputError(f"data.vae_path: '{cfg.data.vae_path}' not found; images are encoded and decoded with it.")


def _image_files(folder: Path) -> List[Path]:
    """Images under ``folder`` (recursively), sorted by relative path."""
    return sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                  key=lambda p: p.relative_to(folder).as_posix())


def _read_pixels(path: Path, size: int, channels: int, crop: bool) -> Tensor:
    """An image as ``(channels, size, size)`` in ``[-1, 1]``; its size must match unless ``crop``."""
    from PIL import Image

    from bafm.data.images import center_crop_arr

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
    except Exception as err:  # PIL raises many types for damaged files
        raise EditInputError(f"edit.image_dir: cannot read image '{path}': {err}") from None
    if crop:
        arr = center_crop_arr(img, size)
    elif img.size != (size, size):
        raise EditInputError(
            f"edit.image_dir: '{path}' is {img.size[0]}x{img.size[1]} pixels, but the backbone expects "
            f"{size}x{size} images; resize them or set edit.center_crop=true (ADM center crop)."
        )
    else:
        arr = np.asarray(img)
    pixels = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(size, size, channels).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


def _vae_scale(cfg: ExperimentConfig) -> float:
    """The latent scaling factor, as ``bafm.data.vae.build_decoder`` reads it (manifest first)."""
    return latent_scaling_factor(Path(cfg.data.root) / cfg.data.dataset, cfg.data.vae_scaling_factor)


def load_inputs(cfg: ExperimentConfig, backbone: nn.Module, device: torch.device) -> EditInputs:
    """Read and encode the inputs; check their classes and size against the backbone.

    Raises:
        EditInputError: class id out of range, image size or channels not the backbone's.
    """
    from bafm.eval.sampler import latent_shape

    ec, shape = cfg.edit, latent_shape(backbone)
    if cfg.data.source == "digits" and ec.image_dir and shape[0] not in (1, 3):
        raise EditInputError(f"edit.image_dir: the backbone takes {shape[0]}-channel latents; "
                             "grey (1) or RGB (3) pixel latents are expected for data.source=digits.")
    num_classes = int(backbone.num_classes)
    for key, value in (("target_class", ec.target_class), ("source_class", ec.source_class)):
        if value is not None and value >= num_classes:
            raise EditInputError(
                f"edit.{key} is {value}, but the backbone has {num_classes} classes (ids 0..{num_classes - 1})."
            )
    if ec.image_dir:
        files = _image_files(Path(ec.image_dir))
        if cfg.data.source == "digits":  # identity "VAE": the pixels are the latents
            pixels = torch.stack([_read_pixels(p, shape[-1], shape[0], ec.center_crop) for p in files])
            latents = pixels
        else:
            latents, pixels = _encode_folder(cfg, files, shape, device)
        source = torch.full((len(files),), int(ec.source_class), dtype=torch.int64)
        names = [p.relative_to(ec.image_dir).as_posix() for p in files]
        return EditInputs(latents.to(device), ((pixels + 1.0) / 2.0).clamp(0, 1).to(device), source.to(device), names)
    from bafm.data.digits import load_digits_images

    images, labels = load_digits_images("val", cfg)
    idx = torch.as_tensor(list(ec.indices), dtype=torch.int64)
    latents, source = images[idx], labels[idx]
    if tuple(latents.shape[1:]) != shape:
        raise EditInputError(
            f"edit.indices: digits images are {tuple(latents.shape[1:])} (data.digits_size={cfg.data.digits_size}), "
            f"but the backbone expects {shape} latents."
        )
    if ec.source_class is not None:
        source = torch.full_like(source, int(ec.source_class))
    names = [f"val[{i}]" for i in idx.tolist()]
    return EditInputs(latents.to(device), ((latents + 1.0) / 2.0).clamp(0, 1).to(device), source.to(device), names)


def _encode_folder(cfg: ExperimentConfig, files: Sequence[Path], shape: Tuple[int, ...],
                   device: torch.device) -> Tuple[Tensor, Tensor]:
    """VAE posterior means (scaled) and the ``[-1, 1]`` pixels of RGB images."""
    from bafm.data.vae import load_autoencoder

    try:
        codec = load_autoencoder(cfg.data.vae_path).to(device)
    except (FileNotFoundError, ValueError) as err:
        raise EditInputError(f"data.vae_path: {err}") from None
    if codec.latent_channels != shape[0]:
        raise EditInputError(f"the VAE at '{cfg.data.vae_path}' has {codec.latent_channels} latent channels, "
                             f"the backbone expects {shape[0]}.")
    size = shape[-1] * codec.downsample
    pixels = torch.stack([_read_pixels(p, size, 3, cfg.edit.center_crop) for p in files])
    scale, batch = _vae_scale(cfg), int(cfg.edit.batch_size)
    means = [codec.encode_moments(pixels[i : i + batch].to(device))[0] * scale for i in range(0, len(files), batch)]
    return torch.cat(means), pixels


def decode_batched(decode: Callable[[Tensor], Tensor], latents: Tensor, batch: int) -> Tensor:
    """``decode`` (latents -> images in ``[0, 1]``) applied ``batch`` latents at a time."""
    return torch.cat([decode(latents[i : i + batch]) for i in range(0, latents.shape[0], batch)])


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB of images ``(N, C, H, W)`` in ``[0, 1]``; ``(N,)``."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def latent_rmse(a: Tensor, b: Tensor) -> float:
    """Root-mean-square difference of two latent batches ``(N, C, H, W)``."""
    return float((a.double() - b.double()).square().mean().sqrt())


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_models(
    cfg: ExperimentConfig, points: Sequence[Point], device: torch.device
) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The frozen backbone, and the SideNet when a solver needs one (the sweep's loader)."""
    from bafm.eval.inputs import load_models
    from bafm.models.checkpoint_io import CheckpointError

    try:
        return load_models(cfg, [name for name, _ in points], device)
    except (CheckpointError, ValueError, TypeError) as err:
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

    from bafm.data.vae import build_decoder
    from bafm.io import atomic_write_bytes, atomic_write_text

    points = plan_points(cfg)
    check_inputs(cfg, points)
    device = _resolve_device(str(cfg.edit.device))
    backbone, sidenet = _load_models(cfg, points, device)
    inputs = load_inputs(cfg, backbone, device)
    decode = build_decoder(cfg)
    with torch.no_grad():
        reference_images = decode_batched(decode, inputs.latents, int(cfg.edit.batch_size))
        classifier = _load_classifier(cfg, reference_images, device)
        rows, grid_rows = _edit_all(cfg, backbone, sidenet, inputs, decode, reference_images, classifier, points)
    dest = output_dir(cfg, out)
    shown = slice(0, int(cfg.edit.grid_images))
    header = [f"{n} ({int(c)})" for n, c in zip(inputs.names[shown], inputs.source[shown].tolist())]
    table = markdown_table(rows)
    legend = "\n".join(f"{i + 1}. {label}" for i, (label, _) in enumerate(grid_rows))
    if shown.stop > 0:
        grid = render_grid([("input", inputs.images[shown].cpu())] + grid_rows, header)
        atomic_write_bytes(dest / "edit_grid.png", grid)
    atomic_write_text(dest / "edit_results.csv", rows_to_csv(rows))
    notes = _notes(cfg, classifier is not None)
    rows_md = f"Rows of edit_grid.png (columns: input, source class):\n0. input\n{legend}\n"
    atomic_write_text(dest / "edit_results.md", f"{table}\n{notes}\n{rows_md}")
    atomic_write_text(dest / "config.yaml", OmegaConf.to_yaml(to_container(cfg)))
    if print_table:
        print(table, end="")
        print(notes, end="")
        print(f"results: {dest}")
    return rows


def _edit_all(cfg: ExperimentConfig, backbone: nn.Module, sidenet: Optional[nn.Module], inputs: EditInputs,
              decode: Any, reference_images: Tensor, classifier: Optional[nn.Module],
              points: Sequence[Point]) -> Tuple[List[Row], List[Tuple[str, Tensor]]]:
    """Every ``(solver, nfe)`` point over all inputs, in batches: metric rows and grid rows."""
    ec, sc = cfg.edit, cfg.sampling
    cfg_scale = float(sc.cfg_scale if ec.cfg_scale is None else ec.cfg_scale)
    target = torch.full_like(inputs.source, int(ec.target_class))
    rows: List[Row] = []
    grid_rows: List[Tuple[str, Tensor]] = []
    n, batch = inputs.latents.shape[0], int(ec.batch_size)
    for solver, nfe in points:
        options = {"rtol": cfg.eval.reference_rtol, "atol": cfg.eval.reference_atol} if is_adaptive(solver) else {}
        recon, edits, counted = [], [], 0
        start = time.perf_counter()
        for lo in range(0, n, batch):
            res = edit_latents(
                backbone.velocity, inputs.latents[lo : lo + batch], inputs.source[lo : lo + batch],
                target[lo : lo + batch], solver, nfe, null_class=int(backbone.num_classes),
                side_velocity=sidenet.velocity if sidenet is not None else None, cfg_scale=cfg_scale,
                interval=tuple(float(v) for v in sc.guidance_interval), grid=str(sc.grid), shift=float(sc.shift),
                **options,
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
        prob, acc = _target_scores(classifier, edit_images, int(ec.target_class))
        rows.append({
            "solver": solver, "nfe": counted, "steps": steps_for_budget(solver, nfe),
            "recon_psnr": float(psnr(recon_images, reference_images).mean()),
            "recon_latent_rmse": latent_rmse(recon_latents, inputs.latents),
            "edit_target_prob": prob, "edit_target_acc": acc, "seconds": seconds, "n_images": n,
        })
        name, shown = f"{solver} {counted} NFE", int(ec.grid_images)  # keep only what the grid shows
        grid_rows += [(f"{name} recon", recon_images[:shown].cpu()),
                      (f"{name} edit->{ec.target_class}", edit_images[:shown].cpu())]
        print(f"bafm edit: {name} done in {seconds:.3g} s", file=sys.stderr)
    return rows, grid_rows


def _target_scores(classifier: Optional[nn.Module], images: Tensor, target: int) -> Tuple[float, float]:
    """Mean target-class probability and accuracy of images in ``[0, 1]``; NaN without a classifier."""
    if classifier is None:
        return math.nan, math.nan
    probs = classifier(images.float() * 2.0 - 1.0).softmax(-1)  # trained on [-1, 1] pixels
    return float(probs[:, target].mean()), float((probs.argmax(-1) == target).double().mean())


def _notes(cfg: ExperimentConfig, has_classifier: bool) -> str:
    scale = cfg.sampling.cfg_scale if cfg.edit.cfg_scale is None else cfg.edit.cfg_scale
    lines = [f"Guidance scale {scale} on {list(cfg.sampling.guidance_interval)}; nfe is per direction "
             "(inversion and each regeneration spend it once); recon_psnr against the decoded input latents."]
    if not has_classifier:
        lines.append(f"edit_target_prob/edit_target_acc are NaN: eval.feature_extractor is "
                     f"'{cfg.eval.feature_extractor}', and only a 'classifier' gives class probabilities.")
    return "\n".join(lines) + "\n"


def rows_to_csv(rows: Sequence[Row]) -> str:
    """CSV text with the ``COLUMNS`` header."""
    return report.rows_to_csv(rows, COLUMNS, ".6g")


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a GitHub Markdown table (the CSV's columns)."""
    return report.markdown_table(rows, COLUMNS, {c: ".6g" for c in COLUMNS})


def render_grid(rows: Sequence[Tuple[str, Tensor]], header: Sequence[str]) -> bytes:
    """PNG of labelled rows of images.

    Args:
        rows: ``(label, images)`` with images ``(N, 1 or 3, H, W)`` in ``[0, 1]``, all the same size.
        header: one caption per column.

    Returns:
        PNG bytes; small images are enlarged (nearest neighbour) to about 64 pixels.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    tiles = [(label, images.float().cpu().clamp(0, 1)) for label, images in rows]
    cols, (h, w) = tiles[0][1].shape[0], tiles[0][1].shape[-2:]
    zoom = max(1, round(64 / max(h, w)))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(draw.textlength(label, font=font) for label, _ in rows)) + 8
    cell_w = max([w * zoom] + [int(draw.textlength(text, font=font)) + 4 for text in header])
    cell_h, head_h, pad = h * zoom, 14, 2
    canvas = Image.new("RGB", (label_w + cols * (cell_w + pad), head_h + len(tiles) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(header):
        draw.text((label_w + j * (cell_w + pad), 1), text, fill="black", font=font)
    for i, (label, images) in enumerate(tiles):
        top = head_h + i * (cell_h + pad)
        draw.text((2, top + cell_h // 2 - 6), label, fill="black", font=font)
        for j in range(images.shape[0]):
            arr = (images[j] * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert("RGB")
            canvas.paste(tile.resize((w * zoom, cell_h), Image.NEAREST), (label_w + j * (cell_w + pad), top))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def run(cfg: ExperimentConfig, out: Optional[str] = None) -> int:
    """CLI entry (``bafm edit --config X [--out DIR] [overrides]``).

    Returns:
        0 on success, 2 on bad input (message on stderr, nothing sampled or written).
    """
    try:
        run_edit(cfg, out, print_table=True)
    except EditInputError as err:
        print(f"bafm edit: {err}", file=sys.stderr)
        return 2
    return 0
