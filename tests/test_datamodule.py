"""LatentDataModule on synthetic shards: sampling, flips, epochs, rank split, bad data, Lightning."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds

from bafm.data.datamodule import LatentDataModule
from bafm.data.manifest import ShardError, update_manifest
from bafm.data.npy_codec import encode_npy
from bafm.data.shard_writer import ShardWriter, sha256_file
from bafm.schema import DataConfig

C, H = 2, 4
NUM_CLASSES = 5
SCALE = 0.5


def _mean(i: int) -> np.ndarray:
    return (np.arange(C * H * H).reshape(C, H, H) / 8.0 + i).astype(np.float16)


def _std(i: int) -> np.ndarray:
    return np.full((C, H, H), 0.25 + 0.01 * (i % 7), dtype=np.float16)


def write_dataset(root: Path, n: int = 50, per_shard: int = 10, std: bool = False, flip: bool = True,
                  bad: Optional[Dict[int, bytes]] = None) -> Path:
    """``n`` samples; flipped means are the negated means; ``bad`` replaces sample i's moments payload."""
    folder = root / "syn"
    records = []
    for shard, start in enumerate(range(0, n, per_shard)):
        with ShardWriter(folder / f"train-{shard:06d}.tar") as writer:
            for i in range(start, min(start + per_shard, n)):
                s = _std(i) if std else np.zeros((C, H, H), np.float16)
                m = np.concatenate([_mean(i), s])
                writer.write(f"{i:05d}", m, i % NUM_CLASSES, np.concatenate([-_mean(i), s]) if flip else None)
            records.append(asdict(writer.commit()))
    if bad:  # rewrite with raw payloads (ShardWriter would encode arrays)
        for i, payload in bad.items():
            shard = i // per_shard
            path = folder / f"train-{shard:06d}.tar"
            with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as tw:
                for j in range(shard * per_shard, min((shard + 1) * per_shard, n)):
                    m = encode_npy(np.concatenate([_mean(j), np.zeros((C, H, H), np.float16)]))
                    tw.write({"__key__": f"{j:05d}", "moments.npy": payload if j == i else m,
                              "cls": str(j % NUM_CLASSES).encode()})
            # Recorded as written: the shard file is intact, one sample in it is bad.
            records[shard].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    common = {"dataset": "syn", "source": "synthetic", "encoder": {"kind": "synthetic"}, "scaling_factor": SCALE,
              "dtype": "float16", "moments_shape": [2 * C, H, H], "latent_shape": [C, H, H], "has_flip": flip,
              "num_classes": NUM_CLASSES, "class_names": [str(c) for c in range(NUM_CLASSES)], "preprocessing": {}}
    update_manifest(folder, common, "train", {"count": n, "num_shards": len(records), "shards": records})
    return folder


def _dm(folder: Path, **kw) -> LatentDataModule:
    cfg = DataConfig(root=str(folder.parent), dataset=folder.name, **{"batch_size": 8, "shuffle_buffer": 16, **kw})
    dm = LatentDataModule(cfg, seed=0)
    dm.setup("fit")
    return dm


def _collect(loader) -> Dict[str, torch.Tensor]:
    out = {}
    for batch in loader:
        assert batch["latent"].dtype == torch.float32 and batch["cls"].dtype == torch.int64
        for key, lat, cls in zip(batch["key"], batch["latent"], batch["cls"]):
            assert key not in out, f"{key} seen twice"
            assert int(cls) == int(key) % NUM_CLASSES
            out[key] = lat
    return out


def test_setup_fails_early_naming_path_and_command(tmp_path: Path) -> None:
    dm = LatentDataModule(DataConfig(root=str(tmp_path), dataset="imagenet256"), seed=0)
    with pytest.raises(FileNotFoundError, match=r"imagenet256.*make data EXP="):
        dm.setup("fit")
    folder = write_dataset(tmp_path)
    (folder / "train-000002.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-000002\.tar.*missing"):
        _dm(folder)
    with pytest.raises(FileNotFoundError, match="no split 'val'"):
        LatentDataModule(DataConfig(root=str(tmp_path), dataset="syn")).setup("validate")


def test_manifest_properties(tmp_path: Path) -> None:
    dm = _dm(write_dataset(tmp_path))
    assert dm.latent_shape == (C, H, H) and dm.num_classes == NUM_CLASSES and dm.scaling_factor == SCALE
    assert dm.counts == {"train": 50} and dm.has_flip and "syn" in dm.describe()


def test_eval_pass_is_exact_and_scaled(tmp_path: Path) -> None:
    dm = _dm(write_dataset(tmp_path, n=23, per_shard=5))
    seen = _collect(dm.eval_dataloader("train", batch_size=7))
    assert sorted(seen) == [f"{i:05d}" for i in range(23)]
    for key, lat in seen.items():  # std 0: the latent is the scaled mean, never flipped
        torch.testing.assert_close(lat, torch.from_numpy(_mean(int(key))).float() * SCALE, rtol=0, atol=0)


def test_two_ranks_are_disjoint_and_covering(tmp_path: Path) -> None:
    dm = _dm(write_dataset(tmp_path, n=50, per_shard=5))
    parts = [set(_collect(dm.eval_dataloader("train", rank=r, world_size=2))) for r in range(2)]
    assert not parts[0] & parts[1]
    assert parts[0] | parts[1] == {f"{i:05d}" for i in range(50)}
    assert len(parts[0]) == 25  # 10 shards, 5 each
    with_workers = _dm(write_dataset(tmp_path / "w", n=50, per_shard=5), num_workers=2)
    assert set(_collect(with_workers.eval_dataloader("train", rank=0, world_size=2))) == parts[0]


