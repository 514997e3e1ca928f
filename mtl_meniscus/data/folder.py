"""The folder format: labels.csv validation, exclusions and splits.

DIR/labels.csv columns: image, fissure, orientation, position; optional patient_id, split,
slice (index into a 3D volume) and mask (a label image: 1 meniscus, 2 tear). Other columns are
ignored, except one whose name is a known one but for case, spaces or punctuation: refused.

Rows are named by their line in the file as an editor shows it (the header is line 1; blank lines
and line breaks inside quoted values count).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from mtl_meniscus.config import DataConfig
from mtl_meniscus.data.masks import read_masks, resized_mask
from mtl_meniscus.data.records import PreparedData, Record, csv_text, inside_path, problems_error
from mtl_meniscus.data.splits import SPLIT_NAMES, split_leaks, stratified_group_split
from mtl_meniscus.errors import DataError, ImageReadError, SliceIndexError
from mtl_meniscus.io.imageio import max_pixels_limit, read_image
from mtl_meniscus.io.orientation import SliceGeometry
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
    if data_dir.is_file():  # e.g. --data DIR/labels.csv
        raise DataError(f"{data_dir} is a file: give the data folder that holds labels.csv (docs/data.md)")
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: not found (a data folder needs labels.csv; docs/data.md)")
    header, rows = read_csv_rows(csv_path)
    repeated = sorted({name for name in header if name and header.count(name) > 1})
    if repeated:
        raise DataError(
            f"{csv_path}: column(s) {', '.join(repeated)} appear more than once in the header "
            f"({', '.join(header)}); keep one of each"
        )
    required = ("image", *tasks.names)
    missing = [c for c in required if c not in header]
    near = _near_misses(header, (*required, *OPTIONAL_COLUMNS))
    if missing or near:
        parts = [
            f"column '{name}' differs from the column '{known}' only in case, spaces or punctuation: "
            f"rename it to '{known}' (column names are matched exactly, and an unknown column is not read)"
            for name, known in near
        ]
        if missing:
            parts.insert(
                0,
                f"missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'} "
                f"(required: {', '.join(required)}; optional: {', '.join(OPTIONAL_COLUMNS)})"
                + _separator_hint(header),
            )
        raise DataError(f"{csv_path}: " + "; ".join(parts))
    problems: list[str] = []
    hints: set[str] = set()  # advice the message ends with, once however many rows need it
    records: list[Record] = []
    written: dict[int, str] = {}  # row -> its image as written
    seen: dict[tuple[str, int], int] = {}  # (normalised path, slice) -> row
    seen_files: dict[tuple[int, int, int], int] = {}  # (device, inode, slice): the file itself
    placed: list[tuple[str, str, int]] = []  # (patient_id, split, row) of rows that name both
    spelt: dict[str, dict[str, int]] = {}  # a patient_id's number -> {its spellings: first row}
    for order, (line, row, extra) in enumerate(rows, start=2):
        _note_numeric_id((row.get("patient_id") or "").strip(), line, spelt)
        split = (row.get("split") or "").strip().lower()
        if (row.get("patient_id") or "").strip() and split in SPLIT_NAMES:
            # from every row, valid or not, so that a leak is reported with the rows' other problems
            placed.append((row["patient_id"].strip(), split, line))
        overlong = _extra_values(line, header, extra)
        problems += overlong
        record = _validate_row(row, line, data_dir, problems, hints, tasks, allow_unknown_subtype)
        if record is None or overlong:
            continue
        written[line] = (row.get("image") or "").strip()
        stat = os.stat(data_dir / record.image)
        # no slice is slice 0: of a 2D image the same pixels (a volume needs a slice: refused anyway)
        slice_index = record.slice or 0
        file_key = (stat.st_dev, stat.st_ino, slice_index)
        first = seen.get((record.image, slice_index), seen_files.get(file_key))
        if first is not None:
            same = written[first] == written[line]
            problems.append(
                f"row {line}: image '{written[line]}' is listed twice (also row {first}"
                + ("" if same else f", as '{written[first]}': the same file")
                + ")"
            )
            continue
        seen[(record.image, slice_index)] = line
        seen_files[file_key] = line
        records.append(dataclasses.replace(record, order=order))
    if not rows:
        problems.append("no data rows")
    filled = sum(1 for _, row, _ in rows if (row.get("split") or "").strip())
    if 0 < filled < len(rows):
        problems.append(
            f"column 'split' is filled on {filled} of {len(rows)} rows: fill it on every row "
            "(it then replaces the automatic split) or on none"
        )
    problems += _split_leak_problems(placed)
    problems += _id_spelling_problems(spelt)
    if problems:
        raise problems_error(csv_path, problems, report_dir, hint="".join(hints))
    return records


def read_csv_rows(
    csv_path: Path, starts_a_row: Callable[[str], bool] | None = None
) -> tuple[list[str], list[tuple[int, dict[str, str], list[str]]]]:
    """A CSV file's header (names stripped) and its rows as (line, {column: value}, values beyond
    the header), for labels.csv and fastMRI+'s knee.csv; a DataError naming the file when it is not
    UTF-8 CSV text, or when a quote opened by mistake swallowed rows: lines inside a quoted value
    that have the header's number of values, their first one what `starts_a_row` takes for a row's
    first value (by default: an image of the data folder, a file next to the CSV).

    `line` is the line the row starts on, as an editor numbers them (the header is line 1). It is
    counted from csv.reader's line_num rather than by counting rows, because a blank line (skipped)
    and a quoted value with a line break inside (one row over two lines) would otherwise shift the
    number of every later row."""
    rows = []
    reader = csv.reader(io.StringIO(csv_text(csv_path)))
    starts_a_row = starts_a_row or (lambda first: bool(first) and (csv_path.parent / first).is_file())
    end = 0  # the last line read so far
    try:
        header = [name.strip() for name in next(reader, [])]
        end = reader.line_num
        for fields in reader:
            start, end = end + 1, reader.line_num
            # a blank line: no row, as csv.DictReader has it; so is a row of empty values
            # (a spreadsheet's ',,,,' under the data), which named each column as missing
            if not any(field.strip() for field in fields):
                continue
            _check_swallowed_rows(csv_path, start, end, fields, len(header), starts_a_row)
            # A short row's missing values are empty (as csv.DictReader has them); values
            # beyond the header are kept apart, to be refused rather than dropped.
            rows.append((start, dict(zip(header, fields)), fields[len(header) :]))
    except csv.Error as err:
        raise DataError(f"{csv_path}: cannot parse as CSV (the row from line {end + 1}: {err})") from None
    return header, rows


def _check_swallowed_rows(
    csv_path: Path, start: int, end: int, fields: list[str], columns: int, starts_a_row: Callable[[str], bool]
) -> None:
    """Refuse a quoted value over several lines that holds what reads as whole rows: a stray quote
    ('"see prior report') makes every line up to the next quote (or the end of the file) one value,
    and those rows were dropped without a word. A note with line breaks of its own is fine, commas
    and all, unless a line of it starts like a row."""
    for field in fields:
        inner = [next(csv.reader([text]), []) for text in field.split("\n")[1:]]
        looks_like_rows = [
            ",".join(values) for values in inner if len(values) >= columns and starts_a_row(values[0].strip())
        ]
        if looks_like_rows:
            raise DataError(
                f"{csv_path}: row {start}: a quoted value runs from line {start} to line {end} and holds "
                f"what read as rows of their own (e.g. '{looks_like_rows[0]}'): a quote (\") opened by "
                "mistake? remove it, or quote the value whole on one line"
            )


def _separator_hint(header: Sequence[str]) -> str:
    """'; it looks ';'-separated ...' when the header read as one column holds another separator
    (a spreadsheet saved with the locale's ';' or as tab-separated text), else ''."""
    if len(header) != 1:
        return ""
    found = next((sep for sep in (";", "\t", "|") if sep in header[0]), None)
    if found is None:
        return ""
    return f"; the header reads as one column and looks {found!r}-separated: save labels.csv with commas"


def _loose(name: str) -> str:
    """A column name without case, spaces or punctuation: 'Patient ID' and 'patient_id' are alike."""
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def _near_misses(header: Sequence[str], known: Sequence[str]) -> list[tuple[str, str]]:
    """(name, known name) for each header name that is not a known column but is one except for
    case, spaces or punctuation. Unknown columns are allowed and ignored (notes, an export's own
    ids), so 'Split' would be ignored without a word, and the automatic split used instead."""
    by_loose = {_loose(name): name for name in known}
    return [
        (name, by_loose[_loose(name)])
        for name in header
        # beside the column itself a look-alike is another column (a PACS export's own PatientID)
        if name and name not in known and _loose(name) in by_loose and by_loose[_loose(name)] not in header
    ]


SHOWN_ROWS = 3  # a patient's rows named per split; a row's values named beyond the header


def _extra_values(line: int, header: Sequence[str], extra: Sequence[str]) -> list[str]:
    """The problem of a row with values beyond the header (none when they are all empty).

    They belong to no column: dropping them could drop a label without a word (an unquoted comma
    in a path moves every later value one column right). Empty ones lose nothing: a trailing comma."""
    if not any(text.strip() for text in extra):
        return []
    shown = ", ".join(f"'{text}'" for text in extra[:SHOWN_ROWS])
    more = f" and {len(extra) - SHOWN_ROWS} more" if len(extra) > SHOWN_ROWS else ""
    return [
        f"row {line}: {len(header) + len(extra)} values, but the header has {len(header)} columns; "
        f"after the last column ('{header[-1]}') no column takes {shown}{more} (a comma too many, "
        "e.g. an unquoted comma inside a value, or a column name missing from the header)"
    ]


WHOLE_NUMBER = re.compile(r"0*(\d+)(?:\.0+)?")  # '007', '7', '7.0': the whole number 7, as tools write it


def _note_numeric_id(patient: str, line: int, spelt: dict[str, dict[str, int]]) -> None:
    """Note a whole-number patient_id's spelling with its first row: leading zeros and a '.0' (as
    pandas writes an id column with gaps) do not change the number. Other ids are left as they are
    ('1.1' and '1.10' may well be two site.subject ids)."""
    found = WHOLE_NUMBER.fullmatch(patient) if patient.isascii() else None
    if found:
        spelt.setdefault(found.group(1).lstrip("0") or "0", {}).setdefault(patient, line)


def _id_spelling_problems(spelt: dict[str, dict[str, int]]) -> list[str]:
    """A problem per whole number written as patient_id in more than one way ('007' and '7'; '7'
    and '7.0'): taken as two patients, one knee's images went to train and to val."""
    return [
        f"patient_id {' and '.join(f'{text!r} (row {line})' for text, line in spellings.items())}: one number "
        "written in several ways, read as different patients; write each patient's id one way (or, "
        "for different patients, ids that are not one whole number with leading zeros or '.0')"
        for spellings in spelt.values()
        if len(spellings) > 1
    ]


def _split_leak_problems(placed: list[tuple[str, str, int]]) -> list[str]:
    """A problem per patient_id whose rows name more than one split in the `split` column: that
    patient's images would be both trained on and scored, and the test score would be too high."""
    patients, splits, lines = zip(*placed) if placed else ((), (), ())
    problems = []
    for patient, by_split in split_leaks(patients, splits).items():
        parts = []
        for split, indices in by_split.items():
            rows = [str(lines[k]) for k in indices]
            shown = ", ".join(rows[:SHOWN_ROWS])
            more = f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else ""
            parts.append(f"{split} (row{'s' if len(rows) > 1 else ''} {shown}{more})")
        problems.append(
            f"patient_id '{patient}' is in more than one split: {', '.join(parts)}; a patient's rows "
            "must share one split, or images of a patient the model trained on are scored as unseen"
        )
    return problems


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
        problems.append(f"row {line}, column '{column}': bad value {_quoted(value(column))} ({allowed})")

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
    if value("slice"):  # ASCII digits only: int() reads '1_0' as 10, and digits of other scripts
        if value("slice").isascii() and value("slice").isdigit():
            slice_index = int(value("slice"))
        else:
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
        slash = " (paths are written with '/', not '\\')" if "\\" in text else ""
        missing = "a folder, not a file" if (data_dir / normal).is_dir() else "file not found"
        shown = str(data_dir / normal) if normal.isprintable() else repr(str(data_dir / normal))
        problems.append(
            f"row {line}, column '{column}': {missing}: {shown}{slash}{_look_alike(data_dir / normal)}"
        )
        return ""
    return normal


def _quoted(text: str) -> str:
    """'text' as a message quotes a value; with its escapes (repr) when it holds a character one
    cannot see (a NUL byte, a control character), which would otherwise print as nothing."""
    return f"'{text}'" if text.isprintable() else repr(text)


def _look_alike(path: Path) -> str:
    """A hint naming a file beside a missing `path` whose name differs from it only in Unicode
    form (é as one character or two: NFC/NFD, as macOS and Windows write names) or in spaces
    around it; '' when there is none."""
    try:
        modified = path.parent.stat().st_mtime_ns
    except OSError:
        return ""
    alike = _names_in_one_form(str(path.parent), modified).get(_same_form(path.name), path.name)
    if alike == path.name:
        return ""
    return f" (the folder holds {alike!r}, a name that differs only in Unicode form or spaces)"


def _same_form(name: str) -> str:
    """A file name in one Unicode form (NFC), without spaces around it."""
    return unicodedata.normalize("NFC", name).strip()


@functools.lru_cache(maxsize=4)
def _names_in_one_form(folder: str, _modified: int) -> dict[str, str]:
    """{name in one form: name} of a folder's entries, listed once while the folder is unchanged (its
    modification time is in the key): the rows of 10,000 missing files list it once, not 10,000 times."""
    try:
        return {_same_form(entry.name): entry.name for entry in os.scandir(folder)}
    except OSError:
        return {}


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
    exclusions: list[tuple[str, int | None, str]] = []
    slice_problems: list[str] = []  # rows whose slice does not fit their file
    resized = stretched = 0
    last_volume: dict = {}  # rows of one volume decode it once (read_image)
    unoriented: list[str] = []  # a row per DICOM/NIfTI file without geometry: taken as stored
    lazy = reads_lazily(config, len(records))
    sources: list[tuple[str, int | None]] = []  # lazy: (image, slice) of each kept row
    views: list[tuple[tuple[int, int], SliceGeometry]] = []  # each kept image's (H, W) as read, geometry
    for done, record in enumerate(records, 1):
        if on_row is not None:
            on_row(done, len(records))  # (rows read, rows in all): a progress display's
        if config.exclude_double_tears and record.labels.get("position") == DOUBLE_TEAR:
            exclusions.append((*record.key, "double tear: position 'both'"))
            continue
        try:
            notes: list[str] = []
            geometry: list[SliceGeometry] = []
            image = read_image(
                data_dir / record.image,
                record.slice,
                max_pixels=max_pixels,
                last_volume=last_volume,
                plane=config.plane,
                notes=notes,
                geometry=geometry,
            )
            unoriented += [record.image] if notes else []
        except SliceIndexError as err:  # the row's slice column is wrong, not its file: a label error
            reason = str(err).removeprefix(f"{data_dir / record.image}: ")
            slice_problems.append(f"row {record.row}, column 'slice': {reason} ({record.image})")
            continue
        except ImageReadError as err:
            exclusions.append((*record.key, f"unreadable: {err}"))
            continue
        view = (image.shape, geometry[0])  # as read: its mask's size and view
        if image.shape != (size, size):
            if config.size_policy == "exclude":
                exclusions.append(
                    (*record.key, f"wrong size: {image.shape[0]}x{image.shape[1]}, expected {size}x{size}")
                )
                continue
            stretched += image.shape[0] != image.shape[1]
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            resized += 1
        kept.append(record)
        views.append(view)
        if lazy:  # checked now, read again when a batch needs it
            sources.append((record.image, record.slice))
        else:
            images.append(image)
    if slice_problems:  # refused as labels.csv's other problems are: that row's tear would be lost
        raise problems_error(data_dir / "labels.csv", slice_problems, report_dir)
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
        stretched=stretched,
        unoriented=len(set(unoriented)),
        masks=_kept_masks(data_dir, kept, views, config, report_dir) if masks else None,
    )


