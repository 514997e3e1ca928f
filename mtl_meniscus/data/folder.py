"""The folder format: labels.csv validation, exclusions and splits.

DIR/labels.csv columns: image, fissure, orientation, position; optional patient_id, split,
slice (index into a 3D volume) and mask (a label image: 1 meniscus, 2 tear).
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from mtl_meniscus.config import DataConfig
from mtl_meniscus.data.masks import read_masks, resized_mask
from mtl_meniscus.data.records import PreparedData, Record, inside_path, problems_error
from mtl_meniscus.data.splits import SPLIT_NAMES, stratified_group_split
from mtl_meniscus.errors import DataError, ImageReadError
from mtl_meniscus.io.imageio import max_pixels_limit, read_image
from mtl_meniscus.labels import DEFAULT_TASKS, DOUBLE_TEAR, TaskTable

OPTIONAL_COLUMNS = ("patient_id", "split", "slice", "mask")


UNKNOWN_SUBTYPE_HINT = (
    "\n  (an empty orientation or position on a tear is an error unless unknown subtypes are "
    "expected: set data.allow_unknown_subtype: true to mask them in the loss and the metrics)"
)


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


def prepare_folder(
    data_dir: str | Path,
    config: DataConfig,
    report_dir: str | Path | None = None,
    on_row: Callable[[int, int], None] | None = None,
    masks: bool = False,
) -> PreparedData:
    """Validate labels.csv, read every image, apply the exclusion rules and split the rest.

    `report_dir` receives labels_problems.txt when labels.csv has more problems than the error shows.
    With `masks` the kept rows' masks are read too (data/masks.py: every bad one named in one
    DataError) and resized with their images.
    """
    data_dir = Path(data_dir)
    tasks = config.task_table()
    records = read_labels(data_dir, report_dir, tasks, config.allow_unknown_subtype)
    size = config.image_size
    max_pixels = max_pixels_limit(config.max_pixels)
    kept: list[Record] = []
    images: list[np.ndarray] = []
    exclusions: list[tuple[str, str]] = []
    resized = 0
    last_volume: dict[Path, np.ndarray] = {}  # rows of one volume decode it once (read_image)
    unoriented: list[str] = []  # a row per DICOM/NIfTI file without geometry: taken as stored
    lazy = reads_lazily(config, len(records))
    sources: list[tuple[str, int | None]] = []  # lazy: (image, slice) of each kept row
    shapes: list[tuple[int, int]] = []  # each kept image's (H, W) as read
    for done, record in enumerate(records, 1):
        if on_row is not None:
            on_row(done, len(records))  # (rows read, rows in all): a progress display's
        if config.exclude_double_tears and record.labels.get("position") == DOUBLE_TEAR:
            exclusions.append((record.image, "double tear: position 'both'"))
            continue
        try:
            notes: list[str] = []
            image = read_image(
                data_dir / record.image,
                record.slice,
                max_pixels=max_pixels,
                last_volume=last_volume,
                plane=config.plane,
                notes=notes,
            )
            unoriented += [record.image] if notes else []
        except ImageReadError as err:
            exclusions.append((record.image, f"unreadable: {err}"))
            continue
        shape = image.shape  # as read: its mask's size
        if image.shape != (size, size):
            if config.size_policy == "exclude":
                exclusions.append(
                    (record.image, f"wrong size: {image.shape[0]}x{image.shape[1]}, expected {size}x{size}")
                )
                continue
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            resized += 1
        kept.append(record)
        shapes.append(shape)
        if lazy:  # checked now, read again when a batch needs it
            sources.append((record.image, record.slice))
        else:
            images.append(image)
    if not kept:
        raise DataError(f"{data_dir}: no usable image left: {_exclusion_reasons(exclusions, size)}")
    targets = np.stack([r.targets(tasks) for r in kept])
    splits = assign_splits(kept, config)
    return PreparedData(
        data_dir=data_dir,
        records=kept,
        images=LazySlices(data_dir, sources, config) if lazy else images,
        targets=targets,
        splits=splits,
        tasks=tasks,
        exclusions=exclusions,
        n_rows=len(records),
        resized=resized,
        unoriented=len(set(unoriented)),
        masks=_kept_masks(data_dir, kept, shapes, config, report_dir) if masks else None,
    )


def _kept_masks(
    data_dir: Path,
    kept: list[Record],
    shapes: list[tuple[int, int]],
    config: DataConfig,
    report_dir: str | Path | None,
) -> list[np.ndarray | None]:
    """The kept rows' masks at the model's size (None for a row without one); one DataError naming
    every bad mask (missing, unreadable, not its image's size, values other than 0/1/2)."""
    found = read_masks(data_dir, kept, shapes, report_dir, max_pixels_limit(config.max_pixels))
    return [None if mask is None else resized_mask(mask, config.image_size) for mask in found]


LAZY_ABOVE_BYTES = 2 << 30  # data.load auto: images of more than 2 GiB (float32) are read lazily


def reads_lazily(config: DataConfig, n_rows: int) -> bool:
    """Whether the images are read from their files when needed (data.load) rather than held."""
    if config.load != "auto":
        return config.load == "lazy"
    return n_rows * config.image_size**2 * 4 > LAZY_ABOVE_BYTES


class LazySlices(Sequence):
    """The kept images of a labels.csv folder, read from their files when asked for, as float32
    (image_size, image_size): the same pixels prepare_folder checked (the same reader, plane and
    resize), without holding them. Picklable, for DataLoader workers."""

    def __init__(self, data_dir: Path, sources: list[tuple[str, int | None]], config: DataConfig):
        self.data_dir, self.sources = Path(data_dir), sources
        self.size, self.plane = config.image_size, config.plane
        self.max_pixels = max_pixels_limit(config.max_pixels)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> np.ndarray:
        image, slice_index = self.sources[index]
        pixels = read_image(self.data_dir / image, slice_index, max_pixels=self.max_pixels, plane=self.plane)
        if pixels.shape != (self.size, self.size):
            pixels = cv2.resize(pixels, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return pixels


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
