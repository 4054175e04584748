"""Shared test settings: small thread pools (CI has 2 cores) and a repo-root working directory."""

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Test tensors are tiny: extra threads only add synchronisation (10-80x slower on a busy machine).
torch.set_num_threads(1)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Folder with tiny random backbone, SideNet and classifier files for the digits experiment."""
    from factories import tiny_digits_models

    root = tmp_path_factory.mktemp("tiny")
    tiny_digits_models(root)
    return root


@pytest.fixture(autouse=True)
def no_inception_download(monkeypatch):
    """Tests never use the network: torch-fidelity's weight download fails as it would offline."""
    import urllib.error

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)


def _tracked_files_state() -> dict:
    """``{path: (size, mtime_ns)}`` of every file git tracks in this checkout (empty outside git)."""
    import subprocess

    try:
        listed = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z"], capture_output=True,
                                check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        return {}
    state = {}
    for name in filter(None, listed):
        path = REPO_ROOT / name
        if path.is_file():
            stat = path.stat()
            state[name] = (stat.st_size, stat.st_mtime_ns)
    return state


@pytest.fixture(scope="session", autouse=True)
def source_tree_untouched():
    """No test may rewrite a file tracked in git (e.g. the committed SideNet)."""
    before = _tracked_files_state()
    yield
    after = _tracked_files_state()
    changed = sorted(name for name in before if after.get(name) != before[name])
    assert not changed, f"tests rewrote tracked files: {changed}"
