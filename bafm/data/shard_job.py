"""Writing one split as shards, resumable and distributed.

A split of ``N`` samples in a fixed order becomes ``K = ceil(N / data.samples_per_shard)``
shards; shard ``i`` holds samples ``[i * N // K, (i + 1) * N // K)`` and is written by rank
``i % world_size``, so
ranks never write the same file and the result does not depend on the number of ranks. A
restarted job checks every shard that exists against its record (size and sha256) and keeps it
only if both match, rewrites the missing and damaged ones and clears its own stale temporary
files, holding a lock per (split, rank) so that two runs on one folder take turns instead of
breaking each other. The manifest is written from the records once every shard is there.
"""

from __future__ import annotations

import contextlib
import fcntl
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

from bafm.data.manifest import RECORDS_DIR, DataSettingsError, shard_name, update_manifest
from bafm.data.shard_writer import ShardWriter, remove_stale_temps, sha256_file, shard_record
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
            raise DataSettingsError(
                f"'{job.folder.absolute()}' already holds '{job.split}' shards written with other settings "
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
    with writer_lock(job.folder, job.split, rank):
        _write_own_shards(job, encode, rank, world_size, progress)
    if barrier:
        torch.distributed.barrier()
        if rank != 0:
            return None
    return _write_manifest_if_complete(job, rank)


@contextlib.contextmanager
def writer_lock(folder: Path, split: str, rank: int) -> Iterator[None]:
    """Exclusive lock on this rank's shards of ``split`` in ``folder``, across processes.

    A second ``bafm data`` run on the same folder waits here until the first is done, then
    finds (and verifies) the finished shards instead of writing or deleting the same files.
    """
    lock = Path(folder) / RECORDS_DIR / f"{split}.rank{rank}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another `bafm data` run is writing '%s' shards; waiting for it", folder, split)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def shard_matches_record(folder: Path, name: str) -> Optional[str]:
    """None when shard ``name`` matches its ``.records/`` entry, else why not (size or sha256)."""
    shard, record_file = Path(folder) / name, Path(folder) / RECORDS_DIR / f"{name}.json"
    if not record_file.is_file():
        return "no record of it"
    try:
        record = json.loads(record_file.read_text())
        size, digest = int(record["bytes"]), str(record["sha256"])
    except (ValueError, KeyError, TypeError):
        return "its record is unreadable"
    if shard.stat().st_size != size:
        return f"{shard.stat().st_size} bytes, the record says {size}"
    if sha256_file(shard) != digest:
        return "sha256 differs from the record"
    return None


def _write_own_shards(job: SplitJob, encode: Callable[[Sequence[int]], Iterator[MomentBatch]], rank: int,
                      world_size: int, progress: bool) -> None:
    """Check this rank's finished shards, then write the missing and damaged ones (under the lock)."""
    _check_plan(job)
    records_dir = job.folder / RECORDS_DIR
    todo = []
    for i in range(rank, job.num_shards, world_size):
        name = shard_name(job.split, i)
        if not (job.folder / name).is_file():
            todo.append(i)
            continue
        problem = shard_matches_record(job.folder, name)
        if problem is not None:
            log.warning("%s: damaged (%s); rewriting it", job.folder / name, problem)
            todo.append(i)
    remove_stale_temps(job.folder, [shard_name(job.split, i) for i in todo])
    skipped = len(range(rank, job.num_shards, world_size)) - len(todo)
    if skipped:
        log.info("%s: %d finished shard(s) of rank %d checked and kept", job.split, skipped, rank)
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
    return None


def _write_manifest_if_complete(job: SplitJob, rank: int) -> Optional[Dict[str, Any]]:
    """The split's manifest entry from the shard records, once every shard is there."""
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
