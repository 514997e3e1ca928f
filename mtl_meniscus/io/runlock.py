"""One process per run folder: an exclusive lock on RUN/.lock, held while the process works in it.

The lock is an `flock` on an open file: the operating system drops it when the process ends,
however it ends (kill -9 included), so `train --resume` after a crash finds the folder free and
a stale lock file is never a problem. Where `fcntl` does not exist (Windows) no lock is taken.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.io.outputs import check_output_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".lock"


class FolderInUseError(MeniscusError):
    """Another live process holds the folder's lock."""


class RunLock:
    """The held lock of one folder; release() (or process exit) frees it."""

    def __init__(self, folder: str | Path, what: str = "run folder"):
        self.folder = check_output_dir(folder, what)
        self.path = self.folder / LOCK_FILE
        self._handle = None
        if fcntl is None:  # pragma: no cover - Windows
            return
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise FolderInUseError(
                f"{self.folder} is in use by another process"
                + (f" (pid {holder})" if holder.isdigit() else "")
                + ": wait until it ends, or use another output folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


@contextlib.contextmanager
def locked_folder(folder: str | Path, what: str = "run folder") -> Iterator[Path]:
    """Hold `folder`'s lock for the block; refuses (FolderInUseError) a folder another process holds."""
    lock = RunLock(folder, what)
    try:
        yield lock.folder
    finally:
        lock.release()
