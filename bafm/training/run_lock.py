"""One process per run folder: an exclusive lock taken before a run writes anything.

The lock is ``<run folder>/.lock``, held with ``flock`` for the life of the process and holding
one line about its holder (pid, host, start time, command). The kernel drops an ``flock`` when
its process dies, however it dies, so a lock file left by a killed run is stale by construction:
the next run acquires it at once, says whose it was, and takes it over. A second run while the
first is alive stops at once with one line naming the folder and the holder. A run that ends
(normally or by an exception) removes the file.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import socket
import sys
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Optional, Type

LOCK_NAME = ".lock"


class RunFolderError(ValueError):
    """A run that would mix with another run's files, or resume a checkpoint that does not fit."""


def holder_line() -> str:
    """This process as the lock file records it: ``pid <n> on <host> since <time>: <command>``."""
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    return f"pid {os.getpid()} on {socket.gethostname()} since {started}: {command}"


class RunFolderLock:
    """Exclusive lock on a run folder (a context manager).

    Args:
        folder: the run folder (created if missing: the lock file is its first write).
        command: the command named in messages, e.g. ``"bafm train"``.
    """

    def __init__(self, folder: str | Path, command: str = "bafm train") -> None:
        self.folder = Path(folder).absolute()
        self.path = self.folder / LOCK_NAME
        self.command = command
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock, or raise at once if a live process holds it.

        Raises:
            RunFolderError: another process holds the lock; names the folder and the holder.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderError(
                    f"run folder '{self.folder}' is in use by another run ({self._read_holder()}); wait for it "
                    f"to finish, or pick another name=") from None
            # The holder before us may have removed the file between our open and our flock: then
            # we locked an orphan, and a third run could lock the new file. Start again on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if previous:  # a run that died without removing its lock (killed, power loss)
            warnings.warn(f"{self.path}: taking over the stale lock of a run that is no longer running "
                          f"({previous})", stacklevel=2)
        line = (holder_line() + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)
        os.fsync(fd)

    def _read_holder(self) -> str:
        """The holder's line; a holder that has just locked may not have written it yet."""
        for _ in range(20):
            try:
                text = self.path.read_text(errors="replace").strip()
            except FileNotFoundError:
                text = ""
            if text:
                return text
            time.sleep(0.05)
        return "holder not recorded yet"

    def release(self) -> None:
        """Remove the lock file and drop the lock (removal first, while still holding it)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.release()
