"""Safe checkpoint reading and writing: tensors only, never arbitrary unpickling.

``.safetensors`` files are read with safetensors; everything else with
``torch.load(weights_only=True)``, which refuses any pickle that would construct arbitrary
objects or call functions. The one non-tensor class admitted is ``argparse.Namespace``
(a plain attribute bag that training scripts such as REPA's store under ``"args"``).

Memory: ``load_weights`` maps the file instead of reading it (``torch.load(mmap=True)``, or
safetensors' lazy ``safe_open``) and copies only the chosen weights (e.g. ``ema`` of a REPA
training checkpoint) into memory, so ``model`` and the optimizer state are never read; each
tensor's mapped pages are given back as soon as it is copied, so the peak is about one copy
of the chosen weights.

bafm's own exports are ``<stem>.safetensors`` plus ``<stem>.json`` (the model config); the
same JSON is also stored in the safetensors metadata so a lone weights file stays usable.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import pickle
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from bafm.io import atomic_path, atomic_write_text

CONFIG_METADATA_KEY = "bafm_config"
# Phrases of torch's weights-only unpickler when it refuses a class (rather than failing to parse).
REFUSED_PICKLE_MARKERS = ("Unsupported global", "is blocked", "allowlisted")
# Wrapper prefixes added by DistributedDataParallel / DataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or does not match the requested model."""


def config_path(path: str | Path) -> Path:
    """The JSON config that sits beside a weights file: ``dir/<stem>.json``."""
    path = Path(path)
    return path.with_name(path.stem + ".json")


