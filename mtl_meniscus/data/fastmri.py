"""fastMRI+ knee annotations as a data folder of this package.

fastMRI+ (Zhao et al. 2022) annotates the fastMRI knee volumes with boxes: `knee.csv` has the
columns file,slice,study_level,x,y,width,height,label, one row per box (study_level 'Yes' rows
describe the whole exam and have no box). `import_fastmri_plus` writes a folder that `train`,
`evaluate` and `predict` read like any other:

    OUT/volumes/<file>.h5        a link to each fastMRI file (its reconstruction_rss or _esc)
    OUT/masks/<file>_<slice>.png tear boxes of that slice as mask value 2 (for the saliency check)
    OUT/labels.csv               one row per slice of every volume: image, slice, fissure
                                 (1 where a "Meniscus Tear" box lies on the slice), orientation and
                                 position empty (fastMRI+ does not say them: unknown, so train with
                                 data.allow_unknown_subtype: true), patient_id = the file (all
                                 slices of one knee land in the same split), mask
    OUT/left_out.csv             file, reason: each annotated volume not imported (only when any)

A volume that carries no annotation row at all is left out (the summary counts such .h5 files in
the volumes folder): knee.csv alone cannot tell a volume reviewed with no findings from one never
reviewed. fastMRI+'s knee_file_list.csv lists the reviewed ones ("listed ... but not in the label
files ... reviewed, but there were no findings", its README); given (`reviewed`), each listed
volume without a row is imported as such, fissure 0 on every slice. Left out too is a volume
whose meniscus tear is known at study level only (a study_level 'Yes' "Meniscus Tear" row and no
"Meniscus Tear" box on a slice): the knee has a tear, but no row says on which slices, so no slice
can be labelled, and fissure=0 on each would call a torn knee healthy. Every annotated volume left
out is named with its reason in OUT/left_out.csv (file, reason); the summary counts them.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import shutil
import stat
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from mtl_meniscus.data.folder import read_csv_rows
from mtl_meniscus.data.records import csv_text, inside_path, problems_error
from mtl_meniscus.errors import DataError, ImageReadError
from mtl_meniscus.io.outputs import atomic_csv_file, check_empty_output_dir

TEAR_LABEL = "meniscus tear"  # compared case-insensitively
LEFT_OUT_FILE = "left_out.csv"  # annotated volumes not in labels.csv, and why
STUDY_LEVEL_ONLY = "volumes with a study-level meniscus tear only (left out, listed in left_out.csv)"
COLUMNS = ("file", "slice", "study_level", "x", "y", "width", "height", "label")
FILE_NAME = re.compile(r"file\d+")  # a fastMRI volume's name (its .h5 file without the suffix)
MAX_SLICES = 2048  # a declared slice count above this is not a knee volume (fastMRI's have 30-50)


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():  # a folder: e.g. knee.csv and the volumes' folder given the other way round
        raise DataError(f"{path}: {'a folder' if path.is_dir() else 'not found'} (expected {what})")


def read_annotations(path: Path) -> dict[str, list[dict[str, str]]]:
    """knee.csv as {file: [rows]}, each row with its line number ('_line'); every bad row named at
    once (row number, column, value). A `file` must name a file inside the volumes folder: an
    absolute path or one that leaves it with '..' is refused (the one rule of records.inside_path)."""
    _check_file(path, "the fastMRI+ knee annotations, knee.csv")
    # rows numbered by their line, as an editor numbers them; a row starts with a volume's name
    header, rows = read_csv_rows(
        path, lambda first: FILE_NAME.fullmatch(_without_h5(Path(first).name)) is not None
    )
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(COLUMNS)})")
    by_file: dict[str, list[dict[str, str]]] = defaultdict(list)
    problems = []
    for line, values, extra in rows:
        row = {name: values.get(name) for name in header}  # None: a row shorter than the header
        if any(text.strip() for text in extra):  # 'Meniscus Tear, complex' unquoted: not a tear's label
            problems.append(
                f"row {line}: {len(header) + len(extra)} values, but the header has {len(header)} columns "
                "(an unquoted comma inside a value?)"
            )
            continue
        level = (row["study_level"] or "").strip()
        if level.lower() not in ("yes", "no", ""):  # 'Y' or 'True' is no box row: say so, don't guess
            problems.append(f"row {line}, column 'study_level': {level!r} is neither Yes nor No")
            continue
        if not _is_study_level(row):
            for column in ("slice", "x", "y", "width", "height"):
                if _count(row[column]) is None:
                    problems.append(
                        f"row {line}, column '{column}': bad value {row[column]!r} (a whole number >= 0)"
                    )
        if not (row["label"] or "").strip():  # None: a row shorter than the header
            problems.append(f"row {line}, column 'label': empty (the finding, e.g. 'Meniscus Tear')")
        name = inside_path((row["file"] or "").strip())
        if name is None:
            problems.append(
                f"row {line}, column 'file': {row['file']!r} is not a file name inside the volumes folder "
                "(absolute, or leaves it with '..')"
            )
            continue
        # file1000000, file1000000.h5 and file1000000.H5 name one volume: one key (two linked the file twice)
        by_file[_without_h5(name)].append(row | {"_line": str(line)})
    if problems:
        raise problems_error(path, problems)
    return by_file


def _without_h5(name: str) -> str:
    """A volume's name without its .h5 suffix, in any case."""
    return name[:-3] if name.lower().endswith(".h5") else name


