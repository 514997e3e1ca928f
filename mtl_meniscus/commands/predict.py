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
    csv_row,
    exam_columns,
    exam_rows,
    gate,  # noqa: F401  (predict's gating, imported from here by tests and users)
    gated_row,
    json_row,
    read_slice,
    volume_rows,
)
from mtl_meniscus.engine.horns import exam_answers, horn_answer, label_maps, masks_note, write_answer
from mtl_meniscus.engine.progress import progress_bar
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import TrainedModel, load_trained, resolve_threshold
from mtl_meniscus.errors import ImageReadError, MeniscusError
from mtl_meniscus.io.exams import is_series_file, read_exam
from mtl_meniscus.io.imageio import (
    HDF5_SUFFIXES,
    NIFTI_SUFFIXES,
    NUMPY_SUFFIXES,
    image_suffix,
    is_supported_image,
    max_pixels_limit,
    read_image,
)
from mtl_meniscus.io.outputs import atomic_write, check_output_file, check_own_output_dir, first_line, some_of
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
    """The exams named on the command line: a volume file is one exam; a folder gives itself when
    it holds a series' files (known as the series reader knows them: by suffix or by content),
    then each volume file in it (MRNet's `valid/sagittal/`), then each subfolder that holds a series
    (a folder of exams as data.md shows one; such a series was skipped unsaid), in name order. Volume
    files deeper down are not searched: MRNet's `valid/` holds its axial and coronal `.npy`, which
    carry no plane to refuse them by. A folder with none of these gets its error row."""
    exams: list[Path] = []
    for path in inputs:
        if not path.is_dir():
            exams.append(path)
            continue
        entries = sorted(path.iterdir())
        files = [p for p in entries if p.is_file()]
        found = [path] if _holds_series(files) else []
        found += [p for p in files if image_suffix(p) in VOLUME_SUFFIXES]
        found += [p for p in entries if p.is_dir() and _holds_series(p.iterdir())]
        exams.extend(found or [path])
    return exams


def _holds_series(files) -> bool:
    return any(_is_series_file(p) for p in files if p.is_file())


def _is_series_file(file: Path) -> bool:
    try:
        return is_series_file(file)
    except ImageReadError:  # unreadable: the series reader names it in the folder's row
        return True


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
    masks_dir: Path | None = None,
) -> list[Prediction]:
    """Predict every input and write CSV (or JSON lines); returns the rows in input order. With
    `masks_dir`, each input's predicted mask, horn boxes and overlay as well (_write_masks)."""
    console = console or Console(soft_wrap=True)
    _check_outputs(out, cam_dir, masks_dir)  # before any work: a bad output must not cost the predictions
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
    _describe_answers(trained, chosen.describe(tta.copies), console)
    files = collect_inputs(inputs)
    if not files:
        raise MeniscusError(
            f"no input images found in {some_of(inputs)} (supported: PNG, TIFF, JPEG, DICOM, NIfTI, .npy)"
        )

    rows, good = _read_inputs(files, size, max_pixels, strict_size, config.data.plane)
    if good:
        _predict_rows(trained, good, rows, runtime, tta, cut, seed, batch_size, console)
        readable = [(i, image) for i, image in good if not rows[i].error]
        if cam_dir is not None:
            _write_cams(trained, readable, rows, cam_dir, runtime)
        if masks_dir is not None:
            _write_masks(trained, readable, rows, masks_dir, runtime, batch_size, console)
    columns = csv_columns(tasks, names, masks=masks_dir is not None)
    _write_table(out, columns, [row.row(tasks, names) for row in rows], as_json)
    failed = sum(1 for r in rows if r.error)
    console.print(
        f"predicted {len(rows) - failed} of {len(rows)} images (TTA {tta.copies} copies, "
        f"fissure threshold {cut:.3f}) -> {out}"
        + (f"; {failed} failed, see the error column" if failed else "")
    )
    return rows


def _check_outputs(out: Path, cam_dir: Path | None, masks_dir: Path | None) -> None:
    """--out, --cam and --masks can be written (OutputError naming the option otherwise), and
    replace nothing but this command's own earlier output (io.outputs)."""
    check_output_file(out, "--out", written_here=is_prediction_table)
    for folder, option in ((cam_dir, "--cam"), (masks_dir, "--masks")):
        if folder is not None:
            check_own_output_dir(folder, option)


def _describe_answers(trained: TrainedModel, threshold: str, console: Console) -> None:
    """What the answers rest on, before them: the threshold, the calibration, and a warning when
    the run did not learn or is still training."""
    for line in (threshold, trained.calibration_note, trained.did_not_learn_note, trained.in_training_note):
        if line:
            console.print(line, highlight=False, markup=False)


def is_prediction_table(path: Path) -> bool:
    """Whether `path` holds predict's output, by its first line: a CSV header or a JSON line with
    predict's columns: the image (or exam) first, p_<task> columns and the error column (which
    evaluate's predictions.csv and compare's test_predictions.csv lack)."""
    line = first_line(path)
    if line.startswith("{"):
        try:
            row = json.loads(line)
        except ValueError:
            return False
        columns = list(row) if isinstance(row, dict) else []
    else:
        columns = line.split(",")
    return (
        bool(columns)
        and columns[0] in ("image", "exam")
        and "error" in columns
        and any(column.startswith("p_") for column in columns)
    )


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
                seed=seed,
                batch_size=batch_size,
                same_draws=True,  # a file's answer does not depend on the other files
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


