"""`predict`: probabilities and gated labels for image files and folders, one row per input.

A bad input (unreadable, truncated DICOM, 3D volume without a slice, NaN pixels, wrong size
with --strict-size, too large, multi-page, a broken link) gets its own row with an `error`; the
other inputs are still predicted. The output location is checked before anything is predicted.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from rich.console import Console

from mtl_meniscus.engine.answers import (
    Prediction,
    csv_columns,
    exam_columns,
    exam_rows,
    gate,  # noqa: F401  (predict's gating, imported from here by tests and users)
    gated_row,
    json_row,
    read_slice,
)
from mtl_meniscus.engine.progress import progress_bar
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import TrainedModel, load_trained, resolve_threshold
from mtl_meniscus.errors import ImageReadError, MeniscusError
from mtl_meniscus.io.imageio import (
    DICOM_SUFFIXES,
    HDF5_SUFFIXES,
    NIFTI_SUFFIXES,
    NUMPY_SUFFIXES,
    image_suffix,
    is_supported_image,
    max_pixels_limit,
)
from mtl_meniscus.io.outputs import atomic_write, check_output_dir, check_output_file
from mtl_meniscus.labels import DEFAULT_TASKS
from mtl_meniscus.networks.cam import unique_names, write_overlays

VOLUME_HINT = "predict reads 2D slices only: save the slice to predict as its own file"


CSV_COLUMNS = csv_columns(DEFAULT_TASKS, DEFAULT_TASKS.names)  # a model of the built-in three tasks


def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, and the supported image files under folders (recursively, sorted); a broken
    link with a supported name is listed too, so that it gets its error row."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if (p.is_file() or p.is_symlink()) and is_supported_image(p)
            )
            files.extend(p for p in found if not p.is_dir())
        else:
            files.append(path)  # missing or unsupported files get an error row
    return files


VOLUME_SUFFIXES = NUMPY_SUFFIXES + NIFTI_SUFFIXES + HDF5_SUFFIXES  # a file that can be a whole exam


def collect_exams(inputs: list[Path]) -> list[Path]:
    """The exams named on the command line: a volume file is one exam; a folder of DICOM files is
    one series; a folder without DICOM files but with volume files (MRNet's `valid/sagittal/`) is
    one exam per volume file, in name order."""
    exams: list[Path] = []
    for path in inputs:
        if path.is_dir() and not any(
            image_suffix(p) in DICOM_SUFFIXES for p in path.iterdir() if p.is_file()
        ):
            volumes = sorted(p for p in path.iterdir() if p.is_file() and image_suffix(p) in VOLUME_SUFFIXES)
            exams.extend(volumes or [path])  # nothing of either kind: the folder gets its error row
        else:
            exams.append(path)
    return exams


def run_predict(
    run_or_checkpoint: Path,
    inputs: list[Path],
    out: Path,
    as_json: bool = False,
    tta_copies: int | None = None,
    threshold: float | None = None,
    strict_size: bool = False,
    batch_size: int = 32,
    cam_dir: Path | None = None,
    seed: int = 0,
    precision: str = "auto",
    console: Console | None = None,
    device: str | None = None,
) -> list[Prediction]:
    """Predict every input and write CSV (or JSON lines); returns the rows in input order."""
    console = console or Console(soft_wrap=True)
    check_output_file(out, "--out")  # before any work: a bad --out must not cost the predictions
    if cam_dir is not None:
        check_output_dir(cam_dir, "--cam")
    runtime = resolve_runtime(precision, device)
    trained = load_trained(run_or_checkpoint, runtime)
    config = trained.config
    if cam_dir is not None and config.model.exam_pooling is not None:
        raise MeniscusError(
            f"--cam: {trained.checkpoint} is a model of whole exams; saliency maps are for slice models"
        )
    size = config.data.image_size
    max_pixels = max_pixels_limit(config.data.max_pixels)
    chosen = resolve_threshold(trained, threshold)
    cut = chosen.value
    tasks = trained.tasks
    names = trained.outputs
    tta = trained.tta(tta_copies)
    console.print(chosen.describe(tta.copies), highlight=False, markup=False)
    console.print(trained.calibration_note, highlight=False, markup=False)
    files = collect_inputs(inputs)
    if not files:
        raise MeniscusError("no input images found (supported: PNG, TIFF, JPEG, DICOM, NIfTI, .npy)")

    rows, good = _read_inputs(files, size, max_pixels, strict_size, config.data.plane)
    if good:
        _predict_rows(trained, good, rows, runtime, tta, cut, seed, batch_size, console)
        if cam_dir is not None:
            _write_cams(
                trained, [(i, image) for i, image in good if not rows[i].error], rows, cam_dir, runtime
            )

    _write_table(out, csv_columns(tasks, names), [row.row(tasks, names) for row in rows], as_json)
    failed = sum(1 for r in rows if r.error)
    console.print(
        f"predicted {len(rows) - failed} of {len(rows)} images (TTA {tta.copies} copies, "
        f"fissure threshold {cut:.3f}) -> {out}"
        + (f"; {failed} failed, see the error column" if failed else "")
    )
    return rows


def _read_inputs(
    files: list[Path], size: int, max_pixels: int, strict_size: bool, plane: str
) -> tuple[list[Prediction], list[tuple[int, np.ndarray]]]:
    """A row per file (with the error of a file that cannot be read) and the (row index, image) of
    those that can, resized to the model's size unless strict_size."""
    rows: list[Prediction] = []
    good: list[tuple[int, np.ndarray]] = []
    for path in files:
        name = str(path)
        try:
            image, note = read_slice(path, size, max_pixels, plane, VOLUME_HINT, strict_size)
        except ImageReadError as err:
            rows.append(Prediction(image=name, error=str(err)))
            continue
        except Exception as err:  # whatever else one file does, it fails that file's row only
            rows.append(Prediction(image=name, error=f"{name}: cannot read ({type(err).__name__}: {err})"))
            continue
        rows.append(Prediction(image=name, note=note))
        good.append((len(rows) - 1, image))
    return rows, good


def _predict_rows(
    trained, good, rows: list[Prediction], runtime, tta, cut, seed, batch_size, console
) -> None:
    """Fill the rows of the readable images with the gated predictions, in chunks of 256 images
    (they bound the memory of large folders); a non-finite output fails its row only."""
    with progress_bar(console) as progress:
        bar = progress.add_task("predicting", total=len(good) * (tta.copies + 1))
        for start in range(0, len(good), 256):
            chunk = good[start : start + 256]
            probs = trained.predict(
                [image for _, image in chunk],
                runtime,
                tta=tta,
                seed=seed + start,
                batch_size=batch_size,
                on_batch=lambda n: progress.update(bar, advance=n),
            )
            for k, (row_index, _) in enumerate(chunk):
                row = rows[row_index]
                rows[row_index] = gated_row(probs, k, trained, cut, row.image, row.note)


def _write_cams(trained: TrainedModel, good, rows: list[Prediction], cam_dir: Path, runtime) -> None:
    """Overlays named after each input's file name; inputs sharing a file name get their whole path
    in the name instead, so that no overlay overwrites another."""
    names = unique_names([rows[i].image for i, _ in good], lambda p: Path(p).name.replace(".", "_"))
    for (_, image), name in zip(good, names):
        cams = trained.saliency(image, runtime)
        write_overlays(cam_dir, name, image, cams)


def _write_table(out: Path, columns: list[str], rows: list[dict], as_json: bool) -> None:
    """The rows as CSV with these columns, or as JSON lines with empty cells as null."""
    with atomic_write(out) as tmp, tmp.open("w", newline="") as handle:
        if as_json:
            for row in rows:
                handle.write(json.dumps(json_row(row, columns)) + "\n")
        else:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


# ---- whole exams --------------------------------------------------------------------------------


def run_predict_exams(
    run_or_checkpoint: Path,
    exams: list[Path],
    out: Path,
    as_json: bool = False,
    tta_copies: int | None = None,
    threshold: float | None = None,
    with_slices: bool = False,
    batch_size: int = 32,
    seed: int = 0,
    precision: str = "auto",
    console: Console | None = None,
    device: str | None = None,
) -> list[dict]:
    """One row per exam (a volume file or a DICOM series folder).

    From a slice model, the exam's fissure probability is the highest of its slices' (max pooling,
    as in MRNet) and the most suspicious slice (`top_slice`, 0-based in the exam's order) gives
    orientation and position, gated as for a slice; an exam model gives the exam its own output
    (TrainedModel.predict_exam). `with_slices` adds a row per slice. A bad exam gets an error row;
    the others are predicted. Returns the rows as written.
    """
    console = console or Console(soft_wrap=True)
    check_output_file(out, "--out")
    exams = collect_exams(exams)
    runtime = resolve_runtime(precision, device)
    trained = load_trained(run_or_checkpoint, runtime)
    tasks, names = trained.tasks, trained.outputs
    chosen = resolve_threshold(trained, threshold)
    tta = trained.tta(tta_copies)
    console.print(chosen.describe(tta.copies), highlight=False, markup=False)
    console.print(trained.calibration_note, highlight=False, markup=False)
    columns = exam_columns(tasks, names)
    rows: list[dict] = []
    for k, path in enumerate(exams):
        rows += exam_rows(trained, path, runtime, tta, chosen.value, seed + k, batch_size, with_slices)
    rows = [{column: row.get(column, "") for column in columns} for row in rows]
    _write_table(out, columns, rows, as_json)
    failed = sum(1 for row in rows if row["error"])
    console.print(
        f"predicted {len(exams) - failed} of {len(exams)} exams (TTA {tta.copies} copies, fissure threshold "
        f"{chosen.value:.3f}; exam = {trained.exam_rule}) -> {out}"
        + (f"; {failed} failed, see the error column" if failed else "")
    )
    return rows
