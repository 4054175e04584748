"""``LatentDataModule``: WebDataset latent shards for single-/multi-GPU, multi-node training.

Training streams are infinite: shards are resampled with replacement (``wds.ResampledShards``),
seeded per rank and worker so that ranks see different samples, and ``with_epoch`` cuts an
epoch to ``ceil(N / (batch_size * world_size))`` batches on every rank. Evaluation streams are
one exact pass: shards split over ranks, then over workers. Samples are posterior draws
``mean + std * eps`` times the manifest's scaling factor, with the flipped moments chosen with
probability 1/2 in training when present and ``data.use_flip``.

Shard lists, node/worker splitting, resampling and the loader are WebDataset's; tar parsing
and ``.npy`` decoding are bafm's own (``bafm.data.shard_reader``): a shard is memory-mapped, arrays
are checked against a cached header instead of ``np.load`` (25 us each), and a batch is
collated with one numpy copy, one float conversion and one normal draw.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
from functools import partial
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Set, Tuple

import lightning as L
import numpy as np
import torch
import webdataset as wds

from bafm.data.resumable import ResumableLoader
from bafm.data.manifest import ShardError, read_manifest, shard_paths
from bafm.data.shard_reader import LatentSample, check_sample, iter_samples, open_shard

log = logging.getLogger(__name__)


class SkipCounter:
    """Bad samples skipped so far, shared with DataLoader worker processes."""

    def __init__(self) -> None:
        self._value = multiprocessing.Value("q", 0)

    def add(self, n: int = 1) -> int:
        """Add ``n``; return the new total."""
        with self._value.get_lock():
            self._value.value += n
            return int(self._value.value)

    @property
    def value(self) -> int:
        return int(self._value.value)

    def __getstate__(self) -> Dict[str, Any]:
        # Shared memory can only travel to a process being started (DataLoader workers under
        # spawn); any other pickling (e.g. a ddp_spawn launch) takes a snapshot instead.
        if get_spawning_popen() is not None:
            return {"shared": self._value}
        return {"count": self.value}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self._value = state["shared"] if "shared" in state else multiprocessing.Value("q", state["count"])


def _as_is(batch: Any) -> Any:
    """DataLoader ``collate_fn``: batches are already collated by the pipeline."""
    return batch


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def _stream_seed(seed: int, rank: int, epoch: int, tag: int) -> np.random.SeedSequence:
    """Independent random stream per (seed, rank, worker, epoch, stage)."""
    return np.random.SeedSequence([seed, rank, _worker_id(), epoch, tag])


def _rank_worker_seed(rank: int) -> int:
    """``ResampledShards`` worker seed: distinct for every (rank, worker) pair."""
    return rank * 65536 + _worker_id()


def _split_by_rank(src: Iterable[Dict[str, str]], rank: int, world_size: int) -> Iterator[Dict[str, str]]:
    """Every ``world_size``-th shard starting at ``rank`` (explicit, not read from the environment)."""
    for i, item in enumerate(src):
        if i % world_size == rank:
            yield item


# (shard path, sha256) pairs whose checksum this process has verified: each is hashed once.
_VERIFIED: Set[Tuple[str, str]] = set()


class _ReadShards:
    """Pipeline stage: shard URLs -> validated ``LatentSample``s, with the ``on_error`` policy.

    A shard that ends early or holds more samples than the manifest says is corrupt too.
    """

    def __init__(self, counts: Mapping[str, int], moments_shape: Tuple[int, ...], num_classes: int,
                 on_error: str, skipped: SkipCounter, checksums: Optional[Mapping[str, str]] = None,
                 sizes: Optional[Mapping[str, int]] = None) -> None:
        self.counts, self.moments_shape, self.num_classes = dict(counts), tuple(moments_shape), num_classes
        self.on_error, self.skipped, self.checksums = on_error, skipped, checksums
        self.sizes = dict(sizes or {})

    def _check_file(self, url: str, data: Any) -> None:
        """Size against the manifest always; sha256 the first time this process opens the shard."""
        expected = self.sizes.get(url)
        if expected is not None and len(data) != expected:
            raise ShardError(url, f"{len(data)} bytes, the manifest says {expected}; re-run `make data` to rewrite it")
        if self.checksums is None or (url, self.checksums[url]) in _VERIFIED:
            return
        if hashlib.sha256(data).hexdigest() != self.checksums[url]:
            raise ShardError(url, "sha256 differs from the manifest; re-run `make data` to rewrite it")
        _VERIFIED.add((url, self.checksums[url]))

    def _skip(self, err: ShardError, n: int) -> None:
        total = self.skipped.add(n)
        log.warning("skipped %d sample(s): %s (%d skipped in total)", n, err, total)

    def __call__(self, src: Iterable[Dict[str, str]]) -> Iterator[LatentSample]:
        for item in src:
            url = item["url"]
            expected = self.counts.get(url, 0)
            good = 0
            try:
                data = open_shard(url)
                self._check_file(url, data)
                for raw in iter_samples(data, url):
                    try:
                        sample = check_sample(raw, self.moments_shape, self.num_classes)
                    except ShardError as err:
                        if self.on_error == "raise":
                            raise
                        self._skip(err, 1)
                        expected -= 1
                        continue
                    good += 1
                    yield sample
                if good != expected:
                    raise ShardError(url, f"holds {good} good samples, the manifest says {self.counts.get(url)}; "
                                          "re-run `make data` to rewrite it")
            except OSError as err:
                if self.on_error == "raise":
                    raise ShardError(url, f"cannot read: {err}") from err
                self._skip(ShardError(url, f"cannot read: {err}"), expected)
            except ShardError as err:
                if self.on_error == "raise":
                    raise
                self._skip(err, max(expected - good, 0))


class _Shuffle:
    """Pipeline stage: shuffle buffer with a seeded stream per rank, worker and epoch."""

    def __init__(self, size: int, seed: int, rank: int) -> None:
        self.size, self.seed, self.rank, self.epoch = size, seed, rank, -1

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        self.epoch += 1
        if self.size <= 1:
            yield from src
            return
        rng = np.random.default_rng(_stream_seed(self.seed, self.rank, self.epoch, 1))
        buf: List[Any] = []
        for sample in src:
            if len(buf) < self.size:
                buf.append(sample)
                continue
            k = int(rng.integers(len(buf)))
            buf[k], sample = sample, buf[k]
            yield sample
        rng.shuffle(buf)
        yield from buf


class _Collate:
    """Pipeline stage: samples -> batches ``{"latent", "cls", "key"}`` with posterior sampling.

    Moments of a batch are copied into one float16 array, converted to float32 once, and
    sampled with one normal draw: ``latent = (mean + std * eps) * scaling_factor``.
    """

    def __init__(self, batch_size: int, moments_shape: Tuple[int, ...], scaling_factor: float, flip: bool,
                 seed: int, rank: int, partial_batches: bool) -> None:
        self.batch_size, self.moments_shape, self.scale = batch_size, tuple(moments_shape), scaling_factor
        self.flip, self.seed, self.rank, self.partial = flip, seed, rank, partial_batches
        self.nbytes = int(np.prod(self.moments_shape)) * 2
        self.epoch = -1

    def __call__(self, src: Iterable[LatentSample]) -> Iterator[Dict[str, Any]]:
        self.epoch += 1
        state = _stream_seed(self.seed, self.rank, self.epoch, 2)
        rng = np.random.default_rng(state)
        gen = torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> np.uint64(1)))
        batch: List[LatentSample] = []
        for sample in src:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collate(batch, rng, gen)
                batch = []
        if batch and self.partial:
            yield self.collate(batch, rng, gen)

    def collate(self, batch: List[LatentSample], rng: np.random.Generator, gen: torch.Generator) -> Dict[str, Any]:
        """Decode, pick flips and sample the posterior for one list of samples."""
        n = len(batch)
        flips = rng.random(n) < 0.5 if self.flip else np.zeros(n, dtype=bool)
        moments = np.empty((n, *self.moments_shape), dtype=np.float16)
        flat = moments.reshape(n, -1)
        for i, s in enumerate(batch):
            payload = s.moments_flip if flips[i] and s.moments_flip is not None else s.moments
            # The header was checked in check_sample: the data are the payload's last nbytes.
            flat[i] = np.frombuffer(payload, dtype=np.float16, offset=len(payload) - self.nbytes)
        x = torch.from_numpy(moments).float()
        c = self.moments_shape[0] // 2
        eps = torch.empty((n, c, *self.moments_shape[1:])).normal_(generator=gen)
        latent = torch.addcmul(x[:, :c], x[:, c:], eps).mul_(self.scale)
        cls = torch.tensor([s.cls for s in batch], dtype=torch.int64)
        return {"latent": latent, "cls": cls, "key": [s.key for s in batch]}


class LatentDataModule(L.LightningDataModule):
    """Latent shards ``<data.root>/<data.dataset>/<split>-%06d.tar`` described by ``manifest.json``.

    Batches are ``{"latent": float32 (B, C, H, W), "cls": int64 (B,), "key": list[str]}``,
    latents already multiplied by the manifest's scaling factor.
    """

    def __init__(self, cfg: Any, seed: int = 0, train_split: str = "train", val_split: str = "val") -> None:
        """Configure from ``cfg`` (a ``DataConfig``); ``seed`` seeds every random stream."""
        super().__init__()
        self.cfg, self.seed = cfg, int(seed)
        self.train_split, self.val_split = train_split, val_split
        self.folder = Path(cfg.root) / cfg.dataset
        self.skipped = SkipCounter()
        self._manifest: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ manifest facts

    @property
    def manifest(self) -> Dict[str, Any]:
        """The dataset's manifest (read on first use)."""
        if self._manifest is None:
            manifest = read_manifest(self.folder)
            if manifest.get("dtype") != "float16":
                raise ShardError(f"{self.folder.absolute()}/manifest.json", f"dtype '{manifest.get('dtype')}', "
                                                                             "expected 'float16'")
            self._manifest = manifest
        return self._manifest

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one latent."""
        return tuple(self.manifest["latent_shape"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def scaling_factor(self) -> float:
        return float(self.manifest["scaling_factor"])

    @property
    def has_flip(self) -> bool:
        return bool(self.manifest["has_flip"])

    @property
    def counts(self) -> Dict[str, int]:
        """Samples per split."""
        return {split: int(e["count"]) for split, e in self.manifest["splits"].items()}

    @property
    def skipped_samples(self) -> int:
        """Bad samples skipped under ``data.on_error=skip`` (all worker processes together)."""
        return self.skipped.value

    def describe(self) -> str:
        """One line for logs and error messages."""
        splits = ", ".join(f"{s} {n}" for s, n in self.counts.items())
        return f"{self.folder} ({splits} samples, latents {self.latent_shape}, scale {self.scaling_factor:g})"

    def setup(self, stage: Optional[str] = None) -> None:
        """Check that the shards exist before any training starts.

        Raises:
            FileNotFoundError: no manifest, an empty split or a listed shard missing, with the
                command that creates them.
            ConfigError: ``data.batch_size`` larger than the training split (a batch would repeat samples
                and take memory in proportion), naming both.
        """
        from bafm.config import ConfigError

        if self.cfg.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error is '{self.cfg.on_error}', expected 'raise' or 'skip'.")
        needed = [self.val_split] if stage in ("validate", "test") else [self.train_split]
        for split in needed:
            shard_paths(self.folder, self.manifest, split)
            size = self.counts[split]
            if split == self.train_split and int(self.cfg.batch_size) > size:
                raise ConfigError(f"'data.batch_size' is {self.cfg.batch_size}, more than the {size} samples of the "
                                  f"'{split}' split in '{self.folder.absolute()}'; use at most {size}.")

    # ------------------------------------------------------------------ loaders

    def _rank_world(self) -> Tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        return rank, world_size

    def _reader(self, split: str) -> Tuple[List[str], _ReadShards]:
        shards = shard_paths(self.folder, self.manifest, split)
        records = {r["name"]: r for r in self.manifest["splits"][split]["shards"]}
        sizes = {path: int(records[Path(path).name]["bytes"]) for path, _ in shards
                 if "bytes" in records[Path(path).name]}
        checksums = None
        if self.cfg.verify_checksums:
            checksums = {path: records[Path(path).name]["sha256"] for path, _ in shards}
        reader = _ReadShards(dict(shards), tuple(self.manifest["moments_shape"]), self.num_classes,
                             self.cfg.on_error, self.skipped, checksums, sizes)
        return [path for path, _ in shards], reader

    def _loader(self, pipeline: wds.DataPipeline) -> wds.WebLoader:
        workers = int(self.cfg.num_workers)
        return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
                             persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> ResumableLoader:
        """Infinite resampled stream cut into epochs of equal length on every rank.

        Each epoch's stream depends only on (seed, rank, worker, epoch), and the returned loader
        records how far into its epoch training got, so Lightning checkpoints resume exactly.
        """
        _, world_size = self._rank_world()
        batches = math.ceil(self.counts[self.train_split] / (int(self.cfg.batch_size) * world_size))
        return ResumableLoader(self._train_epoch, length=batches)

    def _train_epoch(self, epoch: int) -> wds.WebLoader:
        """The training batches of one epoch."""
        rank, world_size = self._rank_world()
        urls, reader = self._reader(self.train_split)
        batch_size = int(self.cfg.batch_size)
        shards = wds.ResampledShards(urls, seed=self.seed, worker_seed=partial(_rank_worker_seed, rank),
                                     deterministic=True)
        shuffle = _Shuffle(int(self.cfg.shuffle_buffer), self.seed, rank)
        collate = _Collate(batch_size, tuple(self.manifest["moments_shape"]), self.scaling_factor,
                           bool(self.cfg.use_flip) and self.has_flip, self.seed, rank, partial_batches=False)
        # The stages count epochs up from here on their first iteration: this one is ``epoch``.
        shards.epoch = shuffle.epoch = collate.epoch = epoch - 1
        pipeline = wds.DataPipeline(shards, reader, shuffle, collate)
        batches = math.ceil(self.counts[self.train_split] / (batch_size * world_size))
        return self._loader(pipeline).with_epoch(batches).with_length(batches, silent=True)

    def eval_dataloader(self, split: str, batch_size: Optional[int] = None, rank: Optional[int] = None,
                        world_size: Optional[int] = None) -> wds.WebLoader:
        """One exact pass over ``split``: shards split over ranks, then workers; no shuffle, no flips.

        Args:
            split: split name in the manifest.
            batch_size: default ``data.batch_size``; the last batch may be smaller.
            rank: this process's rank (default: trainer, torch.distributed or RANK).
            world_size: number of ranks (same default).

        Returns:
            A loader whose ranks together yield every sample of ``split`` exactly once (a rank
            gets nothing if there are fewer shards than ranks).
        """
        default_rank, default_world = self._rank_world()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        urls, reader = self._reader(split)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            partial(_split_by_rank, rank=rank, world_size=world_size),
            wds.split_by_worker,
            reader,
            _Collate(int(batch_size or self.cfg.batch_size), tuple(self.manifest["moments_shape"]),
                     self.scaling_factor, False, self.seed, rank, partial_batches=True),
        )
        return self._loader(pipeline)

    def val_dataloader(self) -> Any:
        """Single pass over ``val`` (empty list if the dataset has no such split)."""
        if self.val_split not in self.manifest["splits"]:
            return []
        return self.eval_dataloader(self.val_split)