def input_stem(path: str) -> str:
    """A file's name without its image suffix ('knee.nii.gz' -> 'knee'): masks are named after it."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


def _write_masks(
    trained: TrainedModel, good, rows: list[Prediction], masks_dir: Path, runtime, batch_size, console
) -> None:
    """--masks: for each readable input, DIR/<name>.png (the predicted label map at the input's size
    and in its own geometry; none without a decoder) and DIR/overlays/<name>.png, and the row's mask
    cells. <name> is the file's name without its suffix; inputs that share it are named after their
    whole path (as --cam's overlays). The file is read again for its own size and geometry."""
    console.print(masks_note(trained, masks_dir), highlight=False, markup=False)
    names = unique_names([rows[i].image for i, _ in good], input_stem)
    data = trained.config.data
    for start in range(0, len(good), 256):  # chunks bound the memory, as in _predict_rows
        chunk = good[start : start + 256]
        maps = label_maps(trained, [image for _, image in chunk], runtime, batch_size)
        for (i, _), name, label_map in zip(chunk, names[start : start + 256], maps):
            geometry: list = []
            try:
                image = read_image(
                    rows[i].image,
                    max_pixels=max_pixels_limit(data.max_pixels),
                    plane=data.plane,
                    geometry=geometry,
                )
            except ImageReadError as err:  # the file changed since it was predicted
                rows[i].note = "; ".join(filter(None, [rows[i].note, f"no mask: {err}"]))
                continue
            answer = horn_answer(image, geometry[0], label_map)
            written = write_answer(answer, masks_dir / f"{name}.png", masks_dir / "overlays" / f"{name}.png")
            rows[i].masks = answer.cells(written)
            rows[i].note = "; ".join(filter(None, [rows[i].note, answer.note]))


def _write_table(out: Path, columns: list[str], rows: list[dict], as_json: bool) -> None:
    """The rows as CSV with these columns, or as JSON lines with empty cells as null."""
    with atomic_write(out) as tmp, tmp.open("w", newline="") as handle:
        if as_json:
            for row in rows:
                handle.write(json.dumps(json_row(row, columns)) + "\n")
        else:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(csv_row(row) for row in rows)


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
    masks_dir: Path | None = None,
) -> list[dict]:
    """One row per exam (a volume file or a DICOM series folder).

    From a slice model, the exam's fissure probability is the highest of its slices' (max pooling,
    as in MRNet) and the most suspicious slice (`top_slice`, 0-based in the exam's order) gives
    orientation and position, gated as for a slice; an exam model gives the exam its own output
    (TrainedModel.predict_exam). `with_slices` adds a row per slice. A bad exam gets an error row;
    the others are predicted. With `masks_dir`, each slice's mask and overlay as well
    (_exam_rows_with_masks). Returns the rows as written.
    """
    console = console or Console(soft_wrap=True)
    _check_outputs(out, None, masks_dir)
    exams = collect_exams(exams)
    runtime = resolve_runtime(precision, device)
    trained = load_trained(run_or_checkpoint, runtime)
    tasks, names = trained.tasks, trained.outputs
    chosen = resolve_threshold(trained, threshold)
    tta = trained.tta(tta_copies)
    _describe_answers(trained, chosen.describe(tta.copies), console)
    columns = exam_columns(tasks, names, masks=masks_dir is not None)
    if masks_dir is not None:
        console.print(masks_note(trained, masks_dir), highlight=False, markup=False)
    folders = unique_names([str(path) for path in exams], input_stem)
    rows: list[dict] = []
    for k, path in enumerate(exams):
        answer = (trained, path, runtime, tta, chosen.value, seed, batch_size, with_slices)
        if masks_dir is None:
            rows += exam_rows(*answer)
        else:
            rows += _exam_rows_with_masks(
                *answer, masks_dir / folders[k], masks_dir / "overlays" / folders[k]
            )
    rows = [{column: row.get(column, "") for column in columns} for row in rows]
    _write_table(out, columns, rows, as_json)
    failed = sum(1 for row in rows if row["error"])
    console.print(
        f"predicted {len(exams) - failed} of {len(exams)} exams (TTA {tta.copies} copies, fissure threshold "
        f"{chosen.value:.3f}; exam = {trained.exam_rule}) -> {out}"
        + (f"; {failed} failed, see the error column" if failed else "")
    )
    return rows


def _exam_rows_with_masks(
    trained: TrainedModel,
    path: Path,
    runtime,
    tta,
    cut,
    seed,
    batch_size,
    with_slices,
    folder: Path,
    overlays: Path,
) -> list[dict]:
    """exam_rows, and each slice's mask and overlay (folder/<slice>.png, overlays/<slice>.png,
    <slice> the 0-based slice of the `slice` column, 3 digits) in the geometry of the exam's slices
    as stored; slice rows get their mask cells, the exam's row the folder and its top slice's boxes."""
    config = trained.config.data
    notes: list[str] = []
    geometry: list = []
    try:
        volume = read_exam(path, config.max_pixels, config.image_size, config.plane, notes, geometry)
    except ImageReadError as err:
        return [{"exam": str(path), "error": str(err)}]
    rows = volume_rows(trained, volume, str(path), notes, runtime, tta, cut, seed, batch_size, with_slices)
    if rows[0].get("error"):
        return rows
    answers = exam_answers(trained, volume, geometry, runtime, batch_size)
    cells = [
        answer.cells(write_answer(answer, folder / f"{index:03d}.png", overlays / f"{index:03d}.png"))
        for index, answer in enumerate(answers)
    ]
    for row in rows[1:]:  # a row per slice (with_slices)
        row |= cells[row["slice"]] | {"note": answers[row["slice"]].note}
    top = rows[0]["top_slice"]
    rows[0] |= cells[top] | {"mask": str(folder) if answers[0].mask is not None else ""}
    if answers[top].note:  # empty boxes say why, as a slice's row does
        rows[0]["note"] = "; ".join(
            filter(None, [rows[0].get("note", ""), f"top slice: {answers[top].note}"])
        )
    return rows
