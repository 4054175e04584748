"""The embedded default dataset: scikit-learn's bundled 8x8 digits, as 16x16 pixel "latents".

``sklearn.datasets.load_digits`` ships with scikit-learn (1797 grey images, values 0..16, 10
classes), so nothing is downloaded. Images are scaled to ``[-1, 1]`` and upsampled bilinearly
(antialias off, ``align_corners=False``) to ``data.digits_size``. The "VAE" is the identity:
moments are ``(pixels, 0)`` and the scaling factor is 1. Flipped moments are not written:
a mirrored digit is not a digit of the same class (2, 3, 4, 5, 7 and 9 change shape).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from bafm.data.manifest import DataSettingsError, read_manifest
from bafm.data.shard_job import MomentBatch, SplitJob, write_split

NUM_DIGITS = 1797
NUM_CLASSES = 10
SPLITS = ("train", "val")


def digits_pixels(size: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as images.

    Args:
        size: output side; 8 keeps the original resolution.

    Returns:
        ``(images, labels)``: float32 ``(1797, 1, size, size)`` in ``[-1, 1]`` and int64 ``(1797,)``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return images.contiguous(), torch.from_numpy(digits.target.astype(np.int64))


def digits_split_indices(seed: int, val_fraction: float) -> Dict[str, np.ndarray]:
    """Fixed train/val partition of the 1797 digits.

    Args:
        seed: the experiment seed; the same seed always gives the same partition.
        val_fraction: share held out for ``val``, in ``(0, 1)``.

    Returns:
        ``{"train": idx, "val": idx}``, sorted int64 indices into ``load_digits()``, disjoint and
        covering ``0..1796``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction is {val_fraction}, expected a value in (0, 1).")
    perm = np.random.default_rng(seed).permutation(NUM_DIGITS)
    n_val = int(round(NUM_DIGITS * val_fraction))
    return {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val])}


