"""``bafm data``: images -> posterior moments -> WebDataset shards, resumable and distributed.

A split of ``N`` samples in a fixed order becomes ``K = ceil(N / data.samples_per_shard)``
shards; shard ``i`` holds samples ``[i * N // K, (i + 1) * N // K)`` and is written by rank
``i % world_size``, so
ranks never write the same file and the result does not depend on the number of ranks. A
restarted job skips shards that exist (they only appear complete, by rename) and clears its
own stale temporary files. The manifest is written once every shard of the split is there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from bafm.data.shards import (
    RECORDS_DIR,
    ShardWriter,
    remove_stale_temps,
    shard_name,
    shard_record,
    update_manifest,
)
from bafm.io import atomic_write_json

log = logging.getLogger(__name__)

# (sample indices (B,), moments (B, 2C, H, W) float16, flipped moments or None)
MomentBatch = Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]


@dataclass
class SplitJob:
    """What to write for one split.

    Attributes:
        folder: dataset folder (shards, manifest).
        split: split name, the shard file prefix.
        keys: sample keys in order (no dots).
        labels: class id per sample.
        samples_per_shard: most samples per shard (sizes are balanced, see ``shard_range``).
        common: dataset-wide manifest fields; together with keys and labels they must match
            any earlier, unfinished run that left shards in ``folder``.
    """

    folder: Path
    split: str
    keys: List[str]
    labels: List[int]
    samples_per_shard: int
    common: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return -(-len(self.keys) // self.samples_per_shard)

    def shard_range(self, index: int) -> range:
        """Sample indices held by shard ``index``: ``[i * N // K, (i + 1) * N // K)``.

        Balanced sizes (they differ by at most one) keep shard resampling unbiased.
        """
        n, k = len(self.keys), self.num_shards
        return range(index * n // k, (index + 1) * n // k)


def dist_info() -> Tuple[int, int, bool]:
    """``(rank, world_size, torch.distributed initialised)`` from torch.distributed or RANK/WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), True
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), False


def _check_plan(job: SplitJob) -> None:
    """Refuse to mix shards from runs with different settings or sample lists."""
    digest = hashlib.sha256(json.dumps([job.keys, job.labels]).encode()).hexdigest()
    plan = {"split": job.split, "num_samples": len(job.keys), "samples_per_shard": job.samples_per_shard,
            "samples_sha256": digest, "common": json.loads(json.dumps(job.common))}
    path = job.folder / RECORDS_DIR / f"{job.split}.plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            diff = sorted(k for k in set(old) | set(plan) if k != "common" and old.get(k) != plan.get(k))
            was, now = old.get("common", {}), plan["common"]
            diff += sorted(f"{k}" for k in set(was) | set(now) if was.get(k) != now.get(k))
            raise ValueError(
                f"'{job.folder}' already holds '{job.split}' shards written with other settings "
                f"(differs in: {', '.join(diff)}; see {path}). Delete that folder or choose another "
                f"data.dataset / --out."
            )
        return
    atomic_write_json(path, plan)