def test_posterior_sampling_statistics(tmp_path: Path) -> None:
    loader = _dm(write_dataset(tmp_path, std=True), use_flip=False, batch_size=50).train_dataloader()
    eps = []
    for _ in range(4):  # four epochs, four independent draws
        for batch in loader:
            for key, lat in zip(batch["key"], batch["latent"]):
                i = int(key)
                mean, std = torch.from_numpy(_mean(i)).float(), torch.from_numpy(_std(i)).float()
                eps.append((lat / SCALE - mean) / std)
    eps = torch.stack(eps).flatten()  # 200 samples x 32 values
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1.0) < 0.05
    assert abs((eps.abs() < 1).float().mean().item() - 0.6827) < 0.03  # normal, not uniform


def test_flip_choice(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path)
    for use_flip, bounds in ((True, (0.35, 0.65)), (False, (0.0, 0.0))):
        loader = _dm(folder, use_flip=use_flip).train_dataloader()
        flips = []
        for _ in range(4):
            for batch in loader:
                for key, lat in zip(batch["key"], batch["latent"]):
                    mean = torch.from_numpy(_mean(int(key))).float() * SCALE
                    flipped = bool(torch.equal(lat, -mean))
                    assert flipped or torch.equal(lat, mean)
                    flips.append(flipped)
        assert bounds[0] <= np.mean(flips) <= bounds[1]


def test_epochs_have_equal_length_and_are_seeded_per_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_dataset(tmp_path)

    def epochs(dm: LatentDataModule, n: int = 2) -> List[List[str]]:
        loader = dm.train_dataloader()
        out = []
        for _ in range(n):
            batches = list(loader)
            assert len(batches) == len(loader) and all(len(b["key"]) == 8 for b in batches)
            out.append([k for b in batches for k in b["key"]])
        return out

    first, again = epochs(_dm(folder)), epochs(_dm(folder))
    assert len(first[0]) == 8 * math.ceil(50 / 8)
    assert first == again  # same seed, same stream
    assert first[0] != first[1]  # each epoch draws anew
    # As after a checkpoint restore two batches into epoch 1: the rest of that epoch, exactly.
    resumed = _dm(folder).train_dataloader()
    resumed.load_state_dict({"epoch": 1, "served": 2})
    assert [k for b in resumed for k in b["key"]] == first[1][2 * 8:]
    assert resumed.state_dict() == {"epoch": 1, "served": len(first[1]) // 8}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rank1 = epochs(_dm(folder), n=1)
    assert len(rank1[0]) == 8 * math.ceil(50 / 16) and rank1[0] != first[0][: len(rank1[0])]


def test_truncated_shard_raises_or_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_dataset(tmp_path, n=30)
    shard = folder / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    size = len(data) // 2
    with pytest.raises(ShardError, match=rf"train-000001\.tar: {size} bytes, the manifest says {len(data)}; "
                                         r"re-run `make data` to rewrite it"):
        for _ in _dm(folder).train_dataloader():
            pass
    dm = _dm(folder, on_error="skip")
    with caplog.at_level(logging.WARNING):
        seen = _collect(dm.eval_dataloader("train"))
    good = {f"{i:05d}" for i in range(30)} & set(seen)
    assert {f"{i:05d}" for i in (*range(10), *range(20, 30))} <= good
    assert dm.skipped_samples == 30 - len(seen) > 0
    assert "train-000001.tar" in caplog.text and f"{dm.skipped_samples} skipped in total" in caplog.text


@pytest.mark.parametrize(
    "payload, message",
    [
        (encode_npy(np.zeros((2 * C, H, H), np.float32)), r"sample '00013': 'moments.npy' is float32"),
        (encode_npy(np.zeros((2 * C, H, H + 1), np.float16)), r"sample '00013': 'moments.npy' is float16 \(4, 4, 5\)"),
        (b"garbage", r"sample '00013': 'moments.npy': not a .npy payload"),
    ],
)
def test_bad_sample_raises_or_is_counted(tmp_path: Path, payload: bytes, message: str) -> None:
    folder = write_dataset(tmp_path, n=20, flip=False, bad={13: payload})
    with pytest.raises(ShardError, match=r"train-000001\.tar: " + message):
        _collect(_dm(folder).eval_dataloader("train"))
    dm = _dm(folder, on_error="skip", num_workers=2)  # counted across worker processes
    seen = _collect(dm.eval_dataloader("train"))
    assert len(seen) == 19 and "00013" not in seen and dm.skipped_samples == 1


class _Probe(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(C * H * H, 1)
        self.shapes: List[tuple] = []
        self.epoch_ends: List[int] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.shapes.append((tuple(batch["latent"].shape), tuple(batch["cls"].shape), len(batch["key"])))
        return self.layer(batch["latent"].flatten(1)).pow(2).mean()

    def on_train_epoch_end(self) -> None:
        self.epoch_ends.append(len(self.shapes))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_runs_on_the_datamodule(tmp_path: Path) -> None:
    dm = LatentDataModule(DataConfig(root=str(tmp_path), dataset="syn", batch_size=4, shuffle_buffer=8), seed=0)
    write_dataset(tmp_path)
    probe = _Probe()
    trainer = L.Trainer(max_steps=15, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(probe, datamodule=dm)
    assert trainer.global_step == 15 and probe.epoch_ends == [13, 15]  # ceil(50 / 4) batches per epoch
    assert probe.shapes == [((4, C, H, H), (4,), 4)] * 15
