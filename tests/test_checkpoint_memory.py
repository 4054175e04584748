"""Memory-frugal checkpoint loading: only the chosen weights are read and copied, nothing stays mapped."""

from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from bafm.models import checkpoint_io, load_backbone
from bafm.models.checkpoint_io import SafetensorsFile, load_weights
from test_loading import SMALL, SMALL_OVERRIDES, official_sit_layout, random_state


def _repa_checkpoint(path, seed=1):
    """REPA's training-checkpoint layout: model, ema, Adam state for every parameter, args."""
    layout = official_sit_layout(**SMALL, projector_dims=(32,), qk_norm=True)
    ema, raw = random_state(layout, seed=seed), random_state(layout, seed=seed + 1)
    opt = {
        "state": {i: {"step": torch.tensor(7.0), "exp_avg": torch.randn(s), "exp_avg_sq": torch.rand(s)}
                  for i, s in enumerate(layout.values())},
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": list(range(len(layout)))}],
    }
    torch.save({"model": raw, "ema": ema, "opt": opt, "args": argparse.Namespace(model="SiT-S/2"), "steps": 3},
               path)
    return ema


@pytest.fixture
def copies(monkeypatch):
    """Every tensor ``load_weights`` materialises from a torch checkpoint, as (nbytes, copy)."""
    seen = []
    original = checkpoint_io._copy_and_release

    def spy(tensor, mapped):
        copy = original(tensor, mapped)
        seen.append((tensor.untyped_storage().nbytes(), copy))
        return copy

    monkeypatch.setattr(checkpoint_io, "_copy_and_release", spy)
    return seen


def test_only_ema_is_materialised(tmp_path, copies):
    path = tmp_path / "repa.pt"
    ema = _repa_checkpoint(path)
    model = load_backbone(path, "SiT-S/2", source="repa", **SMALL_OVERRIDES)
    # One copy per EMA tensor and exactly the EMA's bytes: model and optimizer state were never copied.
    assert len(copies) == len(ema)
    assert sum(n for n, _ in copies) == sum(t.numel() * t.element_size() for t in ema.values())
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ema[name], rtol=0.0, atol=0.0)


def test_loaded_weights_do_not_follow_the_file(tmp_path):
    path = tmp_path / "repa.pt"
    ema = _repa_checkpoint(path)
    model = load_backbone(path, "SiT-S/2", source="repa", **SMALL_OVERRIDES)
    # Zero the file in place (same inode, same size): weights still mapped from it would change.
    size = path.stat().st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, bytes(size))
    finally:
        os.close(fd)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ema[name], rtol=0.0, atol=0.0)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_shared_storage_survives_page_release(tmp_path, zip_format):
    # Views of one storage, big enough to span pages: releasing pages after the first copy must not
    # zero or alter what the second copy reads (a legacy file is not mapped at all).
    base = torch.arange(20_000, dtype=torch.float32)
    obj = {"ema": {"whole": base, "tail": base[5_000:]}, "model": {"whole": -base}}
    path = tmp_path / "views.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    state = load_weights(path, ("ema", "model"))
    torch.testing.assert_close(state["whole"], base, rtol=0.0, atol=0.0)
    torch.testing.assert_close(state["tail"], base[5_000:], rtol=0.0, atol=0.0)


def test_safetensors_reads_only_the_chosen_group(tmp_path, monkeypatch):
    ema = {"a.weight": torch.randn(3, 4), "b": torch.randn(5)}
    flat = {**{f"ema.{k}": v for k, v in ema.items()}, **{f"model.{k}": -v for k, v in ema.items()},
            "opt.exp_avg": torch.zeros(9)}
    path = tmp_path / "train.safetensors"
    save_file(flat, str(path))
    read = []
    original = SafetensorsFile.read
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, names: read.extend(names) or original(self, names))
    state = load_weights(path, ("ema", "model"))
    assert sorted(read) == ["ema.a.weight", "ema.b"]
    assert state.keys() == ema.keys()
    for name, tensor in ema.items():
        torch.testing.assert_close(state[name], tensor, rtol=0.0, atol=0.0)
    read.clear()
    assert load_weights(path, ("model",))["b"].equal(-ema["b"]) and sorted(read) == ["model.a.weight", "model.b"]


def test_flat_safetensors_lazy_mapping(tmp_path):
    tensors = {"x": torch.randn(2, 3), "y": torch.arange(4)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    lazy = SafetensorsFile(tmp_path / "w.safetensors")
    assert sorted(lazy) == ["x", "y"] and len(lazy) == 2
    torch.testing.assert_close(lazy["y"], tensors["y"], rtol=0.0, atol=0.0)
    with pytest.raises(KeyError):
        lazy["z"]
    state = load_weights(tmp_path / "w.safetensors", ("ema", "model"))
    assert state.keys() == tensors.keys() and state["x"].equal(tensors["x"])


_PEAK_SCRIPT = """
import sys
from pathlib import Path
from bafm.models.checkpoint_io import load_weights

def kib(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])

Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
before = kib("VmHWM")
state = load_weights(sys.argv[1], ("ema", "model"))
print((kib("VmHWM") - before) * 1024, sum(t.numel() * t.element_size() for t in state.values()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_peak_memory_is_about_the_chosen_weights(tmp_path):
    """In a fresh process, loading 4 MiB of EMA weights beside 96 MiB of others raises the peak RSS
    by far less than the others' size (reading the whole file, as before, added 104 MiB)."""
    import subprocess
    from pathlib import Path

    mib = 2**20 // 4  # float32 elements per MiB
    gen = torch.Generator().manual_seed(0)
    ckpt = {"ema": {f"w{i}": torch.randn(mib, generator=gen) for i in range(4)},
            "model": {f"w{i}": torch.randn(16 * mib, generator=gen) for i in range(2)},
            "opt": {"state": {i: {"exp_avg": torch.randn(16 * mib, generator=gen)} for i in range(4)}}}
    torch.save(ckpt, tmp_path / "big.pt")
    del ckpt
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "big.pt")], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    growth, chosen = (int(v) for v in done.stdout.split())
    assert chosen == 4 * 2**20
    assert growth < 32 * 2**20, f"peak RSS grew by {growth / 2**20:.1f} MiB for 4 MiB of chosen weights"
