"""Latent data: preparation (``bafm data``), shards, the embedded digits and the data module.

Names are imported on first use so that ``bafm data`` does not pay for Lightning or diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LatentDataModule": "bafm.data.datamodule",
    "ShardError": "bafm.data.manifest",
    "ShardWriter": "bafm.data.shard_writer",
    "read_manifest": "bafm.data.manifest",
    "ensure_digits_shards": "bafm.data.digits",
    "load_digits_images": "bafm.data.digits",
    "build_decoder": "bafm.data.vae",
    "load_autoencoder": "bafm.data.vae",
    "center_crop_arr": "bafm.data.images",
    "list_images": "bafm.data.images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bafm.data' has no attribute '{name}'")
