"""An output table written a chunk of inputs at a time, so that a killed command loses at most the
chunk it was working on (predict on a folder of 100 000 slices runs for hours on a CPU).

While it is written the table is `<out>.partial`, and `<out>.partial.json` records how many inputs
it holds, how many of them failed, its length in bytes after the last whole chunk, and the settings
it was made with (model file, threshold, TTA, the inputs themselves...). The same command again finds
both, cuts the table back to that length (a kill during a write leaves half a row) and continues
after those inputs; other settings start the table over. When every input is in, it is renamed to
`<out>`. An flock on `<out>.partial` keeps a second process from writing the same table meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.io.outputs import OutputError, naming, write_text_atomic
from mtl_meniscus.io.runlock import lock_now, still_at

# The unfinished table and its progress file: <out> + these
PARTIAL_SUFFIX, PROGRESS_SUFFIX = ".partial", ".partial.json"


def fingerprint(names: list[str]) -> str:
    """A short digest of a list of names (the inputs, in order): the settings hold it, not the list."""
    return hashlib.sha256("\0".join(names).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def file_stamp(path: Path) -> list[int] | None:
    """[size, modification time in ns] of a file (None if absent): a replaced model file differs."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def inputs_stamp(paths: list[str]) -> str:
    """A short digest of the inputs' file_stamps (an exam folder's: of the files in it, which its
    reader reads; a table's own OUT.partial files written there left out): an input rewritten since
    a table was begun, under the same name, gives another digest."""
    stamps = []
    for name in paths:
        path = Path(name)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        own = (PARTIAL_SUFFIX, PROGRESS_SUFFIX)
        stamps += [f"{file}:{file_stamp(file)}" for file in files if not file.name.endswith(own)]
    return fingerprint(stamps)


class ResumableTable:
    """`<out>` in the making. `done` and `failed` count the inputs it already holds (0 for a new
    table); add() appends the rows of the next inputs, finish() renames it into place. `note` says
    what became of an earlier unfinished table ('' when there was none)."""

    def __init__(self, out: Path, header: str, settings: dict[str, Any]):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        self.progress = self.out.with_name(self.out.name + PROGRESS_SUFFIX)
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the file
        existed = self._open_locked()
        try:
            saved = self._saved_progress() if existed else None
        except OutputError:
            self.close()
            raise
        self.done, self.failed, self.note = 0, 0, ""
        if saved is not None and saved.get("settings") == self.settings:
            self.done, self.failed = saved["inputs"], saved["failed"]
            self._handle.truncate(saved["bytes"])  # half a row of a chunk that was being written
            self.note = f"continuing the interrupted {self.partial} (inputs already done: {self.done})"
        else:
            if saved is not None:
                self.note = f"{self.partial}: an unfinished table of other settings, started over"
            # emptied first, then the old record goes: at any moment (a kill, a failed write) the
            # table is empty or its record describes it (an old record of more bytes than an empty
            # table reads as no table), never rows without a record, which are refused as foreign
            self._handle.truncate(0)
            self.progress.unlink(missing_ok=True)
            try:
                self._append(header)
                self._save_progress()
            except OSError:
                with contextlib.suppress(OSError):
                    self._handle.truncate(0)
                self.close()
                raise

    def _saved_progress(self) -> dict[str, Any] | None:
        """The progress file's record; None when there is no unfinished table. A `<out>.partial`
        that the progress file does not describe is someone else's file: refused, not replaced."""
        try:
            saved = json.loads(self.progress.read_text(encoding="utf-8"))
            int(saved["inputs"]), int(saved["failed"]), int(saved["bytes"])
            if saved["bytes"] > self.partial.stat().st_size:
                raise ValueError("the table is shorter than recorded")
            return saved
        except (OSError, ValueError, KeyError, TypeError):
            if self.partial.stat().st_size == 0:
                return None
            raise OutputError(
                f"{self.partial} exists, and {self.progress.name} does not describe it as an unfinished "
                "table of this command: it is not replaced; move it aside, or choose another --out"
            ) from None

    def _open_locked(self) -> bool:
        """Open `<out>.partial` (not truncated before the lock is held) and lock it; whether it
        existed. The file locked must still be the one of that name: a writer that finished while
        this one waited renamed it into `<out>`, which must not be written again; then open anew."""
        for _ in range(3):
            existed = self.partial.exists()
            self._handle = self.partial.open("ab")
            if not lock_now(self._handle):
                self._handle.close()
                raise MeniscusError(
                    f"{self.partial}: another process is writing this table now; wait for it, or choose "
                    "another --out"
                )
            if still_at(self.partial, self._handle):
                return existed
            self._handle.close()
        raise MeniscusError(
            f"{self.partial}: replaced again and again while opening it; is another predict running?"
        )

    def _append(self, text: str) -> None:
        try:
            self._handle.write(text.encode("utf-8"))
            self._handle.flush()
            os.fsync(self._handle.fileno())  # on disk before the progress file counts it
        except OSError as err:  # a full disk: name the table, as every write does
            raise naming(err, self.partial) from None

    def _save_progress(self, done: int = 0, failed: int = 0) -> None:
        """Record the table with `done` more inputs, `failed` of them failed; the counts count them
        once the record is written (a failed write keeps the counts the record on disk has)."""
        record = {
            "inputs": self.done + done,
            "failed": self.failed + failed,
            "bytes": os.fstat(self._handle.fileno()).st_size,
            "settings": self.settings,
        }
        write_text_atomic(self.progress, json.dumps(record, indent=1))
        self.done, self.failed = record["inputs"], record["failed"]

    def add(self, text: str, inputs: int, failed: int) -> None:
        """Append the rows (`text`, whole lines) of the next `inputs` inputs, `failed` of them failed."""
        self._append(text)
        self._save_progress(inputs, failed)

    def finish(self) -> None:
        """The whole table becomes `<out>` (replacing an earlier output); the progress file goes."""
        os.replace(self.partial, self.out)
        self.progress.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        """Release the table unfinished (an interruption): the same command continues it."""
        if not self._handle.closed:
            self._handle.close()
