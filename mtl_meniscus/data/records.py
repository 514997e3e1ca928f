"""What every reader of a data set produces: validated rows (Record), the prepared data set in
memory (PreparedData) with its splits and exclusions, and one error listing every problem of a file.
"""

from __future__ import annotations

import csv
import os
import posixpath
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtl_meniscus.data.splits import SPLIT_NAMES, UNUSED
from mtl_meniscus.errors import DataError
from mtl_meniscus.io.outputs import atomic_csv_file
from mtl_meniscus.labels import DEFAULT_TASKS, TaskTable

SHOWN_PROBLEMS = 50  # in the error message; all of them go to PROBLEMS_FILE


PROBLEMS_FILE = "labels_problems.txt"


@dataclass(frozen=True)
class Record:
    """One validated row of labels.csv."""

    row: int  # line number in labels.csv (the header is line 1)
    image: str  # relative to the data folder, normalised: no '.', '..' or doubled '/' (see inside_path)
    labels: dict[str, str]  # task -> its text as written (lower case); '' where the task does not apply
    patient_id: str = ""
    split: str = ""
    slice: int | None = None
    mask: str = ""
    # Its place among labels.csv's data rows, counted from 2 as lines are (0: the same as `row`):
    # unlike the line, blank lines do not move it. The automatic split groups a row without a
    # patient_id by it, so the split does not change when blank lines are added.
    order: int = 0

    @property
    def key(self) -> tuple[str, int | None]:
        """What identifies an image of the data set: its path and, in a volume, its slice."""
        return (self.image, self.slice)

    @property
    def stratum(self) -> str:
        """Joint label used to stratify splits."""
        return "|".join(self.labels.values())

    def targets(self, tasks: TaskTable) -> np.ndarray:
        """(T,) float32 targets in table order; NaN where a task does not apply or has no target
        (a double tear's position, kept only when data.exclude_double_tears is off), so the loss
        skips it."""
        return np.array([task.target(self.labels[task.name]) for task in tasks], np.float32)


def inside_path(text: str) -> str | None:
    """`text` as a normalised relative path ('./a//b.png' -> 'a/b.png'), or None when it is absolute or
    leaves the folder with '..'. The check is on the text: a symbolic link inside the data folder that
    points elsewhere is followed (the folder's owner made it)."""
    if not text or posixpath.isabs(text) or os.path.isabs(text):
        return None
    normal = posixpath.normpath(text)
    if normal == ".." or normal.startswith("../"):
        return None
    return normal