def load_digits_images(split: str, *, size: int, seed: int, val_fraction: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One split of the digits, straight from scikit-learn (for training small models and
    reference statistics); the shards hold the same values rounded to float16.

    Args:
        split: ``"train"`` or ``"val"``.
        size: image side (``data.digits_size``).
        seed: the experiment seed, which fixes the partition.
        val_fraction: share held out for ``val`` (``data.val_fraction``).

    Returns:
        ``(images, labels)``: float32 ``(N, 1, S, S)`` in ``[-1, 1]`` and int64 ``(N,)``.
    """
    if split not in SPLITS:
        raise ValueError(f"digits split '{split}' unknown, expected one of {SPLITS}.")
    images, labels = digits_pixels(int(size))
    idx = torch.from_numpy(digits_split_indices(int(seed), float(val_fraction))[split])
    return images[idx], labels[idx]


def digits_options(data: Any, seed: int) -> Dict[str, Any]:
    """``load_digits_images``'s keyword arguments from a ``data`` config section and the experiment's seed."""
    return dict(size=int(data.digits_size), seed=int(seed), val_fraction=float(data.val_fraction))


def digits_settings(data: Any, seed: int) -> Dict[str, Any]:
    """Everything that determines the digits shards' content (recorded in the manifest)."""
    return {
        "source": "digits", "size": int(data.digits_size), "resize": "bilinear, antialias off, align_corners=False",
        "range": [-1.0, 1.0], "seed": int(seed), "val_fraction": float(data.val_fraction),
    }


def prepare_digits(data: Any, seed: int, folder: Path, rank: int = 0, world_size: int = 1,
                   barrier: bool = False, progress: bool = True) -> Optional[Dict[str, Any]]:
    """Write the embedded default's ``train`` and ``val`` shards (identity codec, no flips).

    Args:
        data: the ``data`` config section (``digits_size``, ``val_fraction``, ``dataset``,
            ``samples_per_shard``).
        seed: the experiment's seed (it fixes the train/val split).
        folder: where the shards go.

    Returns:
        The manifest if this process wrote it last, else None.
    """
    images, labels = digits_pixels(int(data.digits_size))
    moments = torch.cat([images, torch.zeros_like(images)], dim=1).numpy().astype(np.float16)  # (N, 2, S, S)
    common = {
        "dataset": str(data.dataset), "source": "digits", "encoder": {"kind": "identity"},
        "scaling_factor": 1.0, "dtype": "float16", "moments_shape": list(moments.shape[1:]),
        "latent_shape": [moments.shape[1] // 2, *moments.shape[2:]], "has_flip": False,
        "num_classes": NUM_CLASSES, "class_names": [str(c) for c in range(NUM_CLASSES)],
        "preprocessing": digits_settings(data, seed),
    }
    manifest = None
    for split, idx in digits_split_indices(int(seed), float(data.val_fraction)).items():
        job = SplitJob(Path(folder), split, [f"{i:04d}" for i in idx], labels[idx].tolist(),
                       int(data.samples_per_shard), common)

        def encode(indices: Sequence[int], idx: np.ndarray = idx) -> Iterator[MomentBatch]:
            for start in range(0, len(indices), 256):
                chunk = np.asarray(indices[start : start + 256], dtype=np.int64)
                yield chunk, moments[idx[chunk]], None

        manifest = write_split(job, encode, rank, world_size, barrier, progress) or manifest
    return manifest


# digits_settings() key -> the config key that sets it.
_SETTING_KEYS = {"seed": "seed", "val_fraction": "data.val_fraction", "size": "data.digits_size"}


def check_digits_settings(folder: Path, manifest: Dict[str, Any], data: Any, seed: int) -> None:
    """Raise unless the digits shards in ``folder`` (if any) were written with these settings (``data`` section, seed).

    Raises:
        DataSettingsError: one line naming each differing key, its value in the shards and now.
    """
    written = manifest.get("preprocessing")
    if not manifest.get("splits") or not isinstance(written, dict):
        return
    wanted = digits_settings(data, seed)
    differ = [k for k in wanted if written.get(k) != wanted[k]]
    if not differ:
        return
    was = ", ".join(f"{_SETTING_KEYS.get(k, k)}={written.get(k)!r} (now {wanted[k]!r})" for k in differ)
    raise DataSettingsError(
        f"'{Path(folder).absolute()}' holds digits shards written with other settings: {was}; the seed fixes "
        f"the train/val split. Pass data.dataset=<new name> to write shards for these settings beside them, "
        f"or go back to the settings of the shards.")


def ensure_digits_shards(data: Any, seed: int) -> Path:
    """Write the digits shards to ``<data.root>/<data.dataset>`` unless they are already there.

    For ``data.source=digits`` this is what lets ``make train`` run on a fresh clone; it
    writes in one process whatever the distributed setting. For other sources it writes
    nothing (``LatentDataModule.setup`` reports missing shards).

    Args:
        data: the ``data`` config section.
        seed: the experiment's seed (it fixes the train/val split).

    Returns:
        The dataset folder.

    Raises:
        DataSettingsError: shards already in the folder were written with other settings (seed,
            ``data.val_fraction``, ``data.digits_size``), naming each and what to do.
    """
    folder = Path(data.root) / data.dataset
    if data.source != "digits":
        return folder
    try:
        manifest = read_manifest(folder)
    except (FileNotFoundError, ValueError):
        manifest = {}
    check_digits_settings(folder, manifest, data, seed)
    splits = manifest.get("splits", {})
    complete = (
        manifest.get("preprocessing") == digits_settings(data, seed)
        and all(s in splits for s in SPLITS)
        and all((folder / rec["name"]).is_file() for s in SPLITS for rec in splits[s].get("shards", []))
    )
    if complete:
        return folder
    prepare_digits(data, seed, folder, rank=0, world_size=1, progress=False)
    return folder
