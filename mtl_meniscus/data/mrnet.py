"""The MRNet layout (Bien et al. 2018), read as it ships:

    ROOT/train/sagittal/0000.npy ...   uint8 (slices, 256, 256), one file per exam
    ROOT/valid/sagittal/1130.npy ...
    ROOT/train-meniscus.csv            no header: case,label (1 = meniscus tear)
    ROOT/valid-meniscus.csv

Only the tear label exists; orientation and position are unknown. The `valid` folder is the test
split of every MRNet paper. A case number names one exam (train 0000-1129, valid 1130-1249 in the
real data set): training refuses a case listed in both CSVs.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtl_meniscus.config import DataConfig
from mtl_meniscus.data.records import PreparedData, Record, csv_text, problems_error
from mtl_meniscus.data.splits import stratified_group_split
from mtl_meniscus.errors import DataError, ImageReadError
from mtl_meniscus.io.exams import ExamVolumes, read_exam
from mtl_meniscus.io.imageio import max_pixels_limit

SPLITS = ("train", "valid")


@dataclass(frozen=True)
class MrnetExam:
    case: str
    path: Path  # the sagittal .npy
    tear: int


@dataclass(frozen=True)
class ListedCases:
    """The cases a split's CSV lists: case number -> its row there."""

    labels: Path  # the CSV
    rows: dict[int, int]


def read_mrnet(root: str | Path, split: str) -> list[MrnetExam]:
    """The exams of one split with their meniscus labels; every problem named at once."""
    return _read_split(Path(root), split)[0]


def read_mrnet_splits(root: str | Path) -> dict[str, list[MrnetExam]]:
    """Both splits' exams ('train', 'valid'). A case listed in both CSVs is refused with valid's
    problems, naming both files and rows: in the real data set (train 0000-1129, valid 1130-1249)
    a case number names one exam, so it would be trained on and tested on."""
    root = Path(root)
    train, train_cases = _read_split(root, "train")
    valid, _ = _read_split(root, "valid", train_cases)
    return {"train": train, "valid": valid}


def _read_split(
    root: Path, split: str, listed_in: ListedCases | None = None
) -> tuple[list[MrnetExam], ListedCases]:
    """read_mrnet, and the cases its CSV lists; with `listed_in` (the other split's), a case listed
    there too is one of the problems."""
    if split not in SPLITS:
        raise DataError(f"MRNet split {split!r}: allowed are {', '.join(SPLITS)} (valid is the test split)")
    labels = root / f"{split}-meniscus.csv"
    if not labels.is_file():
        raise DataError(
            f"{labels}: not found (an MRNet folder has {split}-meniscus.csv and {split}/sagittal/)"
        )
    exams, problems = [], []
    first_row: dict[int, tuple[int, str]] = {}  # case number -> (its first row, its label there)
    for line, row in _csv_rows(labels):
        if not any(cell.strip() for cell in row):  # a blank line (one ends many files), as in labels.csv
            continue
        if len(row) != 2 or row[1].strip() not in ("0", "1"):
            problems.append(
                f"row {line}: {','.join(row)!r} (expected case,label with label 0 or 1; no header)"
            )
            continue
        case, label = row[0].strip(), row[1].strip()
        # a case is a number (its file is NNNN.npy): nothing in the file can name a path elsewhere
        if not (case.isascii() and case.isdigit()):
            problems.append(
                f"row {line}: case {case!r} is not a case number (MRNet's cases are 0000, 0001, ...)"
            )
            continue
        if int(case) in first_row:
            seen_line, seen_label = first_row[int(case)]
            conflict = (
                f" with label {label}, but row {seen_line} says {seen_label}" if label != seen_label else ""
            )
            problems.append(f"row {line}: case {case} listed again (first at row {seen_line}){conflict}")
            continue
        first_row[int(case)] = (line, label)
        if listed_in is not None and int(case) in listed_in.rows:  # MRNet names an exam by its number
            problems.append(
                f"row {line}: case {case} is also listed in {listed_in.labels} "
                f"(row {listed_in.rows[int(case)]}): an exam in both would be trained on and tested on; "
                "keep it in one of the two"
            )
            continue
        path = root / split / "sagittal" / f"{int(case):04d}.npy"
        if not path.is_file():
            problems.append(f"row {line}: case {case!r} has no file {path}")
            continue
        exams.append(MrnetExam(case, path, int(label)))
    if problems:
        raise problems_error(labels, problems)
    if not exams:
        raise DataError(f"{labels}: no exams listed")
    return exams, ListedCases(labels, {case: line for case, (line, _) in first_row.items()})


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every row of a UTF-8 CSV file; a DataError naming the file otherwise."""
    try:
        return list(enumerate(csv.reader(io.StringIO(csv_text(path), newline="")), start=1))
    except csv.Error as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None


class NotSquareExam(ImageReadError):
    """An MRNet exam whose slices are not square: read, but not scored (read_mrnet_exam)."""


def exclusion_reason(err: ImageReadError) -> str:
    """exclusions.csv's reason for an exam set aside: its kind ('unreadable', 'not square'), then why."""
    return f"{'not square' if isinstance(err, NotSquareExam) else 'unreadable'}: {err}"


