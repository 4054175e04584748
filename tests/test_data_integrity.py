"""Damaged shards: ``bafm data`` rewrites them, the loader refuses them, two runs take turns."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from bafm.cli import main
from bafm.config import load_config
from bafm.data import datamodule as datamodule_module
from bafm.data.datamodule import LatentDataModule
from bafm.data.manifest import MANIFEST, ShardError
from bafm.data.shard_job import write_split, writer_lock
from bafm.schema import DataConfig
from test_shards import _encoder, _job

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "digits.yaml")


def test_rerun_rewrites_truncated_and_overwritten_shards(tmp_path, caplog):
    args = ["data", "--config", DIGITS, f"data.root={tmp_path}", "data.samples_per_shard=500"]
    assert main(args) == 0
    folder = tmp_path / load_config(DIGITS).data.dataset
    good = {p.name: p.read_bytes() for p in folder.glob("*.tar")}
    manifest = (folder / MANIFEST).read_text()
    truncated, overwritten = folder / "train-000000.tar", folder / "val-000000.tar"
    truncated.write_bytes(good[truncated.name][:1000])
    overwritten.write_bytes(bytes(len(good[overwritten.name])))  # same size, other bytes
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    assert f"{truncated}: damaged (1000 bytes, the record says {len(good[truncated.name])}); rewriting it" in caplog.text
    assert f"{overwritten}: damaged (sha256 differs from the record); rewriting it" in caplog.text
    assert {p.name: p.read_bytes() for p in folder.glob("*.tar")} == good
    assert (folder / MANIFEST).read_text() == manifest
    assert not list(folder.glob("*.tmp"))


def _dm(folder: Path, **kw) -> LatentDataModule:
    dm = LatentDataModule(DataConfig(root=str(folder.parent), dataset=folder.name, batch_size=4,
                                     shuffle_buffer=0, **kw), seed=0)
    dm.setup("fit")
    return dm


def _read_all(dm: LatentDataModule) -> int:
    return sum(len(batch["key"]) for batch in dm.eval_dataloader("train"))


def test_reader_checks_size_always_and_sha256_once_per_process(tmp_path, monkeypatch):
    folder = tmp_path / "t"
    write_split(_job(folder), _encoder([]), progress=False)
    hashed = []
    real = datamodule_module.hashlib.sha256

    def counting(data=b""):
        hashed.append(len(data))
        return real(data)

    monkeypatch.setattr(datamodule_module.hashlib, "sha256", counting)
    monkeypatch.setattr(datamodule_module, "_VERIFIED", set())
    assert _read_all(_dm(folder)) == 10 and len(hashed) == 3  # three shards, hashed once each
    assert _read_all(_dm(folder)) == 10 and len(hashed) == 3  # the same process: not again
    assert _read_all(_dm(folder, verify_checksums=False)) == 10 and len(hashed) == 3

    shard = folder / "train-000001.tar"
    original = shard.read_bytes()
    shard.write_bytes(original[:-512] + b"\x01" * 512)  # same size, damaged end
    monkeypatch.setattr(datamodule_module, "_VERIFIED", set())
    with pytest.raises(ShardError) as err:
        _read_all(_dm(folder))
    assert str(err.value) == f"{shard}: sha256 differs from the manifest; re-run `make data` to rewrite it"
    shard.write_bytes(original[:2048])
    with pytest.raises(ShardError) as err:
        _read_all(_dm(folder, verify_checksums=False))
    assert str(err.value) == (f"{shard}: 2048 bytes, the manifest says {len(original)}; "
                              "re-run `make data` to rewrite it")


def test_two_writers_on_one_folder_take_turns(tmp_path, caplog):
    folder = tmp_path / "t"
    written: list = []
    finished = threading.Event()

    def second_run():
        write_split(_job(folder), _encoder(written), progress=False)
        finished.set()

    with caplog.at_level(logging.WARNING):
        with writer_lock(folder, "train", 0):  # a first run is busy writing
            (folder / "train-000000.tar.424242.tmp").write_bytes(b"its half-written shard")
            thread = threading.Thread(target=second_run)
            thread.start()
            time.sleep(1.0)
            assert not finished.is_set() and not written  # it waits rather than writing the same files
            assert (folder / "train-000000.tar.424242.tmp").is_file()  # nor deletes the other's temp file
        thread.join(timeout=60)
    assert finished.is_set() and written == list(range(10))
    assert f"{folder}: another `bafm data` run is writing 'train' shards; waiting for it" in caplog.text
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["splits"]["train"]["count"] == 10
