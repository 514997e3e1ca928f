"""The folder format: labels.csv validation, exclusions, splits and the in-memory data set.

DIR/labels.csv columns: image, fissure, orientation, position; optional patient_id, split,
slice (index into a 3D volume) and mask (a label image: 1 meniscus, 2 tear).
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

import cv2
import numpy as np

from .config import DataConfig
from .errors import DataError, ImageReadError
from .imageio import max_pixels_limit, read_image
from .labels import DEFAULT_TASKS, DOUBLE_TEAR, TaskTable
from .phantom import ensure_phantom
from .splits import SPLIT_NAMES, stratified_group_split

OPTIONAL_COLUMNS = ("patient_id", "split", "slice", "mask")
SHOWN_PROBLEMS = 50  # in the error message; all of them go to PROBLEMS_FILE
PROBLEMS_FILE = "labels_problems.txt"
UNKNOWN_SUBTYPE_HINT = (
    "\n  (an empty orientation or position on a tear is an error unless unknown subtypes are "
    "expected: set data.allow_unknown_subtype: true to mask them in the loss and the metrics)"
)


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


def read_labels(
    data_dir: str | Path,
    report_dir: str | Path | None = None,
    tasks: TaskTable = DEFAULT_TASKS,
    allow_unknown_subtype: bool = False,
) -> list[Record]:
    """Parse and validate DIR/labels.csv; every bad row is reported at once in one DataError.

    When there are more problems than the message shows, all of them are written to
    `report_dir`/labels_problems.txt (or a temporary file) and the message names that file.
    """
    data_dir = Path(data_dir)
    csv_path = data_dir / "labels.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: not found (a data folder needs labels.csv; see the README)")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{csv_path}: cannot parse as CSV ({err})") from None
    repeated = sorted({name for name in header if name and header.count(name) > 1})
    if repeated:
        raise DataError(
            f"{csv_path}: column(s) {', '.join(repeated)} appear more than once in the header "
            f"({', '.join(header)}); keep one of each"
        )
    required = ("image", *tasks.names)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{csv_path}: missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'} "
            f"(required: {', '.join(required)}; optional: {', '.join(OPTIONAL_COLUMNS)})"
        )
    problems: list[str] = []
    hints: set[str] = set()  # advice the message ends with, once however many rows need it
    records: list[Record] = []
    written: dict[int, str] = {}  # row -> its image as written
    seen: dict[tuple[str, int | None], int] = {}  # (normalised path, slice) -> row
    seen_files: dict[tuple[int, int, int | None], int] = {}  # (device, inode, slice): the file itself
    for line, row in enumerate(rows, start=2):
        record = _validate_row(row, line, data_dir, problems, hints, tasks, allow_unknown_subtype)
        if record is None:
            continue
        written[line] = (row.get("image") or "").strip()
        stat = os.stat(data_dir / record.image)
        file_key = (stat.st_dev, stat.st_ino, record.slice)
        first = seen.get((record.image, record.slice), seen_files.get(file_key))
        if first is not None:
            same = written[first] == written[line]
            problems.append(
                f"row {line}: image '{written[line]}' is listed twice (also row {first}"
                + ("" if same else f", as '{written[first]}': the same file")
                + ")"
            )
            continue
        seen[(record.image, record.slice)] = line
        seen_files[file_key] = line
        records.append(record)
    if not rows:
        problems.append("no data rows")
    filled = sum(1 for row in rows if (row.get("split") or "").strip())
    if 0 < filled < len(rows):
        problems.append(
            f"column 'split' is filled on {filled} of {len(rows)} rows: fill it on every row "
            "(it then replaces the automatic split) or on none"
        )
    if problems:
        raise problems_error(csv_path, problems, report_dir, hint="".join(hints))
    return records


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


def _validate_row(
    row: dict,
    line: int,
    data_dir: Path,
    problems: list[str],
    hints: set[str],
    tasks: TaskTable,
    allow_unknown_subtype: bool = False,
) -> Record | None:
    def value(column: str) -> str:
        return (row.get(column) or "").strip()

    start = len(problems)

    def bad(column: str, allowed: str) -> None:
        problems.append(f"row {line}, column '{column}': bad value '{value(column)}' ({allowed})")

    image = _file_in_folder(value("image"), "image", line, data_dir, problems, required=True)
    labels: dict[str, str] = {}
    for task in tasks:
        text = value(task.name) if task is tasks.root else value(task.name).lower()
        if task.gated_by is None:
            if text not in task.values:
                bad(task.name, "allowed: " + ", ".join(task.values))
        elif labels.get(task.gated_by) == tasks[task.gated_by].text(0.0):
            if text:
                bad(task.name, f"must be empty when {task.gated_by} is {labels[task.gated_by]}")
        elif labels.get(task.gated_by) == tasks[task.gated_by].text(1.0):
            unknown = text == "" and allow_unknown_subtype  # known to be a tear, kind not known
            if text not in (*task.values, *task.unscored) and not unknown:
                bad(
                    task.name,
                    f"a {tasks[task.gated_by].noun} needs one of: "
                    + ", ".join((*task.values, *task.unscored)),
                )
                if text == "":
                    hints.add(UNKNOWN_SUBTYPE_HINT)
        labels[task.name] = text
    split = value("split").lower()
    if split and split not in SPLIT_NAMES:
        bad("split", "allowed: " + ", ".join(SPLIT_NAMES) + ", or empty on every row")
    slice_index = None
    if value("slice"):
        try:
            slice_index = int(value("slice"))
            if slice_index < 0:
                raise ValueError
        except ValueError:
            bad("slice", "a non-negative integer slice index")
    mask = _file_in_folder(value("mask"), "mask", line, data_dir, problems, required=False)
    if len(problems) > start:
        return None
    return Record(
        row=line,
        image=image,
        labels=labels,
        patient_id=value("patient_id"),
        split=split,
        slice=slice_index,
        mask=mask,
    )


def _file_in_folder(
    text: str, column: str, line: int, data_dir: Path, problems: list[str], required: bool
) -> str:
    """The normalised path of an existing file inside the data folder, or '' after adding a problem.

    A path outside the folder is refused without looking at the file system, so the error says
    nothing about which files exist out there."""
    if not text:
        if required:
            problems.append(
                f"row {line}, column '{column}': bad value '' (a path relative to the data folder is required)"
            )
        return ""
    normal = inside_path(text)
    if normal is None:
        problems.append(
            f"row {line}, column '{column}': bad value '{text}' (a path inside the data folder is required, "
            "relative to it, without leading '/' or '..' that leads out)"
        )
        return ""
    try:
        found = (data_dir / normal).is_file()
    except OSError:
        found = False
    if not found:
        problems.append(f"row {line}, column '{column}': file not found: {data_dir / normal}")
        return ""
    return normal


@dataclass
class PreparedData:
    """The kept images in memory, their labels and splits, and what was set aside."""

    data_dir: Path
    records: list[Record]
    images: Sequence[np.ndarray]  # raw float32 (H, W), all image_size x image_size; exams: (S, H, W) each
    targets: np.ndarray  # (N, T) float32 in the order of `tasks`, NaN where a task does not apply
    splits: list[str]
    tasks: TaskTable = DEFAULT_TASKS
    exclusions: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    n_rows: int = 0
    resized: int = 0
    unit: str = "images"  # what a row is: an image (a slice), or with data.layout mrnet an exam

    @property
    def exams(self) -> bool:
        """True when each row is a whole exam (S, H, W) rather than one slice (H, W)."""
        return self.unit == "exams"

    def indices(self, split: str) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)

    def exclusion_summary(self) -> str:
        """One line: how many rows were kept and why the others were set aside."""
        reasons = Counter(reason.split(":")[0] for _, reason in self.exclusions)
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
        line = f"kept {len(self.records)} of {self.n_rows} {self.unit}"
        if self.exclusions:
            line += f"; excluded {len(self.exclusions)} ({detail})"
        if self.resized:
            line += f"; resized {self.resized}"
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
        _write_csv(path, ["image", "reason"], self.exclusions)

    def write_splits(self, path: str | Path) -> None:
        rows = [
            (r.image, "" if r.slice is None else r.slice, s, *r.labels.values(), r.patient_id)
            for r, s in zip(self.records, self.splits)
        ]
        _write_csv(path, ["image", "slice", "split", *self.tasks.names, "patient_id"], rows)

    def same_splits_as(self, path: str | Path) -> bool:
        """True if a run's splits.csv lists exactly these images in these splits (or does not exist yet)."""
        if not Path(path).is_file():
            return True
        saved = {key: row["split"] for key, row in read_saved_splits(path).items()}
        return saved == {r.key: s for r, s in zip(self.records, self.splits)}

    def restore_splits(self, path: str | Path) -> str:
        """Give every kept image the split it had in a run (the run's splits.csv).

        Images that were not in the run get the split 'new', so they are never scored as test
        or validation images; the splits are never recomputed, since a recomputed split can
        move training images into the test split. Labels are taken as they are now. Returns a
        one-line account of what changed in labels.csv since the run, or '' if nothing did.
        """
        saved = read_saved_splits(path)
        current = {record.key: record for record in self.records}
        self.splits = [saved[r.key]["split"] if r.key in saved else NEW_SPLIT for r in self.records]
        gone = [key for key in saved if key not in current]
        relabelled = [
            key
            for key, row in saved.items()
            if key in current and any(row.get(name, "") != text for name, text in current[key].labels.items())
        ]
        added = len(self.records) - (len(saved) - len(gone))
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
            changes.append(f"{added} added since (split '{NEW_SPLIT}': not scored as test or val)")
        return f"labels.csv changed since the run: {'; '.join(changes)}"

    def split_summary(self) -> str:
        parts = []
        for split in SPLIT_NAMES:
            idx = self.indices(split)
            tears = int(np.nansum(self.targets[idx, 0])) if len(idx) else 0  # the root task: fissure
            parts.append(f"{split} {len(idx)} ({tears} tears)")
        return ", ".join(parts)


