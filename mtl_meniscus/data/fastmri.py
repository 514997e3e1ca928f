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

Slices of a volume that carries no annotation row at all are left out: fastMRI+ did not annotate
every volume, and an unannotated volume is not a healthy one.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from mtl_meniscus.data.records import problems_error
from mtl_meniscus.errors import DataError
from mtl_meniscus.io.outputs import atomic_write, check_empty_output_dir

TEAR_LABEL = "meniscus tear"  # compared case-insensitively
COLUMNS = ("file", "slice", "study_level", "x", "y", "width", "height", "label")


def read_annotations(path: Path) -> dict[str, list[dict[str, str]]]:
    """knee.csv as {file: [rows]}; a bad row is named (row number, column, value)."""
    if not path.is_file():
        raise DataError(f"{path}: not found (the fastMRI+ knee annotations, knee.csv)")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(COLUMNS)})")
        by_file: dict[str, list[dict[str, str]]] = defaultdict(list)
        problems = []
        for line, row in enumerate(reader, start=2):
            if (row["study_level"] or "").strip().lower() != "yes":
                for column in ("slice", "x", "y", "width", "height"):
                    try:
                        if int(float(row[column])) < 0:
                            raise ValueError
                    except (TypeError, ValueError):
                        problems.append(
                            f"row {line}, column '{column}': bad value {row[column]!r} (a number >= 0)"
                        )
            by_file[row["file"].strip()].append(row)
        if problems:
            raise problems_error(path, problems)
    return by_file


def import_fastmri_plus(annotations: Path, volumes_dir: Path, out_dir: Path) -> dict[str, int]:
    """Write OUT (see the module's docstring); returns counts for the summary line."""
    import h5py

    from mtl_meniscus.io.imageio import HDF5_DATASETS

    annotations, volumes_dir, out_dir = Path(annotations), Path(volumes_dir), Path(out_dir)
    by_file = read_annotations(annotations)
    check_empty_output_dir(out_dir, "OUT", instead="the import writes into an empty folder")
    (out_dir / "volumes").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(exist_ok=True)
    rows, counts = [], defaultdict(int)
    for name in sorted(by_file):
        source = volumes_dir / (name if name.endswith(".h5") else f"{name}.h5")
        if not source.is_file():
            counts["annotated volumes not found"] += 1
            continue
        with h5py.File(source, "r") as handle:
            dataset = next((handle[n] for n in HDF5_DATASETS if n in handle), None)
            if dataset is None:
                raise DataError(f"{source}: no {' or '.join(HDF5_DATASETS)} dataset (a k-space-only file?)")
            n_slices, height, width = dataset.shape
        boxes = defaultdict(list)
        for row in by_file[name]:
            is_box = (row["study_level"] or "").strip().lower() != "yes"  # 'Yes': about the whole exam
            if is_box and row["label"].strip().lower() == TEAR_LABEL:
                box = tuple(int(float(row[c])) for c in ("x", "y", "width", "height"))
                boxes[int(float(row["slice"]))].append(box)
        outside = sorted(index for index in boxes if index >= n_slices)
        if outside:
            raise DataError(
                f"{annotations}: a Meniscus Tear box of {name} on slice {outside[0]}, but {source} has "
                f"{n_slices} slices (0..{n_slices - 1})"
            )
        os.symlink(source.resolve(), out_dir / "volumes" / source.name)
        for index in range(n_slices):
            mask = ""
            if boxes.get(index):
                picture = np.zeros((height, width), np.uint8)
                for x, y, w, h in boxes[index]:
                    picture[y : y + h, x : x + w] = 2  # 2 = tear, as in the phantom's masks
                mask = f"masks/{source.stem}_{index:03d}.png"
                cv2.imwrite(str(out_dir / mask), picture)
            tear = int(bool(boxes.get(index)))
            rows.append([f"volumes/{source.name}", index, tear, "", "", source.stem, mask])
            counts["slices"] += 1
            counts["tear slices"] += tear
        counts["volumes"] += 1
    if not rows:
        raise DataError(
            f"{volumes_dir}: none of the {len(by_file)} annotated volumes of {annotations} is there"
        )
    with atomic_write(out_dir / "labels.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "slice", "fissure", "orientation", "position", "patient_id", "mask"])
        writer.writerows(rows)
    return dict(counts)
