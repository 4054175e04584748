"""Latent loader throughput on CPU: synthetic 4x32x32 float16 moment shards (ImageNet-256
SD-VAE size, with flipped moments) through ``LatentDataModule.train_dataloader()``.

    python bench/bench_loader.py [--samples 20000] [--batch-size 256] [--batches 200]

Prints latents/s and writes ``bench/results/loader_cpu.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from bafm.data import datamodule as datamodule_module
from bafm.data.datamodule import LatentDataModule
from bafm.data.manifest import update_manifest
from bafm.data.shard_writer import ShardWriter
from bafm.io import atomic_write_json
from bafm.schema import DataConfig

RESULTS = Path(__file__).resolve().parent / "results" / "loader_cpu.json"


def write_synthetic(folder: Path, samples: int, per_shard: int, channels: int = 4, size: int = 32,
                    num_classes: int = 1000, seed: int = 0) -> None:
    """Write ``samples`` random moment samples (mean ~ N(0, 1), std in [0.01, 0.1]) with flips."""
    rng = np.random.default_rng(seed)
    records = []
    for shard, start in enumerate(range(0, samples, per_shard)):
        with ShardWriter(folder / f"train-{shard:06d}.tar") as writer:
            for i in range(start, min(start + per_shard, samples)):
                mean = rng.standard_normal((channels, size, size), dtype=np.float32)
                std = rng.uniform(0.01, 0.1, (channels, size, size)).astype(np.float32)
                moments = np.concatenate([mean, std]).astype(np.float16)
                writer.write(f"{i:08d}", moments, int(rng.integers(num_classes)), moments[..., ::-1])
            records.append(asdict(writer.commit()))
    common = {"dataset": folder.name, "source": "synthetic", "encoder": {"kind": "synthetic"},
              "scaling_factor": 0.18215, "dtype": "float16", "moments_shape": [2 * channels, size, size],
              "latent_shape": [channels, size, size], "has_flip": True, "num_classes": num_classes,
              "class_names": [str(c) for c in range(num_classes)], "preprocessing": {"source": "synthetic"}}
    update_manifest(folder, common, "train", {"count": samples, "num_shards": len(records), "shards": records})


def measure(folder: Path, batch_size: int, batches: int, warmup: int = 5,
            verify_checksums: bool = True) -> Dict[str, float]:
    """Time ``batches`` batches from the training loader (num_workers=0, one process).

    Every run starts as a fresh process would: no shard's sha256 verified yet.
    """
    datamodule_module._VERIFIED.clear()
    cfg = DataConfig(root=str(folder.parent), dataset=folder.name, batch_size=batch_size, num_workers=0,
                     shuffle_buffer=1000, use_flip=True, verify_checksums=verify_checksums)
    dm = LatentDataModule(cfg, seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    done, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while done < batches:
        try:
            batch = next(it)
        except StopIteration:  # epoch boundary: the stream restarts
            it = iter(loader)
            continue
        assert batch["latent"].shape == (batch_size, 4, 32, 32) and batch["latent"].dtype == torch.float32
        done += 1
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    # Per CPU-second of this process too: on a shared machine wall time includes waiting for a core.
    return {"batches": done, "seconds": seconds, "latents_per_s": done * batch_size / seconds,
            "latents_per_cpu_s": done * batch_size / cpu_seconds}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many timed runs")
    parser.add_argument("--verify-checksums", type=int, choices=(0, 1), default=1,
                        help="1: sha256 of each shard on its first open (the default), 0: size check only")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "synthetic"
        start = time.perf_counter()
        write_synthetic(folder, args.samples, args.per_shard)
        write_seconds = time.perf_counter() - start
        runs = [measure(folder, args.batch_size, args.batches, verify_checksums=bool(args.verify_checksums))
                for _ in range(args.repeats)]
    best = max(runs, key=lambda r: r["latents_per_s"])
    result = {
        "benchmark": "latent loader", "device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "batch_size": args.batch_size, "latents_per_s": round(best["latents_per_s"], 1),
        "runs_latents_per_s": [round(r["latents_per_s"], 1) for r in runs],
        "latents_per_cpu_s": round(best["latents_per_cpu_s"], 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "settings": {"samples": args.samples, "samples_per_shard": args.per_shard, "latent_shape": [4, 32, 32],
                     "moments": "float16 (8, 32, 32) + flipped", "num_workers": 0, "torch_threads": 1,
                     "shuffle_buffer": 1000, "use_flip": True, "timed_batches": args.batches, "warmup_batches": 5,
                     "verify_checksums": bool(args.verify_checksums)},
        "write_samples_per_s": round(args.samples / write_seconds, 1),
    }
    atomic_write_json(Path(args.out), result)
    print(f"loader: {result['latents_per_s']:.0f} latents/s wall, {result['latents_per_cpu_s']:.0f} per CPU second "
          f"(batch {args.batch_size}, 1 process, num_workers=0; runs {result['runs_latents_per_s']}; "
          f"load average {result['load_average_1min']} on {os.cpu_count()} cores) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