NEW_SPLIT = "new"  # an image added to labels.csv after the run: in none of the run's splits


def read_saved_splits(path: str | Path) -> dict[tuple[str, int | None], dict[str, str]]:
    """A run's splits.csv as {(image, slice): row}; runs older than the slice column have none."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: not found; without the run's splits its test images cannot be told from its "
            "training images (evaluate a run folder, or pass --data DIR --split all)"
        )
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        return {(row["image"], int(row["slice"]) if row.get("slice") else None): row for row in rows}
    except (KeyError, ValueError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(
            f"{path}: damaged, not a splits file of this package ({type(err).__name__}: {err})"
        ) from None


def _write_csv(path: str | Path, header: list[str], rows) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def resolve_data_dir(data: DataConfig) -> Path:
    """The configured data folder, or the built-in phantom (generated into the cache on first use)."""
    if data.path:
        return Path(data.path)
    return ensure_phantom(data.phantom_n, data.phantom_seed, difficulty=data.phantom_difficulty)


def prepare_data(
    data_dir: str | Path, config: DataConfig, report_dir: str | Path | None = None
) -> PreparedData:
    """Validate labels.csv, read every image, apply the exclusion rules and split the rest.

    `report_dir` receives labels_problems.txt when labels.csv has more problems than the error shows.
    """
    data_dir = Path(data_dir)
    if config.layout == "mrnet":
        from .mrnet import prepare_mrnet

        return prepare_mrnet(data_dir, config)
    tasks = config.task_table()
    records = read_labels(data_dir, report_dir, tasks, config.allow_unknown_subtype)
    size = config.image_size
    max_pixels = max_pixels_limit(config.max_pixels)
    kept: list[Record] = []
    images: list[np.ndarray] = []
    exclusions: list[tuple[str, str]] = []
    resized = 0
    last_volume: dict[Path, np.ndarray] = {}  # rows of one volume decode it once (read_image)
    for record in records:
        if config.exclude_double_tears and record.labels.get("position") == DOUBLE_TEAR:
            exclusions.append((record.image, "double tear: position 'both'"))
            continue
        try:
            image = read_image(
                data_dir / record.image, record.slice, max_pixels=max_pixels, last_volume=last_volume
            )
        except ImageReadError as err:
            exclusions.append((record.image, f"unreadable: {err}"))
            continue
        if image.shape != (size, size):
            if config.size_policy == "exclude":
                exclusions.append(
                    (record.image, f"wrong size: {image.shape[0]}x{image.shape[1]}, expected {size}x{size}")
                )
                continue
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            resized += 1
        kept.append(record)
        images.append(image)
    if not kept:
        raise DataError(f"{data_dir}: no usable image left: {_exclusion_reasons(exclusions, size)}")
    targets = np.stack([r.targets(tasks) for r in kept])
    splits = assign_splits(kept, config)
    return PreparedData(
        data_dir=data_dir,
        records=kept,
        images=images,
        targets=targets,
        splits=splits,
        tasks=tasks,
        exclusions=exclusions,
        n_rows=len(records),
        resized=resized,
    )


def _exclusion_reasons(exclusions: list[tuple[str, str]], size: int) -> str:
    """'all 60 rows were excluded: 60 wrong size (e.g. a.png: 256x256, expected 64x64); ...' and a hint."""
    first: dict[str, tuple[str, str]] = {}
    counts = Counter()
    for image, reason in exclusions:
        kind, _, detail = reason.partition(":")
        counts[kind] += 1
        first.setdefault(kind, (image, detail.strip()))
    parts = [f"{counts[kind]} {kind} (e.g. {image}: {detail})" for kind, (image, detail) in first.items()]
    text = f"all {len(exclusions)} rows were excluded: " + "; ".join(parts)
    if "wrong size" in counts:
        text += (
            f". The config expects {size}x{size} images: set data.image_size to your images' size, "
            "or data.size_policy: resize to resize them"
        )
    if "double tear" in counts:
        text += ". Double tears are excluded while data.exclude_double_tears is true"
    return text


def assign_splits(records: list[Record], config: DataConfig) -> list[str]:
    """The `split` column when labels.csv has one, else a stratified (and patient-grouped) split."""
    if records and all(r.split for r in records):
        return [r.split for r in records]
    groups = [r.patient_id or f"__row{r.row}" for r in records]
    return stratified_group_split(
        [r.stratum for r in records], config.split_fractions, config.split_seed, groups
    )
