"""Reference data for the sweep's metrics: statistics and features, computed, cached, loaded, saved.

What is kept (``ReferenceStats``): ``mu``/``sigma`` of the extractor's features (FID),
``mu_s``/``sigma_s`` of its spatial features (sFID; Inception only) and ``prc_features``, the
real feature vectors precision/recall compare with: all reference images up to
``eval.prc_reference_size`` (default 10000, as ADM's reference batches), else a fixed random
subset of that size (seed ``PRC_SUBSET_SEED``); 0 turns precision/recall off.

Sources, by ``eval.reference_stats``:

- empty, digits classifier: all real digits (train + val) through the classifier, cached in
  ``<data.root>/<data.dataset>/reference_stats.npz`` and recomputed when the classifier changes
  (or a cached file lacks a key now needed, e.g. one written before precision/recall);
- an ``.npz`` with ``mu`` and ``sigma`` (ADM's ``VIRTUAL_imagenet256_labeled.npz`` or a file
  written here): its statistics (and ``mu_s``/``sigma_s``, ``prc_features``) used as is; when it
  lacks ``prc_features`` but holds ``arr_0`` images (ADM's files do), those are computed from
  the images once and cached like the digits;
- an ``.npz`` with only ``arr_0`` (uint8 images ``(N, H, W, C)``, the ADM sample format) or a
  folder of images: everything computed once, cached like the digits.
"""

from __future__ import annotations

import contextlib
import io
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List

import numpy as np
import torch

from bafm.eval.features import FeatureExtractor
from bafm.eval.metrics import FeatureStats, ReferenceStats, feature_statistics
from bafm.io import atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE_NAME = "reference_stats.npz"
PRC_SUBSET_SEED = 0  # the precision/recall subset of a large reference set is fixed by this seed


class ReferenceStatsError(ValueError):
    """A reference statistics or images ``.npz`` that cannot be used (one line naming the file)."""


@contextlib.contextmanager
def _open_npz(path: str | Path) -> Iterator[Any]:
    """``np.load(path)`` without pickles; every way the file can fail becomes ``ReferenceStatsError``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            yield data
    except ReferenceStatsError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "pickle" in text.lower() or "object arrays" in text.lower():
            raise ReferenceStatsError(
                f"{Path(path).absolute()}: holds pickled Python objects, which bafm never loads (unpickling can run "
                "code); save plain arrays instead, e.g. np.savez(path, mu=mu, sigma=sigma)") from None
        raise ReferenceStatsError(f"{Path(path).absolute()}: not a usable .npz ({text})") from None


def save_stats(
    path: str | Path,
    stats: FeatureStats | ReferenceStats,
    *,
    extractor: str,
    source: str = "",
    prc_size: int = 0,
) -> Path:
    """Write ``mu``, ``sigma``, ``n``, provenance and what else ``stats`` holds to an ``.npz``, atomically.

    Args:
        path: destination ``.npz``.
        stats: pool statistics, or a ``ReferenceStats`` (adds ``mu_s``/``sigma_s`` and
            ``prc_features`` when present).
        extractor: feature-space name (``FeatureExtractor.name``).
        source: what the statistics were computed from.
        prc_size: the ``eval.prc_reference_size`` the features were selected for.

    Returns:
        ``path``.
    """
    ref = stats if isinstance(stats, ReferenceStats) else ReferenceStats(pool=stats)
    arrays: Dict[str, Any] = dict(mu=ref.pool.mu, sigma=ref.pool.sigma, n=np.int64(ref.pool.n),
                                  extractor=np.str_(extractor), source=np.str_(source))
    if ref.spatial is not None:
        arrays.update(mu_s=ref.spatial.mu, sigma_s=ref.spatial.sigma)
    if ref.features is not None:
        arrays.update(prc_features=ref.features.cpu().float().numpy(), prc_size=np.int64(prc_size))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_stats(path: str | Path) -> tuple[FeatureStats, dict[str, str]]:
    """Read statistics from an ``.npz`` with ``mu`` and ``sigma`` (ADM or bafm files).

    Args:
        path: the file.

    Returns:
        ``(stats, provenance)``; provenance has ``extractor`` and ``source`` ("" when absent,
        e.g. ADM files, whose statistics are Inception pool features).

    Raises:
        FileNotFoundError: no such file.
        ReferenceStatsError: keys missing, pickled arrays or not an ``.npz``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics '{path.absolute()}' not found.")
    with _open_npz(path) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ReferenceStatsError(f"{path}: no {' and '.join(missing)} array (found: {', '.join(data.files)}).")
        stats = FeatureStats(mu=data["mu"], sigma=data["sigma"], n=int(data["n"]) if "n" in data.files else 0)
        info = {k: str(data[k]) if k in data.files else "" for k in ("extractor", "source")}
    return stats, info


