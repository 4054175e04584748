"""Atomic file writing (``bafm.io``): all-or-nothing, next to the target, permissions of a plain open."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from bafm.io import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from bafm.models.checkpoint_io import write_weights


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_bytes_text_json_replace_and_leave_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    atomic_write_text(tmp_path / "t.md", "héllo\n")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert (tmp_path / "j.json").read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []
    # mkstemp would give 0600; the file gets what open() would give.
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, str(target))
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.exists()
            tmp.write_bytes(b"half a fi")
            raise RuntimeError("disk full")
    torch.testing.assert_close(load_file(str(target))["x"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_temp_names_are_unique_per_call(tmp_path):
    with atomic_path(tmp_path / "x") as first, atomic_path(tmp_path / "x") as second:
        assert first != second
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert (tmp_path / "x").read_bytes() == b"1"  # the outer block finishes last


def test_write_weights_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "sidenet.safetensors"
    write_weights({"w": torch.ones(3)}, path, {"channels": 4})
    torch.testing.assert_close(load_file(str(path))["w"], torch.ones(3))
    assert json.loads((tmp_path / "sidenet.json").read_text()) == {"channels": 4}

    def crash(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr("bafm.models.checkpoint_io.save_file", crash)
    with pytest.raises(OSError, match="no space"):
        write_weights({"w": torch.zeros(3)}, path, {"channels": 8})
    torch.testing.assert_close(load_file(str(path))["w"], torch.ones(3))
    assert json.loads((tmp_path / "sidenet.json").read_text()) == {"channels": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sidenet.json", "sidenet.safetensors"]
