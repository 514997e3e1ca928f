"""Where results go: output locations checked before any work, and files written atomically.

`check_output_file` / `check_output_dir` run before a command computes anything, so a bad
`--out` (a folder where a file is wanted, a file where a folder is wanted, a folder that cannot
be written) is reported at once instead of after every prediction. An output replaces only what
its command wrote (check_output_file's `written_here`, check_own_output_dir's mark), never an
input, a checkpoint or a label file given as --out by mistake. `atomic_write` writes to a
temporary file next to the target and renames it: a reader never sees a half-written file, and
the temporary file is removed if writing fails.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from mtl_meniscus.errors import MeniscusError


class OutputError(MeniscusError):
    """An output location cannot be used (not writable, a file where a folder is needed, ...)."""


def _probe(folder: Path, what: str) -> None:
    """Create and remove a small file in `folder`: the only reliable test that it is writable."""
    probe = folder / f".mtl_meniscus-probe-{os.getpid()}"
    try:
        with probe.open("x"):
            pass
        probe.unlink()
    except OSError as err:
        raise OutputError(f"{what}: cannot write into {folder} ({err.strerror or err})") from None


def _make_folder(folder: Path, what: str) -> None:
    for existing in (folder, *folder.parents):  # the nearest part of the path that exists
        if existing.exists():
            if not existing.is_dir():
                raise OutputError(f"{what}: {existing} is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{what}: cannot create the folder {folder} ({err.strerror or err})") from None


def check_output_dir(folder: str | Path, what: str = "output folder") -> Path:
    """Create `folder` if needed and make sure files can be written into it; `what` names the option."""
    folder = Path(folder)
    _make_folder(folder, what)
    _probe(folder, what)
    return folder


def some_of(names: Sequence, most: int = 3) -> str:
    """'a, b, c, ...': the first `most` names, and '...' when there are more (a message's examples)."""
    return ", ".join(map(str, names[:most])) + (", ..." if len(names) > most else "")


def check_empty_output_dir(folder: str | Path, what: str, instead: str = "choose an empty folder") -> Path:
    """check_output_dir for a command that fills a whole folder: one that holds anything is refused,
    naming a few of its entries and what to do `instead`."""
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()):
        entries = sorted(p.name for p in folder.iterdir())
        raise MeniscusError(f"{folder} is not empty ({len(entries)} entries: {some_of(entries)}); {instead}")
    return check_output_dir(folder, what)


def entries_besides(folder: str | Path, allowed: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """The sorted names in `folder` other than `allowed`, hidden files (.DS_Store, a lock) and our
    temporaries: what a command that fills the folder would replace or mix its own files with."""
    return sorted(
        p.name
        for p in Path(folder).iterdir()
        if p.name not in allowed and not p.name.startswith(".") and not p.name.endswith(".tmp")
    )


# The mark of a folder that a command fills with files of fixed names or named after its inputs
# (check_own_output_dir).
OWN_FOLDER_MARK = "written-by-mtl_meniscus.txt"
NAMED_AFTER_INPUTS = "named after the inputs: ground-truth masks, scans"


def check_output_file(
    path: str | Path, what: str = "output file", written_here: Callable[[Path], bool] | None = None
) -> Path:
    """Make sure `path` can be written (its folder is created if needed); `what` names the option.

    An existing file is replaced only if it is empty or `written_here(path)` says this command wrote
    it (an earlier run's output, by its content): a scan, a checkpoint, a labels.csv or an MRNet
    label file given as --out by mistake is refused, not overwritten."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what}: {path} is a folder; give a file name")
    if path.exists() and path.stat().st_size and not (written_here is not None and written_here(path)):
        raise OutputError(
            f"{what}: {path} exists and is not an earlier output of this command; it is not replaced "
            "(an input, a checkpoint, a label file?): choose another name, or delete it first"
        )
    _make_folder(path.parent, what)
    _probe(path.parent, what)
    return path


def first_line(path: Path, limit: int = 65536) -> str:
    """The file's first line as text ('' for a binary or unreadable file), for written_here checks."""
    try:
        with path.open("rb") as handle:
            return handle.readline(limit).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def check_own_output_dir(folder: str | Path, what: str, replaces: str = NAMED_AFTER_INPUTS) -> Path:
    """check_output_dir for a folder that a command fills with files (predict's --masks and --cam:
    named after the inputs; evaluate's --out: metrics.json, predictions.csv, figures): they would
    replace files of the same name there, e.g. a scan's ground-truth mask or someone's metrics. So
    a folder that holds anything is refused unless this package marked it (OWN_FOLDER_MARK, written
    here), which lets a command write into its own folder again. `replaces` says what would be lost."""
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / OWN_FOLDER_MARK).is_file():
        entries = sorted(p.name for p in folder.iterdir())
        raise OutputError(
            f"{what}: {folder} holds files ({some_of(entries)}) "
            f"but not this package's mark ({OWN_FOLDER_MARK}); the files written there would replace files "
            f"of the same name ({replaces}): choose a new or empty folder (files an earlier version wrote: "
            "delete them first)"
        )
    check_output_dir(folder, what)
    write_text_atomic(
        folder / OWN_FOLDER_MARK,
        f"{what}: written by mtl_meniscus, which writes into this folder again because of this file\n",
    )
    return folder