def load_reference(path: str | Path) -> tuple[ReferenceStats, dict[str, Any]]:
    """Everything a statistics ``.npz`` holds: ``mu``/``sigma``, and ``mu_s``/``sigma_s`` and
    ``prc_features`` where present.

    Args:
        path: the file (ADM's or one written by ``save_stats``).

    Returns:
        ``(reference, info)``; info has ``extractor`` and ``source`` (as ``load_stats``),
        ``prc_size`` (-1 when absent) and ``keys`` (the file's array names).
    """
    pool, info = load_stats(path)
    with _open_npz(path) as data:
        spatial = FeatureStats(data["mu_s"], data["sigma_s"], n=pool.n) if "mu_s" in data.files else None
        feats = torch.from_numpy(data["prc_features"].astype(np.float32)) if "prc_features" in data.files else None
        extra = {"prc_size": int(data["prc_size"]) if "prc_size" in data.files else -1, "keys": list(data.files)}
    try:
        ref = ReferenceStats(pool=pool, spatial=spatial, features=feats)
    except ValueError as err:
        raise ReferenceStatsError(f"{path}: {err}") from None
    return ref, {**info, **extra}


def npz_has_stats(path: str | Path) -> bool:
    """Whether an ``.npz`` holds ``mu`` and ``sigma`` (reads only the archive's index)."""
    with _open_npz(path) as data:
        return "mu" in data.files and "sigma" in data.files


def npz_has_images(path: str | Path) -> bool:
    """Whether an ``.npz`` holds ``arr_0`` images (reads only the archive's index)."""
    with _open_npz(path) as data:
        return "arr_0" in data.files


