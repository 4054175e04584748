"""Image-caption pairs for text-to-image data: a folder of same-stem captions, or a JSONL/CSV list.

Two layouts are understood:

* ``data.image_dir`` alone: every image under it (recursively, sorted) with a ``.txt`` file of the
  same stem beside it holding the caption (``cat.jpg`` + ``cat.txt``);
* ``data.captions_file``: a ``.jsonl`` file of ``{"path": ..., "caption": ...}`` objects, one a
  line, or a ``.csv`` file with ``path`` and ``caption`` columns (a header row). Relative paths are
  taken from ``data.image_dir`` when set, else from the list file's folder.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from bafm.data.images import IMAGE_EXTENSIONS


@dataclass
class CaptionList:
    """Images with one caption each, in a fixed order.

    Attributes:
        root: folder the paths are relative to.
        paths: image paths relative to ``root``.
        captions: caption per image (stripped; may be empty).
    """

    root: Path
    paths: List[str]
    captions: List[str]

    def __len__(self) -> int:
        return len(self.paths)


def list_caption_pairs(image_dir: str | Path = "", captions_file: str | Path = "") -> CaptionList:
    """Find the image-caption pairs of a folder or a JSONL/CSV list.

    Args:
        image_dir: folder of images with same-stem ``.txt`` captions (or the root of the list's
            relative paths).
        captions_file: optional ``.jsonl`` / ``.csv`` list of ``path`` and ``caption``.

    Returns:
        The pairs.

    Raises:
        FileNotFoundError: missing folder, list file or image, or no pairs at all.
        ValueError: a malformed list line or an image without its caption file (naming it).
    """
    if captions_file:
        return _from_list(Path(captions_file), Path(image_dir) if image_dir else None)
    root = Path(image_dir)
    if not str(image_dir) or not root.is_dir():
        raise FileNotFoundError(
            f"image folder '{image_dir}' not found: set data.image_dir to a folder of images with "
            f"same-stem .txt captions, or data.captions_file to a .jsonl/.csv of path and caption."
        )
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise FileNotFoundError(f"'{root}' holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    paths, captions = [], []
    for image in images:
        text = image.with_suffix(".txt")
        if not text.is_file():
            raise ValueError(f"image '{image}' has no caption file '{text.name}' beside it.")
        paths.append(image.relative_to(root).as_posix())
        captions.append(text.read_text(encoding="utf-8").strip())
    return CaptionList(root, paths, captions)


def _rows_jsonl(path: Path) -> List[Tuple[int, object]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg}).") from None
    return rows


def _rows_csv(path: Path, columns: Tuple[str, ...] = ("path", "caption")) -> List[Tuple[int, object]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(columns) <= set(reader.fieldnames):
            wanted = " and ".join(f"'{c}'" for c in columns)
            raise ValueError(f"{path}: expected a header row with {wanted} column(s), got {reader.fieldnames}.")
        return [(reader.line_num, row) for row in reader]


def _from_list(list_file: Path, image_dir: Path | None) -> CaptionList:
    if not list_file.is_file():
        raise FileNotFoundError(f"captions file '{list_file}' not found (data.captions_file).")
    suffix = list_file.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"captions file '{list_file}': expected a .jsonl or .csv file, got '{suffix}'.")
    rows = _rows_jsonl(list_file) if suffix == ".jsonl" else _rows_csv(list_file)
    root = image_dir if image_dir is not None else list_file.parent
    paths, captions = [], []
    for number, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not isinstance(row.get("caption"), str):
            raise ValueError(f"{list_file}:{number}: expected string fields 'path' and 'caption', got {row!r:.80}.")
        if not (root / row["path"]).is_file():
            raise FileNotFoundError(f"{list_file}:{number}: image '{root / row['path']}' not found.")
        paths.append(row["path"])
        captions.append(row["caption"].strip())
    if not paths:
        raise FileNotFoundError(f"captions file '{list_file}' lists no images.")
    return CaptionList(root, paths, captions)


def read_prompts(path: str | Path) -> List[str]:
    """Prompts for evaluation: a ``.txt`` file (one a line), or the ``caption`` field of a ``.jsonl`` /
    ``.csv`` file (e.g. COCO-2014 validation captions exported as ``{"caption": ...}`` lines).

    Raises:
        FileNotFoundError: no such file, or no prompts in it.
        ValueError: another suffix, or a line without a string ``caption``.
    """
    path = Path(path)
    if not str(path) or not path.is_file():
        raise FileNotFoundError(f"captions file '{path}' not found (eval.captions_file): .txt, .jsonl or .csv of prompts.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix in (".jsonl", ".csv"):
        rows = _rows_jsonl(path) if suffix == ".jsonl" else _rows_csv(path, ("caption",))
        prompts = []
        for number, row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("caption"), str):
                raise ValueError(f"{path}:{number}: expected a string field 'caption', got {row!r:.80}.")
            prompts.append(row["caption"].strip())
    else:
        raise ValueError(f"captions file '{path}': expected .txt, .jsonl or .csv, got '{suffix}'.")
    if not prompts:
        raise FileNotFoundError(f"captions file '{path}' holds no prompts.")
    return prompts