def _starts_like_pickle(path: Path) -> bool:
    """A pickle of protocol 2-5 (PROTO opcode) or a ``torch.save`` zip archive."""
    with open(path, "rb") as f:
        head = f.read(4)
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head == b"PK\x03\x04"


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """A ``.safetensors`` file opened lazily: the names come from its header, a tensor is read on access."""

    def __init__(self, path: str | Path) -> None:
        """Read the header of ``path`` (no tensor data)."""
        self.path = Path(path)
        with safe_open(str(self.path), framework="pt") as handle:
            self._names = list(handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self.read([name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def read(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """Copies of the tensors ``names`` (on the CPU), read through one handle."""
        with safe_open(str(self.path), framework="pt") as handle:
            return {name: handle.get_tensor(name).clone() for name in names}


def read_checkpoint(path: str | Path, *, mmap: bool = False) -> Any:
    """Read a checkpoint without executing any code from it.

    Args:
        path: ``.safetensors`` file, or a ``.pt``/``.pth``/``.ckpt`` file written by ``torch.save``.
        mmap: map the file instead of reading it: safetensors give a lazy ``SafetensorsFile``,
            ``torch.save`` zip archives tensors backed by the file's pages (legacy non-zip files
            are read whole). Such tensors must be copied (``load_weights`` does) before the
            file may change.

    Returns:
        For safetensors, a flat ``{name: tensor}`` mapping (on CPU); otherwise the unpickled
        object (usually a state dict or a training-checkpoint dict).

    Raises:
        CheckpointError: the file is missing, unreadable, or needs arbitrary unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        try:
            return SafetensorsFile(path) if mmap else load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable checkpoint (cannot read as safetensors: {err})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # Damaged files read as odd pickle protocols; the error below says what matters.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # torch.load can map only zip archives (torch.save's format since 1.6).
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        if not (any(marker in str(err) for marker in REFUSED_PICKLE_MARKERS) or _starts_like_pickle(path)):
            # Random bytes or a damaged pickle, not a refused class.
            raise CheckpointError(f"{path}: not a readable checkpoint (corrupt, truncated or not a "
                                  f"torch.save/safetensors file)") from None
        reason = next((line.strip() for line in str(err).splitlines()
                       if "GLOBAL" in line or "Unsupported" in line), type(err).__name__)
        raise CheckpointError(
            f"{path}: refused to load. The file holds Python objects beyond tensors, and unpickling "
            f"them could run arbitrary code ({reason}). If you trust its origin, re-save only the "
            f"weights in a separate trusted session (e.g. torch.save(obj['ema'], 'weights.pt'), or "
            f"safetensors.torch.save_file) and load that file instead."
        ) from None
    except Exception as err:  # random or truncated bytes fail in many ways (IndexError, EOFError, ...)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None


def read_metadata_config(path: str | Path) -> Optional[Dict[str, Any]]:
    """The bafm config embedded in a ``.safetensors`` header, or None."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError):
        return None
    text = metadata.get(CONFIG_METADATA_KEY)
    return json.loads(text) if text else None


def read_config(path: str | Path) -> Optional[Dict[str, Any]]:
    """The model config of a bafm export: ``<stem>.json`` beside it, else the safetensors metadata.

    Args:
        path: the weights file.

    Returns:
        The config dict, or None for a checkpoint without one (e.g. a public release).

    Raises:
        CheckpointError: the JSON file exists but is not a JSON object.
    """
    json_file = config_path(path)
    if json_file.is_file():
        try:
            config = json.loads(json_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{json_file}: invalid JSON: {err}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{json_file}: expected a JSON object, got {type(config).__name__}")
        return config
    return read_metadata_config(path)


def select_state_dict(obj: Any, path: str | Path, preferred: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Pick the weights out of a checkpoint object and strip wrapper prefixes.

    Args:
        obj: what :func:`read_checkpoint` returned.
        path: the file (for messages).
        preferred: top-level keys to try in order (e.g. ``("ema", "model")``); if none is
            present the object itself must be a state dict. In a flat safetensors file the
            group ``<key>.*`` of the first preferred key with such names is taken.

    Returns:
        ``{parameter name: tensor}`` without ``module.`` / ``_orig_mod.`` prefixes (for a
        ``SafetensorsFile``, only the chosen tensors are read).

    Raises:
        CheckpointError: no state dict found, naming the top-level keys seen.
    """
    if isinstance(obj, SafetensorsFile):
        for key in preferred:
            group = [name for name in obj if name.startswith(f"{key}.")]
            if group:
                return {strip_prefixes(name[len(key) + 1 :]): t for name, t in obj.read(group).items()}
        return {strip_prefixes(name): t for name, t in obj.read(obj).items()}
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    for key in preferred:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    else:
        if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            keys = ", ".join(repr(k) for k in list(obj)[:10])
            raise CheckpointError(
                f"{path}: no weights found: expected one of {list(preferred)} or a flat state dict "
                f"of tensors; top-level keys are: {keys}"
            )
    state = {}
    for name, tensor in obj.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry '{name}' is a {type(tensor).__name__}, not a tensor")
        state[strip_prefixes(str(name))] = tensor
    return state


def load_weights(path: str | Path, preferred: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The chosen weights of a checkpoint, and only those, copied into memory.

    The file is mapped (``read_checkpoint(mmap=True)``); the state dict under the first
    ``preferred`` key is selected (see :func:`select_state_dict`) and each of its tensors is
    copied, after which its pages of the mapping are released. Other entries (the raw
    ``model`` next to ``ema``, optimizer moments) are never read from disk.

    Args:
        path: checkpoint file (see :func:`read_checkpoint`).
        preferred: top-level keys to try in order, e.g. ``("ema", "model")``.

    Returns:
        ``{parameter name: tensor}`` in private CPU memory, independent of the file.

    Raises:
        CheckpointError: as :func:`read_checkpoint` and :func:`select_state_dict`.
    """
    obj = read_checkpoint(path, mmap=True)
    if isinstance(obj, SafetensorsFile):
        return select_state_dict(obj, path, preferred)  # read tensor by tensor: already copies
    state = select_state_dict(obj, path, preferred)
    del obj  # the unchosen entries stay unread pages of the mapping
    mapped = zipfile.is_zipfile(path)  # legacy files were read whole: nothing to release
    return {name: _copy_and_release(tensor, mapped) for name, tensor in state.items()}


_MADV_DONTNEED = 4  # Linux: drop the pages; a clean private file mapping re-reads them on access
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _copy_and_release(tensor: torch.Tensor, mapped: bool) -> torch.Tensor:
    """A private copy of a CPU tensor; if it is ``mapped`` from a file, its whole pages are then dropped.

    Without the release, every copied tensor's file pages would stay resident until the whole
    mapping is closed, doubling the peak. Dropping clean pages of a private file mapping is
    safe: they are read from the file again if touched.
    """
    copy = tensor.clone(memory_format=torch.preserve_format)
    nbytes = tensor.untyped_storage().nbytes()
    # Only for a private file mapping: on ordinary memory MADV_DONTNEED would zero the pages.
    if mapped and _LIBC is not None and nbytes >= 2 * mmap.PAGESIZE:
        start = tensor.untyped_storage().data_ptr()
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the storage only
        last = (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
    return copy


def strip_prefixes(name: str) -> str:
    """Remove leading ``module.`` / ``_orig_mod.`` wrappers (in any order, repeated)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def cast_state_dict(state: Dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    """Cast floating-point tensors to ``dtype`` (None keeps them as stored)."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def check_against(
    expected: Mapping[str, torch.Size | Tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    what: str,
    hint: str = "",
    limit: int = 8,
) -> None:
    """Strict key-and-shape check of a state dict against a model's, with a readable error.

    Args:
        expected: the model's ``{name: shape}``.
        state: the checkpoint's tensors.
        path: the file (for messages).
        what: description of the model (e.g. ``"SiT-XL/2 (depth 28, hidden 1152)"``).
        hint: extra sentence appended to the error (e.g. what the tensors look like).
        limit: how many entries of each kind to list.

    Raises:
        CheckpointError: any missing key, unexpected key or shape mismatch, listing the first ones.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {'; '.join(items[:limit])}{more}")
    message = f"{path}: checkpoint does not match {what}. " + ". ".join(parts) + "."
    raise CheckpointError(message + (f" {hint}" if hint else ""))


def write_weights(state: Mapping[str, torch.Tensor], path: str | Path, config: Dict[str, Any]) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json``, each atomically.

    Args:
        state: the weights (any device/dtype; stored as given, on CPU).
        path: target; must end in ``.safetensors``.
        config: JSON-serialisable model config (also embedded in the safetensors metadata).

    Returns:
        The path of the JSON config written.

    Raises:
        CheckpointError: the suffix is not ``.safetensors``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"export path '{path}' must end in .safetensors")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    text = json.dumps(config, indent=2, sort_keys=True)
    # Weights first, then the JSON: each file is replaced atomically (temp file + rename).
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={CONFIG_METADATA_KEY: text})
    json_file = config_path(path)
    atomic_write_text(json_file, text + "\n")
    return json_file


def block_indices(state: Iterable[str], prefix: str = "blocks.") -> List[int]:
    """Sorted distinct indices ``i`` of keys ``{prefix}{i}.*``."""
    found = set()
    for key in state:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)