def iter_npz_images(path: str | Path, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of images from an ADM-style ``.npz`` (``arr_0``: uint8 ``(N, H, W, C)``).

    Yields:
        ``(B, C, H, W)`` float32 in ``[0, 1]``.
    """
    with _open_npz(path) as data:
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


def prc_subset(n: int, size: int, seed: int = PRC_SUBSET_SEED) -> torch.Tensor:
    """Indices of the precision/recall reference subset: all ``n`` if ``size >= n``, else a
    seeded random choice of ``size``, sorted.

    Returns:
        int64 ``(min(n, size),)``.
    """
    if size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


@torch.no_grad()
def compute_reference(
    batches: Iterable[torch.Tensor],
    extractor: FeatureExtractor,
    device: torch.device | str = "cpu",
    prc_size: int = 0,
) -> ReferenceStats:
    """Statistics (and precision/recall features) of the extractor's features over image batches.

    Args:
        batches: ``(B, C, H, W)`` images in ``[0, 1]``.
        extractor: feature extractor.
        device: where to run it.
        prc_size: keep at most this many feature vectors for precision/recall (``prc_subset``);
            0: none.

    Returns:
        Pool statistics over all images, spatial statistics when the extractor has spatial
        features, and the precision/recall features.
    """
    feats: List[torch.Tensor] = []
    spatial: List[torch.Tensor] = []
    for b in batches:
        out = extractor.extract(b.to(device))
        feats.append(out.features.float().cpu())
        if out.spatial is not None:
            spatial.append(out.spatial.float().cpu())
    all_feats = torch.cat(feats)
    subset = all_feats[prc_subset(all_feats.shape[0], prc_size)].clone() if prc_size > 0 else None
    return ReferenceStats(pool=feature_statistics(all_feats),
                          spatial=feature_statistics(torch.cat(spatial)) if spatial else None, features=subset)


def compute_stats(
    batches: Iterable[torch.Tensor], extractor: FeatureExtractor, device: torch.device | str = "cpu"
) -> FeatureStats:
    """Pool statistics of the extractor's features over image batches (see ``compute_reference``)."""
    return compute_reference(batches, extractor, device).pool


def digits_images01(data: Any, seed: int) -> torch.Tensor:
    """All real digits (train + val) in ``[0, 1]``, ``(N, 1, H, W)`` (``data`` section, experiment seed)."""
    from bafm.data.digits import digits_options, load_digits_images

    parts = [load_digits_images(split, **digits_options(data, seed))[0] for split in ("train", "val")]
    return (torch.cat(parts).float() + 1.0) / 2.0


def cache_path(data: Any) -> Path:
    """``<data.root>/<data.dataset>/reference_stats.npz`` of a ``data`` config section."""
    return Path(data.root) / str(data.dataset) / CACHE_NAME


def _source_of(evaluation: Any, data: Any) -> str:
    """Describes where the reference images come from (cache key together with the extractor)."""
    return str(evaluation.reference_stats) if evaluation.reference_stats else f"digits:{data.root}/{data.dataset}"


def check_reference_source(evaluation: Any, data: Any) -> None:
    """Fail fast when the configured reference is missing (before any sampling).

    Args:
        evaluation: the ``eval`` config section (``reference_stats``, ``feature_extractor``).
        data: the ``data`` config section (``source``).

    Raises:
        FileNotFoundError: ``eval.reference_stats`` set but absent, or empty with Inception
            features (ImageNet needs a reference batch).
    """
    ref = str(evaluation.reference_stats)
    if ref:
        if not Path(ref).exists():
            raise FileNotFoundError(
                f"eval.reference_stats: '{ref}' not found. Expected an .npz with 'mu'/'sigma' (e.g. ADM's "
                "VIRTUAL_imagenet256_labeled.npz), an .npz with 'arr_0' images, or a folder of images."
            )
    elif evaluation.feature_extractor != "classifier" or data.source != "digits":
        raise FileNotFoundError(
            "eval.reference_stats is empty: set it to an .npz with 'mu'/'sigma' (e.g. ADM's "
            "VIRTUAL_imagenet256_labeled.npz), an .npz with 'arr_0' images, or a folder of real images."
        )


def _image_batches(evaluation: Any, data: Any, seed: int, batch_size: int) -> Iterable[torch.Tensor]:
    """The reference images (digits, a folder or an ``arr_0`` ``.npz``) in batches."""
    ref = str(evaluation.reference_stats)
    if not ref:
        return digits_images01(data, seed).split(batch_size)
    if Path(ref).is_dir():
        return iter_folder_images(ref, batch_size)
    return iter_npz_images(ref, batch_size)


def _cached_or_computed(
    evaluation: Any, data: Any, seed: int, extractor: FeatureExtractor, device: torch.device | str, batch_size: int,
    prc_size: int,
) -> ReferenceStats:
    """The reference computed from the configured images, from the cache when it is still valid."""
    cached, source = cache_path(data), _source_of(evaluation, data)
    if cached.is_file():
        try:
            old, info = load_reference(cached)
        except Exception as err:  # a cache is disposable: any damage means "recompute"
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            warnings.warn(f"{cached}: unreadable cached reference statistics ({reason}); recomputing",
                          stacklevel=2)
        else:
            valid = (info["extractor"] == extractor.name and info["source"] == source
                     and (old.spatial is not None or extractor.spatial_dim == 0)
                     and (prc_size == 0 or (old.features is not None and info["prc_size"] == prc_size)))
            if valid:  # a file written before a key was needed is recomputed
                return old if prc_size > 0 else ReferenceStats(pool=old.pool, spatial=old.spatial)
    fresh = compute_reference(_image_batches(evaluation, data, seed, batch_size), extractor, device,
                              prc_size=prc_size)
    save_stats(cached, fresh, extractor=extractor.name, source=source, prc_size=prc_size)
    return fresh


def resolve_reference_stats(
    evaluation: Any, data: Any, extractor: FeatureExtractor, device: torch.device | str = "cpu",
    batch_size: int = 256, *, seed: int = 0,
) -> ReferenceStats:
    """Reference statistics and features in ``extractor``'s feature space (see the module docstring).

    Args:
        evaluation: the ``eval`` config section (``reference_stats``, ``prc_reference_size``,
            ``feature_extractor``).
        data: the ``data`` config section (the digits and the cache folder).
        extractor: the sweep's feature extractor.
        device: where to compute features when needed.
        batch_size: feature-extraction batch size.
        seed: the experiment's seed (it fixes the digits' train/val split).

    Returns:
        The reference: ``spatial`` only for extractors with spatial features, ``features`` None
        when precision/recall are off or the statistics file has neither features nor images.

    Raises:
        FileNotFoundError: see ``check_reference_source``.
        ReferenceStatsError: statistics in another feature space than ``extractor``'s, or a negative
            ``eval.prc_reference_size``.
    """
    check_reference_source(evaluation, data)
    ref = str(evaluation.reference_stats)
    prc_size = int(evaluation.prc_reference_size)
    if prc_size < 0:
        raise ReferenceStatsError(f"eval.prc_reference_size is {prc_size}, expected 0 (off) or a positive number of images.")
    if ref and Path(ref).is_file() and npz_has_stats(ref):
        given, info = load_reference(ref)
        if info["extractor"] and info["extractor"] != extractor.name:
            raise ReferenceStatsError(f"{ref}: statistics were computed with '{info['extractor']}', "
                             f"the sweep uses '{extractor.name}'.")
        features = given.features if prc_size > 0 else None
        if prc_size > 0 and features is None:
            if npz_has_images(ref):
                features = _cached_or_computed(evaluation, data, seed, extractor, device, batch_size, prc_size).features
            else:
                warnings.warn(f"eval.reference_stats '{ref}' has neither 'prc_features' nor 'arr_0' images: "
                              "precision and recall are left blank.", stacklevel=2)
        reference = ReferenceStats(pool=given.pool, spatial=given.spatial if extractor.spatial_dim else None,
                                   features=features)
    else:
        reference = _cached_or_computed(evaluation, data, seed, extractor, device, batch_size, prc_size)
    if reference.dim != extractor.feature_dim:
        raise ReferenceStatsError(
            f"reference statistics have dimension {reference.dim}, the '{extractor.name}' features "
            f"{extractor.feature_dim}: reference and feature extractor do not match."
        )
    if reference.spatial is not None and reference.spatial.dim != extractor.spatial_dim:
        raise ReferenceStatsError(
            f"reference spatial statistics (mu_s, sigma_s) have dimension {reference.spatial.dim}, the "
            f"'{extractor.name}' spatial features {extractor.spatial_dim}: reference and feature extractor do not match."
        )
    return reference
