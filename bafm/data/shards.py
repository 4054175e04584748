"""WebDataset latent shards: atomic writer, manifest and fast readers.

A shard ``<split>-%06d.tar`` holds one sample per image: ``<key>.moments.npy`` (float16
``(2C, H, W)``: posterior mean then std), optionally ``<key>.moments_flip.npy`` (the same for
the horizontally flipped image) and ``<key>.cls`` (the class id as decimal text). Shards are
written under a temporary name and renamed only once complete, so a reader never sees half a
shard; a small JSON record per finished shard (in ``.records/``) keeps its sample count and
sha256. ``manifest.json`` describes the whole dataset folder and is replaced atomically.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import io
import json
import math
import mmap
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np
import webdataset as wds

from bafm.io import atomic_write_json

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


def shard_name(split: str, index: int) -> str:
    """``<split>-%06d.tar``, the file name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


# ----------------------------------------------------------------------------- checksums


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- .npy payloads


def encode_npy(array: np.ndarray) -> bytes:
    """Serialise an array as a ``.npy`` payload (format 1.0, no pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class NpyHeader:
    """Parsed ``.npy`` header: element type, shape, where the data start and their size."""

    dtype: np.dtype
    shape: Tuple[int, ...]
    offset: int
    nbytes: int


_HEADER_CACHE: Dict[bytes, NpyHeader] = {}


def parse_npy_header(data: bytes | memoryview) -> NpyHeader:
    """Parse and check a ``.npy`` header without copying the data.

    Every sample of a dataset has the same header, so parsed headers are cached by their
    bytes: checking a payload costs a dict look-up instead of ``np.load``'s full parse.

    Raises:
        ValueError: not a ``.npy`` payload, Fortran order, or a payload whose length does not
            match the header.
    """
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy payload (bad magic)")
    major = data[6]
    if major == 1:
        offset = 10 + int.from_bytes(data[8:10], "little")
    elif major in (2, 3):
        offset = 12 + int.from_bytes(data[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy format version {major}")
    prefix = bytes(data[:offset])
    head = _HEADER_CACHE.get(prefix)
    if head is None:
        try:
            meta = ast.literal_eval(prefix[10 if major == 1 else 12 :].decode("latin1"))
            dtype = np.lib.format.descr_to_dtype(meta["descr"])
            shape = tuple(int(s) for s in meta["shape"])
            fortran = bool(meta["fortran_order"])
        except (ValueError, SyntaxError, KeyError, TypeError) as err:
            raise ValueError(f"unreadable .npy header: {err}") from None
        if fortran:
            raise ValueError("Fortran-ordered .npy payloads are not supported")
        if len(_HEADER_CACHE) > 256:
            _HEADER_CACHE.clear()
        head = _HEADER_CACHE[prefix] = NpyHeader(dtype, shape, offset, dtype.itemsize * math.prod(shape))
    if len(data) - offset != head.nbytes:
        raise ValueError(f".npy payload has {len(data) - offset} data bytes, header {head.shape} {head.dtype} needs {head.nbytes}")
    return head


def decode_npy(data: bytes | memoryview) -> np.ndarray:
    """Decode a ``.npy`` payload into a read-only array that shares ``data``'s memory."""
    head = parse_npy_header(data)
    return np.frombuffer(data, dtype=head.dtype, count=head.nbytes // head.dtype.itemsize,
                         offset=head.offset).reshape(head.shape)


# ----------------------------------------------------------------------------- writing


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

    def write(self, key: str, moments: np.ndarray, cls: int, moments_flip: Optional[np.ndarray] = None) -> None:
        """Append one sample.

        Args:
            key: sample key, without dots (WebDataset splits names at the first dot).
            moments: float16 ``(2C, H, W)``, posterior mean then std.
            cls: class id.
            moments_flip: float16 ``(2C, H, W)`` of the flipped image, or None.
        """
        if "." in key or "/" in key:
            raise ValueError(f"sample key '{key}' must not contain '.' or '/'")
        sample: Dict[str, Any] = {"__key__": key, MOMENTS: encode_npy(moments), CLS: str(int(cls)).encode()}
        if moments_flip is not None:
            sample[MOMENTS_FLIP] = encode_npy(moments_flip)
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