def _is_study_level(row: dict[str, str]) -> bool:
    """A study_level 'Yes' row is about the whole exam: it has no slice and no box."""
    return (row["study_level"] or "").strip().lower() == "yes"


def _is_tear(row: dict[str, str]) -> bool:
    return (row["label"] or "").strip().lower() == TEAR_LABEL


def _study_level_only_tear_rows(rows: list[dict[str, str]]) -> list[str]:
    """Line numbers of a volume's study-level Meniscus Tear rows when it has no Meniscus Tear box on
    a slice (its tear cannot be placed on a slice); empty when it has such a box, or no tear at all."""
    tears = [row for row in rows if _is_tear(row)]
    if any(not _is_study_level(row) for row in tears):
        return []  # the boxes say which slices are torn; a study-level row adds nothing to them
    return [row["_line"] for row in tears]


def _count(text: str | None) -> int | None:
    """A whole number >= 0 written as '12' or '12.0'; None for anything else (also inf and NaN)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value) or value < 0 or value != int(value):
        return None
    return int(value)


def read_reviewed(path: Path) -> tuple[set[str], list[str]]:
    """fastMRI+'s knee_file_list.csv: (the volumes it lists, without '.h5'; its lines that name no
    volume, e.g. the 'Knee data' line the published file ends with, to be reported)."""
    _check_file(path, "fastMRI+'s knee_file_list.csv, one file name per line")
    names, other = set(), []
    for line in csv_text(path).splitlines():
        name = _without_h5(line.strip().strip(","))
        if FILE_NAME.fullmatch(name):
            names.add(name)
        elif name:
            other.append(name)
    if not names:
        raise DataError(f"{path}: names no fastMRI file (expected lines like file1000000)")
    return names, other


def import_fastmri_plus(
    annotations: Path,
    volumes_dir: Path,
    out_dir: Path,
    on_volume: Callable[[int, int], None] | None = None,
    reviewed: Path | None = None,
) -> dict[str, int]:
    """Write OUT (see the module's docstring); returns counts for the summary line.
    `on_volume(done, total)` is called after each volume is read or left out (a progress display).
    `reviewed`: fastMRI+'s knee_file_list.csv, whose volumes without a row are imported healthy.

    Everything is written into a temporary folder beside OUT and moved into place at the end: a
    refused import leaves OUT as it was."""
    annotations, volumes_dir, out_dir = Path(annotations), Path(volumes_dir), Path(out_dir)
    by_file = read_annotations(annotations)
    counts: dict[str, int] = {}
    if reviewed is not None:  # reviewed with no findings: a volume without any row (module docstring)
        names, other = read_reviewed(Path(reviewed))
        # annotated under another path (a subfolder): not a volume without findings, though its
        # annotations are not found where knee.csv says (left_out.csv says so)
        annotated = {Path(key).name for key in by_file}
        found = [n for n in sorted(names - annotated) if (volumes_dir / f"{n}.h5").is_file()]
        by_file |= {name: [] for name in found}
        counts["reviewed volumes without findings (fissure 0 on every slice)"] = len(found)
        if other:
            counts[f"lines of {Path(reviewed).name} naming no volume ({', '.join(map(repr, other[:3]))})"] = (
                len(other)
            )
    if not by_file:  # a header alone: 'none of the 0 annotated volumes is there' said the wrong thing
        raise DataError(
            f"{annotations}: no annotation rows, only the header"
            + (f", and no volume that {reviewed} lists is in {volumes_dir}" if reviewed is not None else "")
        )
    existed = out_dir.exists()
    check_empty_output_dir(out_dir, "OUT", instead="the import writes into an empty folder")  # may create it
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-import-", dir=out_dir.parent))
    try:
        # mkdtemp's folder is its owner's alone (0700); it takes OUT's place, so it takes OUT's group
        # (where the user may give it) and mode (as made by the user, or by mkdir under the umask):
        # the group reads the data as before
        made = out_dir.stat()
        with contextlib.suppress(PermissionError):  # a group the user is not in: kept as made
            os.chown(staging, -1, made.st_gid)
        staging.chmod(stat.S_IMODE(made.st_mode))
        counts = _write_import(annotations, volumes_dir, staging, by_file, on_volume) | counts
        out_dir.rmdir()  # empty (checked above): the staging folder takes its place
        staging.rename(out_dir)
    except BaseException:
        if not existed:
            out_dir.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after the rename
    return counts


def _write_import(
    annotations: Path,
    volumes_dir: Path,
    out_dir: Path,
    by_file: dict[str, list[dict[str, str]]],
    on_volume: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    (out_dir / "volumes").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(exist_ok=True)
    rows, written, not_found, study_level_only = [], 0, [], []
    for done, name in enumerate(sorted(by_file), 1):
        source = volumes_dir / f"{name}.h5"  # names are keyed without the suffix (read_annotations)
        tear_rows = _study_level_only_tear_rows(by_file[name])
        if not source.is_file():
            not_found.append(name)
        elif tear_rows:
            study_level_only.append((name, tear_rows))
        else:
            rows += _volume_rows(annotations, source, by_file[name], out_dir)
            written += 1
        if on_volume is not None:
            on_volume(done, len(by_file))
    counts = {"slices": len(rows), "tear slices": sum(row[2] for row in rows), "volumes": written}
    unannotated = sum(1 for p in volumes_dir.glob("*.h5") if p.stem not in by_file)
    if unannotated:
        counts["volumes in the folder without an annotation row (left out)"] = unannotated
    if not_found:
        counts["annotated volumes not found"] = len(not_found)
    if study_level_only:
        counts[STUDY_LEVEL_ONLY] = len(study_level_only)
    # Only the label "Meniscus Tear" marks a tear; another meniscus finding (or a variant spelling,
    # e.g. "Meniscal Tear") is read as not a tear, so the summary names them for a look.
    others = Counter(
        row["label"].strip()
        for found in by_file.values()
        for row in found
        if not _is_tear(row) and "menisc" in row["label"].lower()
    )
    if others:
        names = ", ".join(f"'{label}'" for label in sorted(others))
        counts[f"rows of other meniscus findings, not read as tears ({names})"] = sum(others.values())
    if not rows and not study_level_only:
        raise DataError(
            f"{volumes_dir}: none of the {len(by_file)} annotated volumes of {annotations} is there"
        )
    if not rows:
        names = [name for name, _ in study_level_only]
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
        raise DataError(
            f"{annotations}: every annotated volume found in {volumes_dir} ({shown}) has its meniscus "
            "tear at study level only (a study_level 'Yes' row, no box on a slice): no slice can be "
            "labelled, so there is nothing to import"
        )
    if not_found or study_level_only:
        _write_left_out(out_dir / LEFT_OUT_FILE, annotations, volumes_dir, not_found, study_level_only)
    with atomic_csv_file(out_dir / "labels.csv") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "slice", "fissure", "orientation", "position", "patient_id", "mask"])
        writer.writerows(rows)
    return counts


def _write_left_out(
    path: Path,
    annotations: Path,
    volumes_dir: Path,
    not_found: list[str],
    study_level_only: list[tuple[str, list[str]]],
) -> None:
    """left_out.csv: file, reason for each annotated volume that labels.csv does not hold."""
    with atomic_csv_file(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "reason"])
        for name in not_found:
            writer.writerow([name, f"not in {volumes_dir}"])
        for name, lines in study_level_only:
            rows = f"row{'s' if len(lines) > 1 else ''} {', '.join(lines)}"
            writer.writerow(
                [
                    name,
                    f"{annotations} {rows}: a Meniscus Tear at study level only, on no slice: its slices "
                    "cannot be labelled (fissure 0 on each would call the torn knee healthy)",
                ]
            )


def _volume_rows(
    annotations: Path, source: Path, annotated: list[dict[str, str]], out_dir: Path
) -> list[list]:
    """labels.csv's rows of one volume, a row per slice; links the volume into OUT/volumes and
    writes a mask for each slice with a tear box."""
    n_slices, height, width = _volume_shape(source)
    boxes = _tear_boxes(annotations, source, annotated, (n_slices, height, width))
    os.symlink(source.resolve(), out_dir / "volumes" / source.name)
    rows = []
    for index in range(n_slices):
        mask = ""
        if boxes.get(index):
            picture = np.zeros((height, width), np.uint8)
            for x, y, w, h in boxes[index]:
                picture[y : y + h, x : x + w] = 2  # 2 = tear, as in the phantom's masks
            mask = f"masks/{source.stem}_{index:03d}.png"
            if not cv2.imwrite(str(out_dir / mask), picture):  # OpenCV says False, it does not raise
                raise DataError(f"{out_dir / mask}: could not be written (a full disk or a file-size limit?)")
        tear = int(bool(boxes.get(index)))
        rows.append([f"volumes/{source.name}", index, tear, "", "", source.stem, mask])
    return rows


def _volume_shape(source: Path) -> tuple[int, int, int]:
    """(slices, height, width) of a fastMRI file's reconstruction, from its header: a 3-D volume
    within the pixel budget (imageio.max_pixels_limit) and MAX_SLICES; a DataError naming the file."""
    import h5py

    from mtl_meniscus.io.imageio import (
        HDF5_DATASETS,
        PixelBudget,
        check_pixel_budget,
        hdf5_reconstruction,
        max_pixels_limit,
    )

    try:
        with h5py.File(source, "r") as handle:
            dataset = hdf5_reconstruction(handle)
            if dataset is None:
                raise DataError(f"{source}: no {' or '.join(HDF5_DATASETS)} dataset (a k-space-only file?)")
            shape = tuple(int(d) for d in dataset.shape)
    except OSError as err:  # h5py's error for a truncated or damaged file
        raise DataError(f"{source}: not a readable HDF5 file ({err})") from None
    if len(shape) != 3 or min(shape) <= 0:
        raise DataError(f"{source}: the reconstruction has shape {shape}; expected (slices, height, width)")
    if shape[0] > MAX_SLICES:
        raise DataError(
            f"{source}: declares {shape[0]} slices; a knee volume has far fewer (at most {MAX_SLICES})"
        )
    budget = PixelBudget(max_pixels_limit())
    try:
        check_pixel_budget(
            budget.cost(*shape),
            budget,
            f"{source}: a volume of {'x'.join(map(str, shape))}",
        )
    except ImageReadError as err:
        raise DataError(str(err)) from None
    return shape


def _tear_boxes(
    annotations: Path, source: Path, rows: list[dict[str, str]], shape: tuple[int, int, int]
) -> dict[int, list[tuple[int, int, int, int]]]:
    """{slice: [(x, y, width, height)]} of the volume's Meniscus Tear boxes; a box on no slice of
    the volume, or not on its image, is an error naming its row."""
    n_slices, height, width = shape
    boxes, problems = defaultdict(list), []
    for row in rows:
        if _is_study_level(row) or not _is_tear(row):
            continue
        index = _count(row["slice"])
        x, y, w, h = (_count(row[c]) for c in ("x", "y", "width", "height"))
        where = f"row {row['_line']}: a Meniscus Tear box of {source.name}"
        if index >= n_slices:
            problems.append(
                f"{where} on slice {index}, but the volume has {n_slices} slices (0..{n_slices - 1})"
            )
        elif w == 0 or h == 0 or x >= width or y >= height:
            problems.append(
                f"{where} at x={x}, y={y}, {w}x{h}, outside its {width}x{height} image (or empty)"
            )
        else:
            boxes[index].append((x, y, w, h))
    if problems:
        raise problems_error(annotations, problems)
    return boxes