def csv_text(path: Path) -> str:
    """A CSV file's text (UTF-8, a byte-order mark allowed); a DataError naming the file when it is
    not UTF-8 text or cannot be read."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        utf16 = err.object[:2] in (b"\xff\xfe", b"\xfe\xff")  # Excel's 'Unicode Text'
        line = err.object.count(b"\n", 0, err.start) + 1
        where = "UTF-16" if utf16 else f"line {line}, byte {err.start}: {err.reason}"
        raise DataError(
            f"{path}: not UTF-8 text ({where}); save it as a UTF-8 CSV file (a spreadsheet's 'CSV UTF-8')"
        ) from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def problems_error(
    path: Path, problems: list[str], report_dir: str | Path | None = None, hint: str = ""
) -> DataError:
    """One DataError for every problem of a file: the first SHOWN_PROBLEMS in the message, and when
    there are more, all of them in report_dir (or a temporary file) named by the message."""
    more = ""
    if len(problems) > SHOWN_PROBLEMS:
        report = _write_problems(path, problems, report_dir)
        more = (
            f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more: all {len(problems)} are listed in {report}"
        )
    shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
    return DataError(f"{path}: {len(problems)} problem(s):\n  {shown}{more}{hint}", problems=problems)


def _write_problems(csv_path: Path, problems: list[str], report_dir: str | Path | None) -> Path:
    """Every problem of labels.csv, one a line, into report_dir (the run folder) or a temporary file."""
    text = f"{csv_path}: {len(problems)} problem(s)\n" + "\n".join(problems) + "\n"
    if report_dir is not None:
        path = Path(report_dir) / PROBLEMS_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            pass  # not writable: fall back to a temporary file
    handle, name = tempfile.mkstemp(prefix="mtl_meniscus-labels-problems-", suffix=".txt")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    return Path(name)


class ImageView(Sequence):
    """The images at `indices` of a data set, read when asked for: a split's images without a list
    that holds them all (a lazily read data set stays out of memory)."""

    def __init__(self, images: Sequence[np.ndarray], indices: Sequence[int]):
        self.images, self.indices = images, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int | slice):
        if isinstance(k, slice):
            return ImageView(self.images, self.indices[k])
        return self.images[self.indices[k]]


@dataclass
class PreparedData:
    """The kept images in memory, their labels and splits, and what was set aside."""

    data_dir: Path
    records: list[Record]
    images: Sequence[np.ndarray]  # raw float32 (H, W), all image_size x image_size; exams: (S, H, W) each
    targets: np.ndarray  # (N, T) float32 in the order of `tasks`, NaN where a task does not apply
    splits: list[str]
    tasks: TaskTable = DEFAULT_TASKS
    # (image, slice, reason): the slice (None for a 2-D image) tells a volume's excluded rows apart
    exclusions: list[tuple[str, int | None, str]] = field(default_factory=list)
    n_rows: int = 0
    resized: int = 0
    stretched: int = 0  # of the resized, those that were not square: their aspect ratio changed
    unit: str = "images"  # what a row is: an image (a slice), or with data.layout mrnet an exam
    layout: str = "labels-csv"  # data.layout: which reader made it
    unoriented: int = 0  # DICOM/NIfTI files without geometry, taken as stored (io/orientation.py)
    # Label masks (data/masks.py) only when asked for (model.segmentation): per row uint8
    # (image_size, image_size), 0 background, 1 meniscus, 2 tear; None for a row without one.
    masks: list[np.ndarray | None] | None = None

    def rows_with_mask(self, indices) -> np.ndarray:
        """The rows of `indices` that have a mask (none when the masks were not read)."""
        if self.masks is None:
            return np.zeros(0, np.int64)
        return np.array([i for i in indices if self.masks[i] is not None], np.int64)

    @property
    def exams(self) -> bool:
        """True when each row is a whole exam (S, H, W) rather than one slice (H, W)."""
        return self.unit == "exams"

    def indices(self, split: str) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)

    def view(self, indices) -> ImageView:
        """The images at `indices`, read when asked for."""
        return ImageView(self.images, indices)

    def patients(self, indices) -> list[str] | None:
        """The patient of each row of `indices` (statistics resample patients, not rows), or None
        when no row names one (every row its own patient). A row without a patient_id among rows
        with one is its own patient."""
        if not any(self.records[i].patient_id for i in indices):
            return None
        return [self.records[i].patient_id or f"row {self.records[i].row}" for i in indices]

    def unit_phrase(self, indices) -> str:
        """'112 images', or '600 images of 30 patients' when rows share patients."""
        patients = self.patients(indices)
        count = len(set(patients)) if patients else len(indices)
        phrase = f"{len(indices)} {self.unit}"
        return phrase + (f" of {count} patients" if count < len(indices) else "")

    def exclusion_summary(self) -> str:
        """One line: how many rows were kept and why the others were set aside."""
        reasons = Counter(reason.split(":")[0] for *_, reason in self.exclusions)
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
        line = f"kept {len(self.records)} of {self.n_rows} {self.unit}"
        if self.exclusions:
            line += f"; excluded {len(self.exclusions)} ({detail})"
        if self.resized:
            line += f"; resized {self.resized}"
        if self.stretched:  # an angle on the image changes with its aspect ratio: orientation's label
            line += f" ({self.stretched} not square: stretched to square, which changes angles)"
        if self.masks is not None:  # a segmentation run's: which rows supervise the decoder
            line += f"; masks on {sum(m is not None for m in self.masks)}"
        if self.unoriented:
            line += f"; {self.unoriented} DICOM/NIfTI file(s) with the orientation not in the file: taken as stored"
        unknown = self.unknown_subtypes()
        if unknown:
            line += "; unknown (masked, not negative): " + ", ".join(
                f"{count} {task}" for task, count in unknown.items()
            )
        return line

    def unknown_subtypes(self) -> dict[str, int]:
        """{gated task: rows whose gate is positive (a tear) but whose own label is empty}."""
        counts = {}
        for task in self.tasks:
            if task.gated_by is None:
                continue
            gate = self.targets[:, self.tasks.index(task.gated_by)] == 1
            empty = np.array([r.labels[task.name] == "" for r in self.records], dtype=bool)
            if (gate & empty).any():
                counts[task.name] = int((gate & empty).sum())
        return counts

    def write_exclusions(self, path: str | Path) -> None:
        write_exclusions(path, self.exclusions)

    def write_splits(self, path: str | Path) -> None:
        rows = [
            (r.image, "" if r.slice is None else r.slice, s, *r.labels.values(), r.patient_id)
            for r, s in zip(self.records, self.splits)
        ]
        _write_csv(path, ["image", "slice", "split", *self.tasks.names, "patient_id"], rows)

    def same_splits_as(self, path: str | Path) -> bool:
        """True if a run's splits.csv lists exactly these images in these splits with these labels
        (or does not exist yet); splits_changes says what differs."""
        return not self.splits_changes(path)

    def splits_changes(self, path: str | Path) -> str:
        """What differs between a run's splits.csv and these images, splits and labels, one line
        with an example of each kind ('' when nothing does, or the file does not exist yet).
        Labels count: with a `split` column in labels.csv, relabelled images keep their splits,
        and a resumed run would go on with other labels than it began with (a task's column
        missing from an older splits.csv is not compared)."""
        if not Path(path).is_file():
            return ""
        gone, added, moved, relabelled = self.differences(read_saved_splits(path))
        excluded = {(image, slice_index): reason for image, slice_index, reason in self.exclusions}

        def example(keys: list, why: dict | None = None) -> str:
            image, slice_index = keys[0]
            name = image if slice_index is None else f"{image} slice {slice_index}"
            return f"e.g. {name}" + (f": {why[keys[0]]}" if why and keys[0] in why else "")

        changes = [
            f"{len(keys)} {what} ({example(keys, why)})"
            for keys, what, why in (
                (gone, "of the run no longer kept", excluded),
                (added, "added", None),
                (moved, "in another split", None),
                (relabelled, "relabelled", None),
            )
            if keys
        ]
        return "; ".join(changes)

    def differences(
        self, saved: dict[tuple[str, int | None], dict[str, str]]
    ) -> tuple[list, list, list, list]:
        """The (image, slice) keys of a run's splits.csv rows (read_saved_splits) that differ from
        these images: (gone, added, in another split, relabelled). A task's column missing from an
        older splits.csv is not compared."""
        now = {r.key: (r, split) for r, split in zip(self.records, self.splits)}
        gone = [key for key in saved if key not in now]
        added = [key for key in now if key not in saved]
        moved = [key for key in saved if key in now and saved[key]["split"] != now[key][1]]
        relabelled = [
            key
            for key, row in saved.items()
            if key in now
            and any(row[n] != now[key][0].labels.get(n, "") for n in self.tasks.names if n in row)
        ]
        return gone, added, moved, relabelled

    def restore_splits(self, path: str | Path) -> str:
        """Give every kept image the split it had in a run (the run's splits.csv).

        Images that were not in the run get the split 'new', so they are never scored as test
        or validation images; the splits are never recomputed, since a recomputed split can
        move training images into the test split. Labels are taken as they are now. Returns a
        one-line account of what changed in labels.csv since the run, or '' if nothing did.
        """
        saved = read_saved_splits(path)
        gone, added, _, relabelled = self.differences(saved)
        self.splits = [saved[r.key]["split"] if r.key in saved else NEW_SPLIT for r in self.records]
        if not (gone or relabelled or added):
            return ""
        changes = []
        if gone:
            moved = Counter(saved[key]["split"] for key in gone)
            changes.append(
                f"{len(gone)} image(s) of the run no longer kept ("
                + ", ".join(f"{n} {split}" for split, n in sorted(moved.items()))
                + ")"
            )
        if relabelled:
            changes.append(f"{len(relabelled)} relabelled (scored with today's labels)")
        if added:
            changes.append(f"{len(added)} added since (split '{NEW_SPLIT}': not scored as test or val)")
        return f"labels.csv changed since the run: {'; '.join(changes)}"

    def split_summary(self) -> str:
        parts = []
        for split in SPLIT_NAMES:
            idx = self.indices(split)
            tears = int(np.nansum(self.targets[idx, 0])) if len(idx) else 0  # the root task: fissure
            parts.append(f"{split} {len(idx)} ({tears} tears)")
        unused = len(self.indices(UNUSED))
        if unused:  # data.train_fraction < 1
            parts.append(f"{unused} training images unused (data.train_fraction)")
        return ", ".join(parts)


NEW_SPLIT = "new"  # an image added to labels.csv after the run: in none of the run's splits


# What a run's splits.csv may name as an image's split: SPLIT_NAMES, or UNUSED (a training image
# left out by data.train_fraction).
SAVED_SPLITS = (*SPLIT_NAMES, UNUSED)


def read_saved_splits(path: str | Path) -> dict[tuple[str, int | None], dict[str, str]]:
    """A run's splits.csv as {(image, slice): row}; runs older than the slice column have none.

    A damaged file is refused with every bad row named: read as it is, a file without the image
    column would make every image of the data 'added since the run' and leave the test split empty,
    and an image listed twice would keep only its last split."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: not found; without the run's splits its test images cannot be told from its "
            "training images (evaluate a run folder, or pass --data DIR --split all)"
        )
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            rows = [(reader.line_num, row) for row in reader]
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(
            f"{path}: damaged, not a splits file of this package ({type(err).__name__}: {err})"
        ) from None
    missing = [column for column in ("image", "split") if column not in header]
    if missing:
        raise DataError(
            f"{path}: damaged, not a splits file of this package: no column "
            + " or ".join(f"'{column}'" for column in missing)
            + f" (its header: {', '.join(header) if header else 'none, the file is empty'}; a run's "
            "splits.csv has image, slice, split, its tasks and patient_id)"
        )
    saved: dict[tuple[str, int | None], dict[str, str]] = {}
    first_rows: dict[tuple[str, int | None], int] = {}
    problems = []
    for line, row in rows:
        if None in row or None in row.values():  # more or fewer values than the header has columns
            problems.append(f"row {line}: not {len(header)} values, one per column of the header")
            continue
        image, slice_text, split = row["image"], row.get("slice", ""), row["split"]
        slice_number = int(slice_text) if slice_text.isascii() and slice_text.isdigit() else None
        if not image:
            problems.append(f"row {line}, column 'image': empty")
        if slice_text and slice_number is None:
            problems.append(
                f"row {line}, column 'slice': bad value {slice_text!r} (allowed: a slice number, or "
                "empty for a 2D image)"
            )
        if split not in SAVED_SPLITS:
            problems.append(
                f"row {line}, column 'split': bad value {split!r} (allowed: {', '.join(SAVED_SPLITS)})"
            )
        key = (image, slice_number)
        if image and key in first_rows:
            where = f"{image}, slice {key[1]}" if key[1] is not None else image
            problems.append(f"row {line}: {where} listed again (first on row {first_rows[key]})")
        first_rows.setdefault(key, line)
        saved[key] = row
    if not rows:
        problems.append("no image listed (a run's splits.csv lists every image the run kept)")
    if problems:
        shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise DataError(
            f"{path}: damaged, {len(problems)} problem(s) (restore the run's splits.csv from a copy: it "
            f"tells the run's test images from its training images):\n  {shown}{more}",
            problems=problems,
        )
    return saved


def write_exclusions(path: str | Path, exclusions: list[tuple[str, int | None, str]]) -> None:
    """exclusions.csv: image, slice, reason of each row (or exam) set aside."""
    rows = [
        (image, "" if slice_index is None else slice_index, reason)
        for image, slice_index, reason in exclusions
    ]
    _write_csv(path, ["image", "slice", "reason"], rows)


def _write_csv(path: str | Path, header: list[str], rows) -> None:
    # atomically: another process may read the file meanwhile (under torchrun every rank compares a
    # resumed run's splits.csv while rank 0 rewrites it; a half-written file read as "the splits changed")
    with atomic_csv_file(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
