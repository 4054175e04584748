"""``bafm edit``'s inputs: the grid of each point, every check that needs no model, and the images.

Inputs are digits from the val split (``edit.indices``, embedded default) or the images of a
folder (``edit.image_dir``, encoded with the experiment's VAE). Every input is checked before
anything is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from bafm.config import ExperimentConfig, missing_backbone, sidenet_path
from bafm.data.images import IMAGE_EXTENSIONS
from bafm.data.manifest import latent_scaling_factor
from bafm.editing.plan import REFERENCE, EditInputError, EditPoint
from bafm.sampling import latent_shape
from bafm.solvers import is_adaptive, uses_side_fn
from bafm.solvers.ground_truth import Reference
from bafm.solvers.grids import GridSpec

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


def point_grids(cfg: ExperimentConfig, points: Sequence[EditPoint]) -> Dict[EditPoint, GridSpec]:
    """The grid of every point: ``sampling.grid`` by name, or the point's stored grid when it is ``optimized``.

    The reference row gets the reference's own grid (``Reference.grid``, the sweep's); other adaptive
    solvers choose their own steps and keep the named grid (unused). An inversion runs its generation
    grid backwards, so one optimized grid serves both directions.

    Raises:
        EditInputError: the grid file is missing or malformed, or lacks a (solver, NFE) of ``points``.
    """
    from bafm.experiment import grids_in_use

    reference, table = Reference.from_eval(cfg.eval), grids_in_use(cfg, EditInputError)
    grids: Dict[EditPoint, GridSpec] = {}
    for point in points:
        if point.solver == REFERENCE:
            grids[point] = reference.grid()
        elif table is None or is_adaptive(point.solver):
            grids[point] = str(cfg.sampling.grid) if table is None else "uniform"
        else:
            try:
                grids[point] = table.grid(point.solver, point.nfe)
            except ValueError as err:
                raise EditInputError(str(err)) from None
    return grids


def check_inputs(cfg: ExperimentConfig, points: Sequence[EditPoint]) -> None:
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
    if missing_backbone(cfg):
        raise EditInputError(missing_backbone(cfg))
    side = sidenet_path(cfg)
    for name in dict.fromkeys(point.solver for point in points):
        if uses_side_fn(name) and not side.is_file():
            raise EditInputError(
                f"solver '{name}' needs a trained SideNet, none found at '{side}' (sidenet.path, else "
                f"<runs_dir>/<name>/sidenet.safetensors, else <checkpoints_dir>/<name>/sidenet.safetensors). "
                f"`make train` exports one; or point "
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
    from bafm.data.digits import digits_options, load_digits_images

    images, labels = load_digits_images("val", **digits_options(cfg.data, cfg.seed))
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
