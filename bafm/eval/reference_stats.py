"""Reference feature statistics (``mu``, ``sigma``) for FID: compute, cache, load, save.

Sources, by ``eval.reference_stats``:

- empty, digits classifier: all real digits (train + val) through the classifier, cached in
  ``<data.root>/<data.dataset>/reference_stats.npz`` and recomputed when the classifier changes;
- an ``.npz`` with ``mu`` and ``sigma`` (ADM's ``VIRTUAL_imagenet256_labeled.npz`` or a file
  written here): used as is;
- an ``.npz`` with only ``arr_0`` (uint8 images ``(N, H, W, C)``, the ADM sample format) or a
  folder of images: features computed once, cached like the digits.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from bafm.eval.features import FeatureExtractor
from bafm.eval.metrics import FeatureStats, feature_statistics
from bafm.io import atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE_NAME = "reference_stats.npz"


def save_stats(path: str | Path, stats: FeatureStats, *, extractor: str, source: str = "") -> Path:
    """Write ``mu``, ``sigma``, ``n`` and provenance to an ``.npz``, atomically.

    Args:
        path: destination ``.npz``.
        stats: the statistics.
        extractor: feature-space name (``FeatureExtractor.name``).
        source: what the statistics were computed from.

    Returns:
        ``path``.
    """
    path = Path(path)
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n),
             extractor=np.str_(extractor), source=np.str_(source))
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_stats(path: str | Path) -> tuple[FeatureStats, dict[str, str]]:
    """Read statistics from an ``.npz`` with ``mu`` and ``sigma`` (ADM or bafm files).

    Args:
        path: the file.

    Returns:
        ``(stats, provenance)``; provenance has ``extractor`` and ``source`` ("" when absent,
        e.g. ADM files, whose statistics are Inception pool features).

    Raises:
        FileNotFoundError: no such file.
        ValueError: keys missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics '{path}' not found.")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"{path}: no {' and '.join(missing)} array (found: {', '.join(data.files)}).")
        stats = FeatureStats(mu=data["mu"], sigma=data["sigma"], n=int(data["n"]) if "n" in data.files else 0)
        info = {k: str(data[k]) if k in data.files else "" for k in ("extractor", "source")}
    return stats, info


def npz_has_stats(path: str | Path) -> bool:
    """Whether an ``.npz`` holds ``mu`` and ``sigma`` (reads only the archive's index)."""
    with np.load(path, allow_pickle=False) as data:
        return "mu" in data.files and "sigma" in data.files


def iter_npz_images(path: str | Path, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of images from an ADM-style ``.npz`` (``arr_0``: uint8 ``(N, H, W, C)``).

    Yields:
        ``(B, C, H, W)`` float32 in ``[0, 1]``.
    """
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path}: expected 'mu'/'sigma' statistics or 'arr_0' images, found {data.files}.")
        arr = data["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"{path}: 'arr_0' must be uint8 (N, H, W, C), got {arr.dtype} {arr.shape}.")
    for i in range(0, arr.shape[0], batch_size):
        yield torch.from_numpy(arr[i : i + batch_size]).permute(0, 3, 1, 2).float() / 255.0


def iter_folder_images(folder: str | Path, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of the images under a folder (recursive, sorted; all of one size).

    Yields:
        ``(B, C, H, W)`` float32 in ``[0, 1]`` (RGB, or one channel for greyscale files).
    """
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"reference folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    for i in range(0, len(files), batch_size):
        batch = []
        for f in files[i : i + batch_size]:
            with Image.open(f) as img:
                arr = np.asarray(img.convert("L" if img.mode in ("L", "I", "1") else "RGB"))
            batch.append(torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], -1))
        shapes = {tuple(b.shape) for b in batch}
        if len(shapes) > 1:
            raise ValueError(f"reference folder '{folder}': images of different sizes {sorted(shapes)}.")
        yield torch.stack(batch).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def compute_stats(
    batches: Iterable[torch.Tensor], extractor: FeatureExtractor, device: torch.device | str = "cpu"
) -> FeatureStats:
    """Statistics of the extractor's features over image batches.

    Args:
        batches: ``(B, C, H, W)`` images in ``[0, 1]``.
        extractor: feature extractor.
        device: where to run it.

    Returns:
        ``FeatureStats`` over all images.
    """
    feats = [extractor(b.to(device))[0].cpu() for b in batches]
    return feature_statistics(torch.cat(feats))


