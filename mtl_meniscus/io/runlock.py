"""One process per run folder: an exclusive lock on RUN/.lock, held while the process works in it.

The lock is an `flock` on an open file: the operating system drops it when the process ends,
however it ends (kill -9 included), so `train --resume` after a crash finds the folder free and
a stale lock file is never a problem. Where `fcntl` does not exist (Windows) no lock is taken.

release() deletes the lock file, and the folder too if the lock created it and nothing was
written there (a run refused for bad data leaves no trace). Deleting a lock file races with a
process that opened it just before: that process would lock a file no longer in the folder while a
third creates a new one. So a lock counts only when the file it holds is still the one at the path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.io.outputs import check_output_dir, naming, process_alive

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
        self._created_folder = not Path(folder).exists()
        self.folder = check_output_dir(folder, what)
        self.path = self.folder / LOCK_FILE
        self._handle = None
        if fcntl is None:  # pragma: no cover - Windows
            return
        while self._handle is None:  # again when the locked file was deleted by its last holder
            self._handle = self._lock_file()

    def _lock_file(self):
        """The open, locked lock file; None when it is no longer the file at the path."""
        self.folder.mkdir(parents=True, exist_ok=True)  # its last holder may have deleted it
        try:
            handle = self.path.open("a+")
        except FileNotFoundError:  # deleted again between the two lines: try again
            return None
        if not lock_now(handle):
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise FolderInUseError(
                f"{self.folder} is in use by another process"
                + (f" (pid {holder})" if holder.isdigit() else "")
                + ": wait until it ends, or use another output folder"
            )
        if not still_at(self.path, handle):
            handle.close()
            return None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        except OSError as err:  # a full disk: name the file, as every write does
            handle.close()
            raise naming(err, self.path) from None
        return handle

    def release(self) -> None:
        if self._handle is None:
            return
        # while still held: see the module's docstring; a folder made read-only meanwhile keeps
        # the file (released all the same), and the error that stopped the work is the one told
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None
        with contextlib.suppress(OSError):  # made by this lock and left empty: a refused run leaves nothing
            if self._created_folder and not any(self.folder.iterdir()):
                self.folder.rmdir()


def lock_now(handle) -> bool:
    """Take an exclusive flock on the open file `handle` without waiting: False when another
    process (or another open of the file) holds it. Always True where fcntl does not exist."""
    if fcntl is None:  # pragma: no cover - Windows
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def still_at(path: Path, handle) -> bool:
    """Whether the open file `handle` is still the file at `path`: not renamed or deleted since it
    was opened (by a lock's last holder, while this process waited to lock it)."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def lock_holder(folder: str | Path) -> int | None:
    """The pid of another live process that holds `folder`'s lock (a training writing the run),
    else None. Read from the lock file, which holds its holder's pid and is deleted when the lock
    is released; after a kill -9 it stays, with a pid no longer alive."""
    try:
        pid = (Path(folder) / LOCK_FILE).read_text().strip()
    except OSError:
        return None
    if not pid.isdigit() or int(pid) == os.getpid() or not process_alive(int(pid)):
        return None
    return int(pid)


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "run folder") -> Iterator[RunLock]:
    """RunLock(folder) for the block: another process holding it is refused at once (FolderInUseError)."""
    lock = RunLock(folder, what)
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def waiting_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive flock on the file `path` (created) for the block, waiting while another
    process holds it: for work that one process does and the others then use, such as a cache
    entry. The file stays (deleting it would race, as for RunLock); the lock dies with its process."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
