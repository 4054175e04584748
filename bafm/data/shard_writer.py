"""Writing latent shards: one shard at a time, atomically, with a checksum record."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import webdataset as wds

from bafm.data.manifest import CLS, MOMENTS, MOMENTS_FLIP, RECORDS_DIR
from bafm.data.npy_codec import encode_npy
from bafm.data.shard_reader import iter_samples, open_shard
from bafm.io import atomic_write_json, sha256_file



@dataclass
class ShardRecord:
    """A finished shard: file name, sample count, size in bytes and sha256."""

    name: str
    count: int
    bytes: int
    sha256: str


class ShardWriter:
    """Write one shard atomically: samples go to ``<name>.<pid>.tmp``, renamed on ``commit``.

    Used as a context manager, an exception before ``commit`` removes the temporary file.
    """

    def __init__(self, path: Path) -> None:
        """Open the temporary file for the shard at ``path``."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        self._file = open(self.tmp, "wb")
        # mtime 0: identical samples give byte-identical shards (and checksums) on every run.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)  # int: no pax header
        self.count = 0

    def write(self, key: str, moments: np.ndarray, cls: int, moments_flip: Optional[np.ndarray] = None,
              extra: Optional[Dict[str, bytes]] = None) -> None:
        """Append one sample.

        Args:
            key: sample key, without dots (WebDataset splits names at the first dot).
            moments: float16 ``(2C, H, W)``, posterior mean then std.
            cls: class id.
            moments_flip: float16 ``(2C, H, W)`` of the flipped image, or None.
            extra: more encoded members by extension (e.g. prompt embeddings, the caption).
        """
        if "." in key or "/" in key:
            raise ValueError(f"sample key '{key}' must not contain '.' or '/'")
        sample: Dict[str, Any] = {"__key__": key, MOMENTS: encode_npy(moments), CLS: str(int(cls)).encode()}
        if moments_flip is not None:
            sample[MOMENTS_FLIP] = encode_npy(moments_flip)
        sample.update(extra or {})
        self._tar.write(sample)
        self.count += 1

    def commit(self, records_dir: Optional[Path] = None) -> ShardRecord:
        """Finish the shard: flush, fsync, record its checksum, then rename it into place.

        Args:
            records_dir: where to keep the shard's JSON record (written before the rename, so
                a visible shard always has one); None keeps no record.

        Returns:
            The shard's record.
        """
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        record = ShardRecord(self.path.name, self.count, self.tmp.stat().st_size, sha256_file(self.tmp))
        if records_dir is not None:
            atomic_write_json(Path(records_dir) / f"{self.path.name}.json", asdict(record))
        os.replace(self.tmp, self.path)
        return record

    def abort(self) -> None:
        """Drop the temporary file."""
        with contextlib.suppress(Exception):
            self._tar.close()
        with contextlib.suppress(Exception):
            self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()


def shard_record(folder: Path, name: str) -> ShardRecord:
    """The record of a finished shard: from ``.records/`` or, if absent, by hashing the file."""
    path = Path(folder) / RECORDS_DIR / f"{name}.json"
    if path.is_file():
        return ShardRecord(**json.loads(path.read_text()))
    shard = Path(folder) / name
    count = sum(1 for _ in iter_samples(open_shard(str(shard)), str(shard)))
    return ShardRecord(name, count, shard.stat().st_size, sha256_file(shard))


def remove_stale_temps(folder: Path, names: List[str]) -> int:
    """Delete leftover temporary files of the given shards (from an interrupted run)."""
    removed = 0
    for name in names:
        for tmp in Path(folder).glob(f"{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
