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