def write_split(
    job: SplitJob,
    encode: Callable[[Sequence[int]], Iterator[MomentBatch]],
    rank: int = 0,
    world_size: int = 1,
    barrier: bool = False,
    progress: bool = True,
) -> Optional[Dict[str, Any]]:
    """Write this rank's missing shards of a split, then the manifest if the split is complete.

    Args:
        job: the split.
        encode: ``encode(indices)`` yields ``(indices, moments, moments_flip)`` batches covering
            ``indices`` in order.
        rank: this process's rank.
        world_size: number of writing processes.
        barrier: wait for all ranks (torch.distributed) before the manifest; rank 0 writes it.
            Without a barrier, whichever rank finds the split complete writes it.
        progress: show a tqdm bar with images/s.

    Returns:
        The manifest if this process wrote it, else None.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size}).")
    if job.samples_per_shard < 1:
        raise ValueError(f"data.samples_per_shard is {job.samples_per_shard}, expected at least 1.")
    job.folder.mkdir(parents=True, exist_ok=True)
    _check_plan(job)
    records_dir = job.folder / RECORDS_DIR
    todo = [i for i in range(rank, job.num_shards, world_size) if not (job.folder / shard_name(job.split, i)).is_file()]
    remove_stale_temps(job.folder, [shard_name(job.split, i) for i in todo])
    skipped = len(range(rank, job.num_shards, world_size)) - len(todo)
    if skipped:
        log.info("%s: %d finished shard(s) of rank %d kept", job.split, skipped, rank)
    indices = [j for i in todo for j in job.shard_range(i)]
    bar = tqdm(total=len(indices), unit="img", desc=f"{job.split} [rank {rank}/{world_size}]",
               disable=not progress or not indices, file=sys.stderr, dynamic_ncols=True)
    writer: Optional[ShardWriter] = None
    pending = iter(todo)
    expected = iter(indices)
    try:
        for idx, moments, flips in encode(indices):
            for j, i in enumerate(idx.tolist()):
                if i != next(expected):
                    raise RuntimeError(f"encoder returned sample {i} out of order")
                if writer is None:
                    shard = next(pending)
                    writer, left = ShardWriter(job.folder / shard_name(job.split, shard)), len(job.shard_range(shard))
                writer.write(job.keys[i], moments[j], job.labels[i], None if flips is None else flips[j])
                left -= 1
                if left == 0:
                    writer.commit(records_dir)
                    writer = None
            bar.update(len(idx))
        if next(expected, None) is not None:
            raise RuntimeError(f"{job.split}: the encoder stopped before all samples of rank {rank} were written")
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
    if barrier:
        torch.distributed.barrier()
        if rank != 0:
            return None
    names = [shard_name(job.split, i) for i in range(job.num_shards)]
    if not all((job.folder / n).is_file() for n in names):
        log.info("%s: rank %d done; the manifest is written by the last rank to finish", job.split, rank)
        return None
    records = [shard_record(job.folder, n) for n in names]
    counts = np.bincount(np.asarray(job.labels, dtype=np.int64), minlength=int(job.common["num_classes"]))
    entry = {
        "count": len(job.keys), "num_shards": job.num_shards, "samples_per_shard": job.samples_per_shard,
        "pattern": f"{job.split}-{{000000..{job.num_shards - 1:06d}}}.tar",
        "class_counts": counts.tolist(), "shards": [asdict(r) for r in records],
    }
    if sum(r.count for r in records) != len(job.keys):
        raise RuntimeError(f"{job.folder}: '{job.split}' shards hold {sum(r.count for r in records)} samples, expected {len(job.keys)}")
    return update_manifest(job.folder, job.common, job.split, entry)


# ----------------------------------------------------------------------------- digits


def prepare_digits(cfg: Any, folder: Path, rank: int = 0, world_size: int = 1,
                   barrier: bool = False, progress: bool = True) -> Optional[Dict[str, Any]]:
    """Write the embedded default's ``train`` and ``val`` shards (identity codec, no flips).

    Returns:
        The manifest if this process wrote it last, else None.
    """
    from bafm.data.digits import NUM_CLASSES, digits_pixels, digits_settings, digits_split_indices

    images, labels = digits_pixels(int(cfg.data.digits_size))
    moments = torch.cat([images, torch.zeros_like(images)], dim=1).numpy().astype(np.float16)  # (N, 2, S, S)
    common = {
        "dataset": str(cfg.data.dataset), "source": "digits", "encoder": {"kind": "identity"},
        "scaling_factor": 1.0, "dtype": "float16", "moments_shape": list(moments.shape[1:]),
        "latent_shape": [moments.shape[1] // 2, *moments.shape[2:]], "has_flip": False,
        "num_classes": NUM_CLASSES, "class_names": [str(c) for c in range(NUM_CLASSES)],
        "preprocessing": digits_settings(cfg),
    }
    manifest = None
    for split, idx in digits_split_indices(int(cfg.seed), float(cfg.data.val_fraction)).items():
        job = SplitJob(Path(folder), split, [f"{i:04d}" for i in idx], labels[idx].tolist(),
                       int(cfg.data.samples_per_shard), common)

        def encode(indices: Sequence[int], idx: np.ndarray = idx) -> Iterator[MomentBatch]:
            for start in range(0, len(indices), 256):
                chunk = np.asarray(indices[start : start + 256], dtype=np.int64)
                yield chunk, moments[idx[chunk]], None

        manifest = write_split(job, encode, rank, world_size, barrier, progress) or manifest
    return manifest


# ----------------------------------------------------------------------------- image folders


def prepare_folder(cfg: Any, folder: Path, rank: int, world_size: int, barrier: bool,
                   progress: bool = True) -> Optional[Dict[str, Any]]:
    """Encode an ImageNet-style folder into ``data.split`` shards with an ``AutoencoderKL``.

    Each batch is encoded together with its horizontal flip (one VAE call on ``2B`` images);
    moments are stored as float16 mean and std. Uses ``cuda:LOCAL_RANK`` when CUDA is there.

    Returns:
        The manifest if this process wrote it, else None.
    """
    from torch.utils.data import DataLoader, Subset

    from bafm.data.images import ImageFolderDataset, list_images
    from bafm.data.vae import load_autoencoder

    d = cfg.data
    images = list_images(d.image_dir, d.list_file)
    codec = load_autoencoder(d.vae_path)
    if d.resolution % codec.downsample:
        raise ValueError(f"data.resolution={d.resolution} is not a multiple of the VAE's downsampling {codec.downsample}.")
    if abs(codec.vae.config.scaling_factor - d.vae_scaling_factor) > 1e-9:
        log.warning("data.vae_scaling_factor=%g differs from the VAE config's %g; the manifest records %g",
                    d.vae_scaling_factor, codec.vae.config.scaling_factor, d.vae_scaling_factor)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    codec.to(device)
    size = d.resolution // codec.downsample
    common = {
        "dataset": str(d.dataset), "source": "folder", "encoder": codec.describe(),
        "scaling_factor": float(d.vae_scaling_factor), "dtype": "float16",
        "moments_shape": [2 * codec.latent_channels, size, size], "latent_shape": [codec.latent_channels, size, size],
        "has_flip": True, "num_classes": len(images.class_names), "class_names": images.class_names,
        "preprocessing": {"source": "folder", "image_dir": str(Path(d.image_dir).resolve()),
                          "list_file": str(Path(d.list_file).resolve()) if d.list_file else "",
                          "resolution": int(d.resolution), "crop": "adm_center_crop (BOX halving, BICUBIC, center crop)",
                          "range": [-1.0, 1.0], "flip": "horizontal"},
    }
    job = SplitJob(Path(folder), str(d.split), [f"{i:08d}" for i in range(len(images))], list(images.labels),
                   int(d.samples_per_shard), common)
    dataset = ImageFolderDataset(images, int(d.resolution))

    def encode(indices: Sequence[int]) -> Iterator[MomentBatch]:
        loader = DataLoader(Subset(dataset, list(indices)), batch_size=int(d.encode_batch_size),
                            num_workers=int(d.num_workers), pin_memory=device.type == "cuda")
        for x, _, idx in loader:
            x = x.to(device, non_blocking=True)
            mean, std = codec.encode_moments(torch.cat([x, x.flip(-1)]))
            moments = torch.cat([mean, std], dim=1).half().cpu().numpy()  # (2B, 2C, h, w)
            yield idx.numpy(), moments[: len(x)], moments[len(x) :]

    return write_split(job, encode, rank, world_size, barrier, progress)


def run(cfg: Any, out: Optional[str] = None) -> int:
    """``bafm data``: write the shards of ``cfg`` to ``out`` or ``<data.root>/<data.dataset>``.

    Returns:
        0 on success, 1 with a message on stderr for bad input (missing folders or weights).
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = Path(out) if out else Path(cfg.data.root) / cfg.data.dataset
    rank, world_size, initialised = dist_info()
    try:
        if cfg.data.source == "digits":
            manifest = prepare_digits(cfg, folder, rank, world_size, initialised)
        else:
            manifest = prepare_folder(cfg, folder, rank, world_size, initialised)
    except (FileNotFoundError, ValueError) as err:
        print(f"bafm data: error: {err}", file=sys.stderr)
        return 1
    if manifest is not None:
        counts = ", ".join(f"{s}: {e['count']} samples in {e['num_shards']} shard(s)" for s, e in manifest["splits"].items())
        print(f"wrote {folder} ({counts}); latent shape {manifest['latent_shape']}, scaling factor {manifest['scaling_factor']}")
    return 0