def digits_images01(cfg: Any) -> torch.Tensor:
    """All real digits (train + val) in ``[0, 1]``, ``(N, 1, H, W)``."""
    from bafm.data.digits import load_digits_images

    parts = [load_digits_images(split, cfg)[0] for split in ("train", "val")]
    return (torch.cat(parts).float() + 1.0) / 2.0


def cache_path(cfg: Any) -> Path:
    """``<data.root>/<data.dataset>/reference_stats.npz``."""
    return Path(cfg.data.root) / str(cfg.data.dataset) / CACHE_NAME


def _source_of(cfg: Any) -> str:
    """Describes where the reference images come from (cache key together with the extractor)."""
    return str(cfg.eval.reference_stats) if cfg.eval.reference_stats else f"digits:{cfg.data.root}/{cfg.data.dataset}"


def check_reference_source(cfg: Any) -> None:
    """Fail fast when the configured reference is missing (before any sampling).

    Raises:
        FileNotFoundError: ``eval.reference_stats`` set but absent, or empty with Inception
            features (ImageNet needs a reference batch).
    """
    ref = str(cfg.eval.reference_stats)
    if ref:
        if not Path(ref).exists():
            raise FileNotFoundError(
                f"eval.reference_stats: '{ref}' not found. Expected an .npz with 'mu'/'sigma' (e.g. ADM's "
                "VIRTUAL_imagenet256_labeled.npz), an .npz with 'arr_0' images, or a folder of images."
            )
    elif cfg.eval.feature_extractor != "classifier" or cfg.data.source != "digits":
        raise FileNotFoundError(
            "eval.reference_stats is empty: set it to an .npz with 'mu'/'sigma' (e.g. ADM's "
            "VIRTUAL_imagenet256_labeled.npz), an .npz with 'arr_0' images, or a folder of real images."
        )


def resolve_reference_stats(
    cfg: Any, extractor: FeatureExtractor, device: torch.device | str = "cpu", batch_size: int = 256
) -> FeatureStats:
    """Reference statistics for ``cfg`` in ``extractor``'s feature space (see the module docstring).

    Args:
        cfg: experiment config (``eval.reference_stats``, ``data.*``).
        extractor: the sweep's feature extractor.
        device: where to compute features when needed.
        batch_size: feature-extraction batch size.

    Returns:
        The statistics.

    Raises:
        FileNotFoundError: see ``check_reference_source``.
        ValueError: statistics in another feature space than ``extractor``'s.
    """
    check_reference_source(cfg)
    ref = str(cfg.eval.reference_stats)
    if ref and Path(ref).is_file() and npz_has_stats(ref):
        stats, info = load_stats(ref)
        if info["extractor"] and info["extractor"] != extractor.name:
            raise ValueError(f"{ref}: statistics were computed with '{info['extractor']}', "
                             f"the sweep uses '{extractor.name}'.")
    else:
        cached = cache_path(cfg)
        source = _source_of(cfg)
        stats = None
        if cached.is_file():
            old, info = load_stats(cached)
            if info["extractor"] == extractor.name and info["source"] == source:
                stats = old
        if stats is None:
            if not ref:
                images = digits_images01(cfg)
                batches: Iterable[torch.Tensor] = images.split(batch_size)
            elif Path(ref).is_dir():
                batches = iter_folder_images(ref, batch_size)
            else:
                batches = iter_npz_images(ref, batch_size)
            stats = compute_stats(batches, extractor, device)
            save_stats(cached, stats, extractor=extractor.name, source=source)
    if stats.dim != extractor.feature_dim:
        raise ValueError(
            f"reference statistics have dimension {stats.dim}, the '{extractor.name}' features "
            f"{extractor.feature_dim}: reference and feature extractor do not match."
        )
    return stats
