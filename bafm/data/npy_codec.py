"""``.npy`` payloads of the latent shards: encoding, header parsing and zero-copy decoding."""

from __future__ import annotations

import ast
import io
import math
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np


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