def read_mrnet_exam(path: Path, max_pixels: int | None, size: int, plane: str | None) -> np.ndarray:
    """An MRNet exam as read_exam reads it, (S, H, W); ImageReadError when its slices are not
    square. MRNet's are, and a volume saved slices-last, (H, W, S), reads as H slices of W x S:
    stretched to square it would be scored, its angles (orientation's label) changed, without a word."""
    volume = read_exam(path, max_pixels, size, plane)
    depth, height, width = volume.shape
    if height != width:
        reason = f"{path}: slices of {height}x{width} are not square (MRNet's are)"
        if depth == height and width < height:
            reason += (
                "; saved slices-last? MRNet's .npy holds (slices, height, width): "
                f"this reads as {depth} slices"
            )
        raise NotSquareExam(reason)
    return volume


def prepare_mrnet(root: str | Path, config: DataConfig) -> PreparedData:
    """MRNet as a data set of exams: `valid` is the test split; `train` is split into train and val
    in the proportion of data.split_fractions' first two values, stratified on the tear label.

    Each exam is read once here, so that an unreadable exam, one whose slices are not square (saved
    slices-last?) or one of the wrong size is set aside (exclusions.csv) before anything trains;
    training reads them again one at a time (exams.ExamVolumes). Only the tear label exists: the
    tasks it gates are unknown (NaN), which the masked loss leaves out and the summary line counts.
    """
    root = Path(root)
    tasks = config.task_table()
    size, max_pixels = config.image_size, max_pixels_limit(config.max_pixels)
    records, paths, exclusions, resized = [], [], [], 0
    listed = 0
    listed_exams = read_mrnet_splits(root)  # a case in both is refused before any exam is read
    for folder, split in (("train", ""), ("valid", "test")):
        for exam in listed_exams[folder]:
            listed += 1
            relative = exam.path.relative_to(root).as_posix()
            try:
                shape = read_mrnet_exam(exam.path, max_pixels, size, config.plane).shape
            except ImageReadError as err:
                exclusions.append((relative, None, exclusion_reason(err)))
                continue
            if shape[1:] != (size, size):
                if config.size_policy == "exclude":
                    exclusions.append(
                        (relative, None, f"wrong size: {shape[1]}x{shape[2]} slices, expected {size}x{size}")
                    )
                    continue
                resized += 1
            labels = {task.name: "" for task in tasks} | {tasks.root.name: str(exam.tear)}
            records.append(Record(row=len(records) + 1, image=relative, labels=labels, split=split))
            paths.append(exam.path)
    if not records:
        raise DataError(
            f"{root}: no usable exam left ({len(exclusions)} set aside, e.g. {exclusions[0][-1]})"
        )
    splits = [record.split for record in records]  # 'test' for valid/, train/ is split below
    train_rows = [k for k, split in enumerate(splits) if not split]
    train_share, val_share = config.split_fractions[0], config.split_fractions[1]
    if train_share + val_share == 0:
        raise DataError(
            f"data.split_fractions {list(config.split_fractions)}: MRNet's train folder is split into train "
            "and val by the first two fractions, and both are 0"
        )
    fractions = (train_share / (train_share + val_share), val_share / (train_share + val_share), 0.0)
    chosen = stratified_group_split([records[k].stratum for k in train_rows], fractions, config.split_seed)
    for k, split in zip(train_rows, chosen):
        splits[k] = split
    return PreparedData(
        data_dir=root,
        records=records,
        images=ExamVolumes(paths, size, max_pixels),
        targets=np.stack([r.targets(tasks) for r in records]),
        splits=splits,
        tasks=tasks,
        exclusions=exclusions,
        n_rows=listed,
        resized=resized,
        unit="exams",
        layout="mrnet",
    )
