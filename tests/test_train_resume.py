"""Training runs that never silently resume, never resume a bad state and never overwrite the
committed SideNet (tiny models, CPU, a few steps each)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bafm.cli import main
from bafm.config import load_config
from bafm.training.checkpoints import AtomicCheckpointIO, read_global_step, resolve_resume
from bafm.training.module import SideNetModule
from bafm.training.train import build_trainer
from factories import tiny_digits_overrides

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "digits.yaml")


def _train_args(tmp_path, *extra):
    return ["train", "--config", DIGITS, *tiny_digits_overrides(tmp_path), "eval.every_n_steps=0",
            "trainer.checkpoint_every_n_steps=1", "trainer.accelerator=cpu", *extra]


def _ckpts(tmp_path) -> Path:
    return tmp_path / "runs" / "digits" / "checkpoints"


def test_fresh_run_into_used_run_folder_stops_and_resume_continues(tmp_path, capsys):
    assert main(_train_args(tmp_path, "trainer.max_steps=2")) == 0
    export = tmp_path / "runs" / "digits" / "sidenet.safetensors"
    stamp = export.stat().st_mtime_ns
    capsys.readouterr()
    # A finished run, started again without trainer.resume (and with another SideNet size):
    # it must neither resume silently nor crash on size mismatches, and nothing is rewritten.
    assert main(_train_args(tmp_path, "trainer.max_steps=4", "sidenet.channels=16")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err == (f"bafm train: run folder '{tmp_path / 'runs' / 'digits'}' already holds training checkpoints "
                   f"(up to step 2) in {_ckpts(tmp_path)}; resume with trainer.resume=last, or start over with "
                   f"another runs_dir=/name= or after removing '{tmp_path / 'runs' / 'digits'}'")
    assert export.stat().st_mtime_ns == stamp
    # Asked to resume, it continues from step 2.
    assert main(_train_args(tmp_path, "trainer.max_steps=3", "trainer.resume=last")) == 0
    assert "Trained 3 steps" in capsys.readouterr().out
    assert read_global_step(_ckpts(tmp_path) / "last.ckpt") == 3


def test_resume_last_means_highest_step_not_newest_file(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step in [("step0000004.ckpt", 4), ("last.ckpt", 4), ("step0000002.ckpt", 2), ("interrupted.ckpt", 1)]:
        torch.save({"global_step": step, "state_dict": {}}, folder / name)
    (folder / "zz-damaged.ckpt").write_bytes(np.random.default_rng(0).bytes(512))
    for i, name in enumerate(["step0000004.ckpt", "last.ckpt", "step0000002.ckpt", "interrupted.ckpt",
                              "zz-damaged.ckpt"]):
        os.utime(folder / name, (1_000_000 + i, 1_000_000 + i))  # newest last
    with pytest.warns(UserWarning, match="zz-damaged.ckpt: not a readable checkpoint"):
        chosen = resolve_resume("last", folder)
    assert chosen == str(folder / "last.ckpt")  # step 4; the newer of the two step-4 files
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):
        resolve_resume("last", tmp_path / "empty")


def test_failed_start_writes_no_interrupted_checkpoint(tmp_path, capsys):
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(np.random.default_rng(1).bytes(2048))
    assert main(_train_args(tmp_path, "trainer.max_steps=2", f"trainer.resume={damaged}")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"bafm train: {damaged}: not a readable checkpoint (corrupt, truncated or not a torch.save/safetensors file)"
    assert main(_train_args(tmp_path, "trainer.max_steps=2", f"trainer.resume={tmp_path / 'nope.ckpt'}")) == 2
    assert capsys.readouterr().err.strip() == f"bafm train: trainer.resume: checkpoint '{tmp_path / 'nope.ckpt'}' not found"
    assert not _ckpts(tmp_path).exists() or not list(_ckpts(tmp_path).iterdir())


def test_non_finite_weights_are_never_checkpointed(tmp_path, capsys, monkeypatch):
    original = SideNetModule.optimizer_step
    calls = []

    def poisoned(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= 2:  # the second optimizer step diverges
            with torch.no_grad():
                for p in self.sidenet.parameters():
                    p.fill_(float("nan"))

    monkeypatch.setattr(SideNetModule, "optimizer_step", poisoned)
    assert main(_train_args(tmp_path, "trainer.max_steps=5")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after Lightning's own warnings
    assert err.startswith("bafm train: non-finite SideNet loss (nan) at step 2; training stopped.")
    names = sorted(p.name for p in _ckpts(tmp_path).iterdir())
    assert names == ["last.ckpt", "step0000001.ckpt"]
    chosen = resolve_resume("last", _ckpts(tmp_path))
    checkpoint = torch.load(chosen, weights_only=True)
    assert checkpoint["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_checkpoints_are_written_atomically_beside_their_target(tmp_path, monkeypatch):
    cfg = load_config(DIGITS, [f"runs_dir={tmp_path / 'runs'}", "trainer.accelerator=cpu"])
    io = build_trainer(cfg, []).strategy.checkpoint_io
    assert isinstance(io, AtomicCheckpointIO)
    target = tmp_path / "run" / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, target)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    written = []
    real_save = torch.save

    def crash_after_writing(obj, f, *args, **kwargs):
        written.append(Path(f))
        real_save(obj, f, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_after_writing)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2}, target)
    assert written[0].parent == target.parent and written[0] != target
    assert read_global_step(target) == 1  # the old checkpoint is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
