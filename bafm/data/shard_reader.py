"""Reading latent shards fast: memory-mapped tar parsing and per-sample checks, no copies."""

from __future__ import annotations

import mmap
import os
import zlib
from typing import Any, Dict, Iterator, Mapping, NamedTuple, Optional, Tuple

import numpy as np
import webdataset as wds

from bafm.data.manifest import CLS, MOMENTS, MOMENTS_FLIP, ShardError
from bafm.data.npy_codec import parse_npy_header


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
    """One validated sample: key, shard, payloads of the moments and the class id (and extra arrays)."""

    key: str
    shard: str
    moments: memoryview
    moments_flip: Optional[memoryview]
    cls: int
    extra: Optional[Dict[str, memoryview]] = None  # float16 .npy payloads by member name


def check_sample(sample: Mapping[str, Any], moments_shape: Tuple[int, ...], num_classes: int,
                 extra_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None) -> LatentSample:
    """Validate one raw sample against the manifest.

    Args:
        sample: output of ``iter_samples``.
        moments_shape: expected ``(2C, H, W)``.
        num_classes: class ids must lie in ``[0, num_classes)``.
        extra_shapes: more float16 ``.npy`` members every sample must hold, by member name
            (e.g. ``{"prompt_embeds.npy": (L, D)}``), checked like the moments.

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
    if not extra_shapes:
        return LatentSample(key, shard, moments, flip, cls)
    extra = {}
    for name, shape in extra_shapes.items():
        if name not in sample:
            raise ShardError(shard, f"missing '{name}' (has {sorted(k for k in sample if not k.startswith('__'))})", key)
        _check_moments(sample[name], name, tuple(shape), shard, key)
        extra[name] = sample[name]
    return LatentSample(key, shard, moments, flip, cls, extra)


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
