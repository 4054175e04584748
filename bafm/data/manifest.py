"""The latent dataset folder's format: names, errors and ``manifest.json``.

A shard ``<split>-%06d.tar`` holds one sample per image: ``<key>.moments.npy`` (float16
``(2C, H, W)``: posterior mean then std), optionally ``<key>.moments_flip.npy`` (the same for
the horizontally flipped image) and ``<key>.cls`` (the class id as decimal text). Shards are
written under a temporary name and renamed only once complete, so a reader never sees half a
shard (``bafm.data.shard_writer``); a small JSON record per finished shard (in ``.records/``)
keeps its sample count and sha256. ``manifest.json`` describes the whole dataset folder and is
replaced atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Mapping, Optional, Tuple

from bafm.io import atomic_write_json, file_lock

MANIFEST = "manifest.json"
RECORDS_DIR = ".records"
FORMAT = "bafm-latents-1"
MOMENTS = "moments.npy"
MOMENTS_FLIP = "moments_flip.npy"
CLS = "cls"


class ShardError(ValueError):
    """A shard or a sample in it that cannot be used: names the shard and, if known, the sample."""

    def __init__(self, shard: str, reason: Optional[str] = None, key: Optional[str] = None) -> None:
        self.shard, self.reason, self.key = shard, reason, key
        if reason is None:  # rebuilt from its message (e.g. re-raised from a DataLoader worker)
            super().__init__(shard)
            return
        where = f"{shard}: sample '{key}'" if key is not None else shard
        super().__init__(f"{where}: {reason}")


class DataSettingsError(ValueError):
    """A dataset folder that already holds shards written with other settings (names what differs)."""


class DataInputError(ValueError):
    """An input of ``bafm data`` that cannot be used: an image, a list file, the VAE or a setting."""


def written_by_data(path: Path) -> bool:
    """Whether ``bafm data`` writes a file of this name in a dataset folder (shards, records, manifest)."""
    return path.name == MANIFEST or path.suffix == ".tar" or RECORDS_DIR in path.parts


def shard_name(split: str, index: int) -> str:
    """``<split>-%06d.tar``, the file name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


# ----------------------------------------------------------------------------- manifest


def manifest_lock(folder: Path) -> ContextManager[None]:
    """Exclusive lock for read-modify-write of ``manifest.json`` across processes."""
    return file_lock(Path(folder) / RECORDS_DIR / "manifest.lock")


def read_manifest(folder: Path) -> Dict[str, Any]:
    """Load ``<folder>/manifest.json``.

    Raises:
        FileNotFoundError: no manifest, with the command that writes one.
        ShardError: unreadable, of another format, or listing a shard outside ``folder``.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no latent shards at '{Path(folder).absolute()}' ({MANIFEST} missing). Create them with "
            f"`make data EXP=experiments/<name>.yaml` (or `bafm data --config ...`)."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(str(path), f"not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardError(str(path), f"format '{found}', expected '{FORMAT}'")
    _check_shard_records(path, manifest)
    return manifest


def _check_shard_records(path: Path, manifest: Mapping[str, Any]) -> None:
    """Every listed shard is a plain file name in the manifest's own folder, with a sample count.

    A manifest is data, not a path list: a name such as ``../../etc/passwd`` or ``/abs/file``
    would make the reader open a file outside the dataset folder.
    """
    splits = manifest.get("splits", {})
    if not isinstance(splits, dict):
        raise ShardError(str(path), f"'splits' is a {type(splits).__name__}, expected a mapping")
    for split, entry in splits.items():
        records = entry.get("shards", []) if isinstance(entry, dict) else None
        if not isinstance(records, list):
            raise ShardError(str(path), f"split '{split}': 'shards' is not a list of shard records")
        for rec in records:
            name = rec.get("name") if isinstance(rec, dict) else None
            if not isinstance(name, str) or not isinstance(rec.get("count"), int):
                raise ShardError(str(path), f"split '{split}': shard record {rec!r} lacks a name or a count")
            if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
                raise ShardError(str(path), f"split '{split}' lists shard '{name}', expected a file name inside "
                                            f"'{path.parent.absolute()}'; re-run `make data` to rewrite the manifest")


def latent_scaling_factor(folder: Path, default: float) -> float:
    """The factor the latents of ``folder`` were scaled by: the manifest's, else ``default``.

    Latents are decoded as ``latents / factor``; ``default`` (``data.vae_scaling_factor``)
    covers folders of images encoded on the fly, which have no manifest.

    Raises:
        ValueError: a manifest that is unreadable or of another format.
    """
    if not (Path(folder) / MANIFEST).is_file():
        return float(default)
    return float(read_manifest(folder).get("scaling_factor", default))


def update_manifest(folder: Path, common: Mapping[str, Any], split: str, entry: Mapping[str, Any]) -> Dict[str, Any]:
    """Add or replace one split's entry in ``manifest.json`` (locked, atomic).

    Args:
        folder: dataset folder.
        common: dataset-wide fields (encoder, scaling factor, shapes, preprocessing); they must
            agree with those already recorded for other splits.
        split: split name.
        entry: the split's fields (counts, shard records).

    Returns:
        The manifest as written.

    Raises:
        DataSettingsError: ``common`` disagrees with the manifest already in ``folder``.
    """
    folder = Path(folder)
    common = json.loads(json.dumps(dict(common)))  # tuples -> lists, as read back from disk
    with manifest_lock(folder):
        manifest: Dict[str, Any] = {"format": FORMAT, **common, "splits": {}}
        if (folder / MANIFEST).is_file():
            old = read_manifest(folder)
            clash = sorted(k for k, v in common.items() if k in old and old[k] != v)
            others = sorted(set(old.get("splits", {})) - {split})
            if clash and others:
                was = ", ".join(f"{k}={old[k]!r} (now {common[k]!r})" for k in clash)
                raise DataSettingsError(
                    f"{folder / MANIFEST}: split(s) {others} were written with other settings: {was}. "
                    f"Use another data.dataset or delete the folder."
                )
            manifest["splits"] = {k: v for k, v in old.get("splits", {}).items() if k != split}
        manifest["splits"][split] = dict(entry)
        atomic_write_json(folder / MANIFEST, manifest)
    return manifest



def shard_paths(folder: Path, manifest: Mapping[str, Any], split: str) -> List[Tuple[str, int]]:
    """``(path, sample count)`` of every shard of ``split`` listed in the manifest.

    Raises:
        FileNotFoundError: the split is not in the manifest or a listed shard is missing.
    """
    splits = manifest.get("splits", {})
    if split not in splits:
        raise FileNotFoundError(
            f"{Path(folder) / MANIFEST}: no split '{split}' (has {sorted(splits)}). "
            f"Create it with `make data EXP=...` (data.split={split} for image folders)."
        )
    out = []
    for rec in splits[split].get("shards", []):
        path = Path(folder) / rec["name"]
        if not path.is_file():
            raise FileNotFoundError(f"shard '{path}' listed in the manifest is missing; re-run `make data EXP=...`.")
        out.append((str(path), int(rec["count"])))
    if not out:
        raise FileNotFoundError(f"{Path(folder) / MANIFEST}: split '{split}' has no shards; re-run `make data EXP=...`.")
    return out