# ----------------------------------------------------------------------------- manifest


@contextlib.contextmanager
def manifest_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock for read-modify-write of ``manifest.json`` across processes."""
    lock = Path(folder) / RECORDS_DIR / "manifest.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_manifest(folder: Path) -> Dict[str, Any]:
    """Load ``<folder>/manifest.json``.

    Raises:
        FileNotFoundError: no manifest, with the command that writes one.
        ValueError: unreadable or of another format.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no latent shards at '{folder}' ({MANIFEST} missing). Create them with "
            f"`make data EXP=experiments/<name>.yaml` (or `bafm data --config ...`)."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format '{manifest.get('format')}', expected '{FORMAT}'")
    return manifest


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
        ValueError: ``common`` disagrees with the manifest already in ``folder``.
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
                raise ValueError(
                    f"{folder / MANIFEST}: split(s) {others} were written with other settings: {was}. "
                    f"Use another data.dataset or delete the folder."
                )
            manifest["splits"] = {k: v for k, v in old.get("splits", {}).items() if k != split}
        manifest["splits"][split] = dict(entry)
        atomic_write_json(folder / MANIFEST, manifest)
    return manifest


# ----------------------------------------------------------------------------- reading


_ZERO_BLOCK = bytes(512)


def _octal(field: bytes) -> int:
    """Numeric tar header field: octal text, or GNU base-256 when the high bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.replace(b"\0", b" ").strip()
    return int(text, 8) if text else 0


def open_shard(url: str) -> bytes | mmap.mmap:
    """A shard's bytes: memory-mapped for local paths (no copy; pages load on first touch),
    read whole through ``webdataset.gopen`` for other URLs (``pipe:``, ``http://``, ...).

    Shards are only ever replaced by rename, never rewritten in place, so a mapping stays valid.
    """
    if url.startswith("file:"):
        url = url[7:] if url.startswith("file://") else url[5:]
    if ":" in url.split("/", 1)[0]:
        with wds.gopen(url, "rb") as f:
            return f.read()
    with open(url, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def iter_tar_members(data: bytes | mmap.mmap, shard: str) -> Iterator[Tuple[str, memoryview]]:
    """Regular files of an in-memory tar archive as ``(name, payload)``, without copies.

    Understands ustar, GNU long names and pax ``path``/``size`` records. Header checksums are
    verified and the end-of-archive marker is required, so a truncated or damaged shard fails
    here rather than silently yielding fewer samples.

    Raises:
        ShardError: truncated archive, bad header checksum or malformed header.
    """
    view = memoryview(data)
    pos, end = 0, len(data)
    long_name: Optional[str] = None
    pax: Dict[str, str] = {}
    while pos + 512 <= end:
        header = data[pos : pos + 512]
        if header == _ZERO_BLOCK:
            return
        try:  # fast path: the usual zero-padded octal fields
            stored, size = int(header[148:154], 8), int(header[124:135], 8)
        except ValueError:
            try:
                stored, size = _octal(header[148:156]), _octal(header[124:136])
            except ValueError:
                raise ShardError(shard, f"corrupt tar header at byte {pos}") from None
        # The tar checksum is the byte sum with the checksum field read as spaces. Adler-32's low
        # half is 1 + byte sum (mod 65521) and runs in C: ~20x faster than sum(header).
        if (stored + sum(header[148:156]) - 255) % 65521 != zlib.adler32(header) & 0xFFFF:
            raise ShardError(shard, f"corrupt tar header at byte {pos} (checksum mismatch)")
        if "size" in pax:
            size = int(pax.pop("size"))
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:263] == b"ustar\0" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        kind = header[156:157]
        start = pos + 512
        stop = start + size
        if stop > end:
            raise ShardError(shard, f"truncated: member '{name}' needs {size} bytes, {end - start} left")
        pos = start + (size + 511) // 512 * 512
        if kind in (b"0", b"\0", b"7"):
            if long_name or pax:
                name = pax.pop("path", None) or long_name or name
                long_name = None
                pax.clear()
            yield name, view[start:stop]
        elif kind == b"L":
            long_name = bytes(view[start:stop]).rstrip(b"\0").decode("utf-8", "replace")
        elif kind == b"x":
            pax.update(_pax_records(bytes(view[start:stop])))
    raise ShardError(shard, "truncated: no end-of-archive marker")


def _pax_records(payload: bytes) -> Dict[str, str]:
    """``"<len> key=value\\n"`` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(payload):
        space = payload.index(b" ", pos)
        length = int(payload[pos:space])
        key, _, value = payload[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "replace")
        pos += length
    return records


def iter_samples(data: bytes | mmap.mmap, shard: str) -> Iterator[Dict[str, Any]]:
    """Group a shard's members into samples ``{"__key__", "__url__", <ext>: payload}``.

    Members of one sample are consecutive and named ``<key>.<ext>`` (split at the first dot of
    the base name, as WebDataset does).

    Raises:
        ShardError: tar damage, or a file name repeated within a sample.
    """
    current: Optional[Dict[str, Any]] = None
    for name, payload in iter_tar_members(data, shard):
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        if dot < 0:
            continue
        key, ext = name[:dot], name[dot + 1 :].lower()
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": shard}
        if ext in current:
            raise ShardError(shard, f"duplicate member '{name}'", key)
        current[ext] = payload
    if current is not None:
        yield current


class LatentSample(NamedTuple):
    """One validated sample: key, shard, payloads of the moments and the class id."""

    key: str
    shard: str
    moments: memoryview
    moments_flip: Optional[memoryview]
    cls: int


def check_sample(sample: Mapping[str, Any], moments_shape: Tuple[int, ...], num_classes: int) -> LatentSample:
    """Validate one raw sample against the manifest.

    Args:
        sample: output of ``iter_samples``.
        moments_shape: expected ``(2C, H, W)``.
        num_classes: class ids must lie in ``[0, num_classes)``.

    Returns:
        The sample with its payloads checked (float16, ``moments_shape``) but not yet decoded.

    Raises:
        ShardError: missing entry, wrong dtype or shape, or a bad class id; names the shard and key.
    """
    key, shard = sample["__key__"], sample["__url__"]
    if MOMENTS not in sample or CLS not in sample:
        have = sorted(k for k in sample if not k.startswith("__"))
        missing = MOMENTS if MOMENTS not in sample else CLS
        raise ShardError(shard, f"missing '{missing}' (has {have})", key)
    moments, flip = sample[MOMENTS], sample.get(MOMENTS_FLIP)
    _check_moments(moments, MOMENTS, tuple(moments_shape), shard, key)
    if flip is not None:
        _check_moments(flip, MOMENTS_FLIP, tuple(moments_shape), shard, key)
    try:
        cls = int(sample[CLS])
    except ValueError:
        raise ShardError(shard, f"'cls' is {bytes(sample[CLS])[:20]!r}, expected an integer", key) from None
    if not 0 <= cls < num_classes:
        raise ShardError(shard, f"class id {cls} outside [0, {num_classes})", key)
    return LatentSample(key, shard, moments, flip, cls)


_FLOAT16 = np.dtype(np.float16)
_ACCEPTED: Dict[Tuple[int, ...], Tuple[bytes, int]] = {}  # shape -> (good header, payload length)


def _check_moments(payload: memoryview, name: str, shape: Tuple[int, ...], shard: str, key: str) -> None:
    accepted = _ACCEPTED.get(shape)
    # Fast path: byte-identical to a header already accepted for this shape, and as long.
    if accepted is not None and len(payload) == accepted[1] and payload[: len(accepted[0])] == accepted[0]:
        return
    try:
        head = parse_npy_header(payload)
    except ValueError as err:
        raise ShardError(shard, f"'{name}': {err}", key) from None
    if head.shape != shape or head.dtype != _FLOAT16:
        raise ShardError(shard, f"'{name}' is {head.dtype} {head.shape}, expected float16 {shape}", key)
    _ACCEPTED[shape] = (bytes(payload[: head.offset]), len(payload))


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
    for rec in splits[split]["shards"]:
        path = Path(folder) / rec["name"]
        if not path.is_file():
            raise FileNotFoundError(f"shard '{path}' listed in the manifest is missing; re-run `make data EXP=...`.")
        out.append((str(path), int(rec["count"])))
    if not out:
        raise FileNotFoundError(f"{Path(folder) / MANIFEST}: split '{split}' has no shards; re-run `make data EXP=...`.")
    return out
