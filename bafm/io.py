"""Atomic file writing: the one way bafm puts a file on disk.

Every writer goes through a temporary file in the target's own folder (so the final rename
never crosses a filesystem, whatever ``$TMPDIR`` is), named uniquely per process and call,
flushed and fsynced, given the permissions a plain ``open`` would give, then renamed over the
target. A reader therefore sees either the old file or the new one, never half of one, and a
failed write leaves no temporary file behind.

Example:
    >>> atomic_write_text(out / "results.md", table)
    >>> with atomic_path(out / "weights.safetensors") as tmp:
    ...     safetensors.torch.save_file(state, tmp)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _file_mode() -> int:
    """``0o666`` less the process umask: what ``open(path, "w")`` would create."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a folder be opened for it.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    For writers that need a file name (``safetensors.torch.save_file``, ``torch.save``,
    ``tarfile``). The temporary file exists (empty) when the block starts. If the block
    raises, the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the final file; its folder is created if missing.

    Yields:
        The temporary file's path, in the same folder as ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: the final file; its folder is created if missing.
        data: the file's whole content.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see ``atomic_write_bytes``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, sort_keys: bool = False) -> Path:
    """Write ``obj`` as indented JSON (plus a final newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(lock: str | Path) -> Iterator[None]:
    """Exclusive advisory lock held from a read to the atomic write of a shared file.

    Processes that merge into one file (a manifest, a grid table) hold it so that none of them
    overwrites what another added in between. ``lock`` is either an existing folder (locked
    itself, so nothing is left behind in it) or a lock file, created if missing.
    """
    lock = Path(lock)
    if lock.is_dir():
        fd = os.open(lock, os.O_RDONLY)
    else:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class OutputFolderError(ValueError):
    """An output folder that cannot be created or written."""


def check_output_folder(folder: str | Path) -> Path:
    """Prove that ``folder`` can be created (if missing) and written, before any expensive work.

    Nothing is left behind: the check writes and removes a probe file in ``folder``, or in its
    nearest existing ancestor when ``folder`` does not exist yet (creating it later then works).

    Args:
        folder: where a command will write its outputs.

    Returns:
        ``folder`` as a ``Path``.

    Raises:
        OutputFolderError: it, or an ancestor, is a file, or it cannot be written (one line).
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is an existing file" if existing == folder else f"lies under the file '{existing}'"
        raise OutputFolderError(f"output folder '{folder}' {what}; pass a folder (--out)")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputFolderError(
            f"output folder '{folder}' cannot be written ({err.strerror or err}); pass another one (--out)"
        ) from None
    return folder