def _kept_masks(
    data_dir: Path,
    kept: list[Record],
    views: list[tuple[tuple[int, int], SliceGeometry]],
    config: DataConfig,
    report_dir: str | Path | None,
) -> list[np.ndarray | None]:
    """The kept rows' masks at the model's size (None for a row without one); one DataError naming
    every bad mask (missing, unreadable, not its image's size, values other than 0/1/2, tear pixels
    on a row labelled no tear)."""
    found = read_masks(data_dir, kept, views, report_dir, max_pixels_limit(config.max_pixels))
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


# What to do when every image has the wrong size (evaluate, which has no --set, says otherwise).
SIZE_ADVICE = "set data.image_size to your images' size, or data.size_policy: resize to resize them"


def _exclusion_reasons(exclusions: list[tuple[str, int | None, str]], size: int) -> str:
    """'all 60 rows were excluded: 60 wrong size (e.g. a.png: 256x256, expected 64x64); ...' and a hint."""
    first: dict[str, tuple[str, str]] = {}
    counts = Counter()
    for image, slice_index, reason in exclusions:
        kind, _, detail = reason.partition(":")
        counts[kind] += 1
        named = image if slice_index is None else f"{image} slice {slice_index}"
        first.setdefault(kind, (named, detail.strip()))
    parts = [f"{counts[kind]} {kind} (e.g. {image}: {detail})" for kind, (image, detail) in first.items()]
    text = f"all {len(exclusions)} rows were excluded: " + "; ".join(parts)
    if "wrong size" in counts:
        text += f". The config expects {size}x{size} images: {SIZE_ADVICE}"
    if "double tear" in counts:
        text += ". Double tears are excluded while data.exclude_double_tears is true"
    return text


def assign_splits(records: list[Record], config: DataConfig) -> list[str]:
    """The `split` column when labels.csv has one, else a stratified (and patient-grouped) split."""
    if records and all(r.split for r in records):
        return [r.split for r in records]
    groups = [r.patient_id or f"__row{r.order or r.row}" for r in records]
    return stratified_group_split(
        [r.stratum for r in records], config.split_fractions, config.split_seed, groups
    )