def is_data_folder(folder: str | Path) -> bool:
    """Whether `folder` is a data folder: labels.csv, or MRNet's layout (its label CSVs)."""
    folder = Path(folder)
    return (folder / "labels.csv").is_file() or any(folder.glob("*-meniscus.csv"))


def is_run_folder(folder: str | Path) -> bool:
    """Whether `folder` is a training run's (it holds a checkpoint)."""
    return any((Path(folder) / name).is_file() for name in ("best.pt", "last.pt"))


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed to `path`, on failure removed.

    with atomic_write(out) as tmp:
        tmp.write_text(...)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temporaries_of(path):  # a killed earlier writer's, never read again
        with contextlib.suppress(OSError):
            stale.unlink()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and not err.filename:  # a failed write names no file: name ours
            raise naming(err, path) from None
        raise


@contextlib.contextmanager
def atomic_csv_file(path: str | Path) -> Iterator[TextIO]:
    """A CSV file's text handle (UTF-8, csv's own line endings), written atomically (atomic_write)."""
    with atomic_write(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        yield handle


def naming(err: OSError, path: str | Path) -> OSError:
    """`err` naming `path` when it names no file (a failed write or flush names none), so that its
    message says where: the CLI prints err.filename."""
    return err if err.filename else OSError(err.errno, err.strerror or str(err), str(path))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files atomic_write left in `folder` when its process was killed
    (<name>.<pid>.tmp of a process no longer alive: a checkpoint's is as large as the checkpoint);
    those of live processes are theirs. Returns the files deleted."""
    removed = []
    for tmp in Path(folder).glob("*.*.tmp"):
        if _left_by_dead_process(tmp):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _left_by_dead_process(tmp: Path) -> bool:
    """Whether `tmp` (<name>.<pid>.tmp) is atomic_write's temporary of a process no longer alive."""
    pid = tmp.name.rsplit(".", 2)[-2]
    return pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid))


# folder -> {file name: its stale temporaries}: each folder listed once per process, not once per
# write (predict --masks writes thousands of files into one folder)
_STALE_BY_FOLDER: dict[Path, dict[str, list[Path]]] = {}
_STALE_LOCK = threading.Lock()


def _stale_temporaries_of(path: Path) -> list[Path]:
    """The temporary files of `path` that killed processes left (found when this process first
    writes into its folder)."""
    with _STALE_LOCK:
        folder = path.parent.resolve()
        if folder not in _STALE_BY_FOLDER:
            found: dict[str, list[Path]] = {}
            for tmp in folder.glob("*.*.tmp"):
                if _left_by_dead_process(tmp):
                    found.setdefault(tmp.name.rsplit(".", 2)[0], []).append(tmp)
            _STALE_BY_FOLDER[folder] = found
        return _STALE_BY_FOLDER[folder].pop(path.name, [])


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError): alive
        return True
    return True


def write_text_atomic(path: str | Path, text: str) -> None:
    """`path.write_text(text)` in UTF-8, atomically (see atomic_write)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def json_text(value) -> str:
    """Strict JSON (indented): a NaN or infinite number, an undefined value here, is written as null,
    which every JSON parser accepts (JavaScript's JSON.parse refuses NaN)."""

    def strict(item):
        if isinstance(item, dict):
            return {key: strict(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [strict(v) for v in item]
        if hasattr(item, "item") and not isinstance(item, (str, bytes)):  # numpy scalars
            item = item.item()
        if isinstance(item, float) and not math.isfinite(item):
            return None
        return item

    return json.dumps(strict(value), indent=2, allow_nan=False)


def nan_for_null(value):
    """A number read back from json_text's output: null (undefined) as NaN, for arithmetic."""
    return float("nan") if value is None else value
