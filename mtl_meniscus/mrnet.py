"""The MRNet layout (Bien et al. 2018), read as it ships:

    ROOT/train/sagittal/0000.npy ...   uint8 (slices, 256, 256), one file per exam
    ROOT/valid/sagittal/1130.npy ...
    ROOT/train-meniscus.csv            no header: case,label (1 = meniscus tear)
    ROOT/valid-meniscus.csv

Only the tear label exists; orientation and position are unknown. The `valid` folder is the test
split of every MRNet paper.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .data import problems_error
from .errors import DataError

SPLITS = ("train", "valid")


@dataclass(frozen=True)
class MrnetExam:
    case: str
    path: Path  # the sagittal .npy
    tear: int


def read_mrnet(root: str | Path, split: str) -> list[MrnetExam]:
    """The exams of one split with their meniscus labels; every problem named at once."""
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"MRNet split {split!r}: allowed are {', '.join(SPLITS)} (valid is the test split)")
    labels = root / f"{split}-meniscus.csv"
    if not labels.is_file():
        raise DataError(
            f"{labels}: not found (an MRNet folder has {split}-meniscus.csv and {split}/sagittal/)"
        )
    exams, problems = [], []
    with labels.open(newline="") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if len(row) != 2 or row[1].strip() not in ("0", "1"):
                problems.append(
                    f"row {line}: {','.join(row)!r} (expected case,label with label 0 or 1; no header)"
                )
                continue
            case = row[0].strip()
            path = root / split / "sagittal" / f"{int(case):04d}.npy" if case.isdigit() else None
            if path is None or not path.is_file():
                problems.append(
                    f"row {line}: case {case!r} has no file {root / split / 'sagittal'}/{case}.npy"
                )
                continue
            exams.append(MrnetExam(case, path, int(row[1])))
    if problems:
        raise problems_error(labels, problems)
    if not exams:
        raise DataError(f"{labels}: no exams listed")
    return exams
