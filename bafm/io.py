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
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


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


def tracked_files(path: str | Path) -> list[Path]:
    """Files that git tracks at ``path`` (a file) or under it (a folder); empty outside a git checkout.

    Asks the checkout that contains ``path``'s nearest existing folder (``git ls-files``), so
    it holds for any working folder. Without git, or outside a checkout, nothing is tracked.
    """
    path = Path(path).absolute()
    existing = path if path.is_dir() else path.parent
    while not existing.is_dir() and existing != existing.parent:
        existing = existing.parent
    try:
        done = subprocess.run(["git", "-C", str(existing), "ls-files", "-z", "--full-name", "--", str(path)],
                              capture_output=True, timeout=60)
        top = subprocess.run(["git", "-C", str(existing), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0 or top.returncode != 0:
        return []  # not a checkout
    root = Path(top.stdout.strip())
    return [root / name for name in done.stdout.decode().split("\0") if name]


def check_not_tracked(path: str | Path, what: str, hint: str,
                      writes: Optional[Callable[[Path], bool]] = None) -> None:
    """Refuse to write ``path`` (a file, or a folder a command fills) over files that git tracks.

    Args:
        path: the file or folder about to be written.
        what: the command and what it writes there, e.g. ``"bafm train's run folder"``.
        hint: what to do instead (one clause).
        writes: for a folder, which of its files the command writes (default: any).

    Raises:
        OutputFolderError: one line naming the tracked files found.
    """
    found = [p for p in tracked_files(path) if writes is None or writes(p)]
    if found:
        names = ", ".join(f"'{p}'" for p in found[:3]) + (f" (+{len(found) - 3} more)" if len(found) > 3 else "")
        raise OutputFolderError(f"{what} '{Path(path).absolute()}' would overwrite files committed to git ({names}); "
                                f"{hint}")


_RENAME_EXCHANGE = 2  # Linux renameat2 flag: swap two existing paths in one step
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` atomically (Linux ``renameat2``); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def replace_folder(staging: str | Path, dest: str | Path) -> Path:
    """Put the complete folder ``staging`` in place of ``dest``, whose old content goes as a whole.

    ``staging`` must be a sibling of ``dest`` (same filesystem). Where the kernel can swap two
    folders in one step (Linux), a reader sees the old set of files or the new one, never a mix or
    nothing; elsewhere the old folder is renamed aside first, a moment in which ``dest`` is absent.

    Returns:
        ``dest`` as a ``Path``.
    """
    import shutil

    staging, dest = Path(staging), Path(dest)
    if not dest.exists():
        os.replace(staging, dest)
    elif _exchange(staging, dest):
        shutil.rmtree(staging)  # now the old content
    else:
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(staging, dest)
        shutil.rmtree(old)
    _fsync_dir(dest.parent)
    return dest


def staging_folder(dest: str | Path) -> Path:
    """A new, empty hidden sibling of ``dest`` to write a set of outputs into before ``replace_folder``.

    Siblings left by processes that no longer run (killed mid-write) are removed first.
    """
    import shutil

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.partial-"
    for left in dest.parent.glob(prefix + "*"):
        pid = left.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    staging = dest.with_name(f"{prefix}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
