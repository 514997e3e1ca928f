"""`predict`: probabilities and gated labels for image files and folders, one row per input.

A bad input (unreadable, truncated DICOM, 3D volume without a slice, NaN pixels, wrong size
with --strict-size, too large, multi-page, a broken link) gets its own row with an `error`; the
other inputs are still predicted. The output location is checked before anything is predicted.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from mtl_meniscus.config import tta_words
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
from mtl_meniscus.engine.runtime import Runtime, resolve_runtime
from mtl_meniscus.engine.trained import TrainedModel, load_trained, resolve_threshold
from mtl_meniscus.errors import ImageReadError, MeniscusError
from mtl_meniscus.io.exams import is_series_file, read_exam
from mtl_meniscus.io.imageio import (
    HDF5_SUFFIXES,
    NIFTI_SUFFIXES,
    NUMPY_SUFFIXES,
    SUPPORTED_SUFFIXES,
    image_suffix,
    is_supported_image,
    max_pixels_limit,
    read_image,
)
from mtl_meniscus.io.outputs import check_output_file, check_own_output_dir, first_line, some_of
from mtl_meniscus.io.resumable_table import ResumableTable, file_stamp, fingerprint, inputs_stamp
from mtl_meniscus.labels import DEFAULT_TASKS
from mtl_meniscus.networks.cam import unique_names, write_overlays

VOLUME_HINT = (
    "predict reads 2D slices only: give --exams to score the whole exam (each slice and the exam), "
    "or save the slice to predict as its own file"
)


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


def collect_exams(inputs: list[Path], skipped: list[Path] | None = None) -> list[Path]:
    """The exams named on the command line: a volume file is one exam; a folder gives itself when
    it holds a series' files (known as the series reader knows them: by suffix or by content),
    then each volume file in it (MRNet's `valid/sagittal/`), then each subfolder that holds a series
    (a folder of exams as data.md shows one; such a series was skipped unsaid), in name order. Volume
    files deeper down are not searched: MRNet's `valid/` holds its axial and coronal `.npy`, which
    carry no plane to refuse them by. A folder with none of these gets its error row. `skipped`
    (a list the caller keeps) receives the subfolders not read, for the caller to name."""
    exams: list[Path] = []
    for path in inputs:
        if not path.is_dir():
            exams.append(path)
            continue
        entries = sorted(path.iterdir())
        files = [p for p in entries if p.is_file()]
        found = [path] if _holds_series(files) else []
        found += [p for p in files if image_suffix(p) in VOLUME_SUFFIXES]
        series = [p for p in entries if p.is_dir() and _holds_series(p.iterdir())]
        found += series
        exams.extend(found or [path])
        if skipped is not None:  # a hidden folder (.git, .DS_Store) is no one's exam: not named
            skipped += [p for p in entries if p.is_dir() and p not in series and not p.name.startswith(".")]
    return exams


def skipped_note(skipped: list[Path]) -> str:
    """The line that names the (non-empty list of) subfolders collect_exams did not read."""
    shown = ", ".join(str(p) for p in skipped[:3]) + (
        f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    )
    return (
        f"note: not read: {len(skipped)} subfolder(s) holding no DICOM series ({shown}); a folder's exams "
        "are its series subfolders and its own volume files (files further down are not searched: "
        "MRNet's valid/ holds axial and coronal .npy): name a subfolder or its files to predict them"
    )


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
    """Predict every input and write CSV (or JSON lines), with `masks_dir` each input's mask, horn
    boxes and overlay, with `cam_dir` its saliency overlays. The inputs are read and predicted CHUNK
    files at a time (the memory of a large folder stays bounded), each chunk's rows on disk before
    the next is read (io/resumable_table.py: the same command after a kill continues after them).
    Returns the rows this call predicted."""
    console = console or Console(soft_wrap=True)
    _check_outputs(out, cam_dir, masks_dir)  # before any work: a bad output must not cost the predictions
    trained, runtime, chosen, tta = _load_for_answers(run_or_checkpoint, threshold, tta_copies, precision, device,
                                                      masks_dir, console)  # fmt: skip
    if cam_dir is not None and trained.saliency_refusal:  # before any work
        raise MeniscusError(f"--cam: {trained.saliency_refusal}")
    files = collect_inputs(inputs)
    if not files:
        raise MeniscusError(
            f"no input images found in {some_of(inputs)} (supported: PNG, TIFF, JPEG, DICOM, NIfTI, .npy)"
        )
    names = [str(path) for path in files]
    columns = csv_columns(trained.tasks, trained.outputs, masks=masks_dir is not None)
    answers = SliceAnswers(trained, runtime, tta, chosen.value, seed, batch_size, strict_size)
    answers.write_files_to(names, cam_dir, masks_dir)
    settings = table_settings(
        trained, runtime, names, as_json, tta=tta.copies, threshold=chosen.value, seed=seed,
        batch_size=batch_size, strict_size=strict_size, cam=cam_dir, masks=masks_dir,
    )  # fmt: skip
    rows: list[Prediction] = []
    table = ResumableTable(out, table_text(columns, [], as_json, header=True), settings)
    with _interruption_note(table, len(files), console), progress_bar(console) as progress:
        per_file = tta.copies + 1  # forward passes
        bar = progress.add_task("predicting", total=len(files) * per_file, completed=table.done * per_file)
        for start in range(table.done, len(files), CHUNK):
            chunk = answers.rows(files, start, lambda n: progress.update(bar, advance=n))
            plain = [row.row(trained.tasks, trained.outputs) for row in chunk]
            table.add(table_text(columns, plain, as_json), len(chunk), sum(1 for row in chunk if row.error))
            rows += chunk
            progress.update(bar, completed=table.done * per_file)  # unreadable files too
        table.finish()
    console.print(
        f"predicted {len(files) - table.failed} of {len(files)} images ({tta_words(tta.copies)}, "
        f"fissure threshold {chosen.value:.3f}) -> {out}"
        + (f"; {table.failed} failed, see the error column" if table.failed else "")
    )
    return rows


def _load_for_answers(run_or_checkpoint, threshold, tta_copies, precision, device, masks_dir, console):
    """(model, runtime, threshold, TTA) of a predict call, after saying what its answers rest on."""
    runtime = resolve_runtime(precision, device)
    trained = load_trained(run_or_checkpoint, runtime)
    chosen = resolve_threshold(trained, threshold)
    tta = trained.tta(tta_copies)
    _describe_answers(trained, chosen.describe(tta.copies), console)
    if masks_dir is not None:
        console.print(masks_note(trained, masks_dir), highlight=False, markup=False)
    return trained, runtime, chosen, tta


CHUNK = 256  # inputs read, predicted and written at a time: bounds the memory and the work a kill loses


def table_settings(
    trained: TrainedModel, runtime: Runtime, inputs: list[str], as_json: bool, **options
) -> dict[str, Any]:
    """What decides a table's rows: an interrupted table is continued only when all are the same
    (the model file and its calibration, where it runs, the inputs in order and their files' sizes
    and times, the pixel limit that refuses an input, the options)."""
    calibration = trained.calibration.temperatures if trained.calibration else None
    return {
        "model": str(trained.checkpoint.resolve()),
        "model_file": file_stamp(trained.checkpoint),
        "calibration": calibration,
        "runtime": [str(runtime.device), runtime.precision],
        "inputs": [len(inputs), fingerprint(inputs), inputs_stamp(inputs)],
        "max_pixels": max_pixels_limit(trained.config.data.max_pixels),
        "json": as_json,
        **{key: str(value) if isinstance(value, Path) else value for key, value in options.items()},
    }


@contextlib.contextmanager
def _interruption_note(table: ResumableTable, total: int, console: Console) -> Iterator[None]:
    """Say what an interrupted table keeps, and how to continue it; release it however it ends."""
    if table.note:
        console.print(table.note, highlight=False, markup=False)
    try:
        yield
    except BaseException:
        if table.done:
            console.print(
                f"interrupted: the rows of {table.done} of {total} inputs are in {table.partial}; the same "
                "command continues after them",
                highlight=False,
                markup=False,
            )
        raise
    finally:
        table.close()


def failed_rows(table: Path) -> int:
    """The rows of a written prediction table (CSV or JSON lines) with an error."""
    with table.open(newline="", encoding="utf-8") as handle:
        if first_line(table).startswith("{"):
            return sum(1 for line in handle if line.strip() and json.loads(line).get("error"))
        return sum(1 for row in csv.DictReader(handle) if row.get("error"))


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


class SliceAnswers:
    """The rows of a chunk of input files: each readable file's gated prediction, a file that cannot
    be read its error; and with --cam and --masks (write_files_to) what each readable file adds."""

    def __init__(self, trained: TrainedModel, runtime: Runtime, tta, cut: float, seed: int, batch_size: int,
                 strict_size: bool):  # fmt: skip
        self.trained, self.runtime, self.tta, self.cut = trained, runtime, tta, cut
        self.seed, self.batch_size, self.strict_size = seed, batch_size, strict_size
        # once, before any file: a bad $MTL_MENISCUS_MAX_PIXELS stops the command, not each file's row
        self.max_pixels = max_pixels_limit(trained.config.data.max_pixels)
        self.cam_dir: Path | None = None
        self.masks_dir: Path | None = None
        self.names: dict[str, list[str]] = {}  # per output, every input's file name in it

    def write_files_to(self, inputs: list[str], cam_dir: Path | None, masks_dir: Path | None) -> None:
        """Write overlays into cam_dir and masks into masks_dir (None: not), named after the files
        (`inputs`, every one of the call), or after their whole paths where file names repeat."""
        self.cam_dir, self.masks_dir = cam_dir, masks_dir
        self.names = {
            "cam": unique_names(inputs, lambda p: Path(p).name.replace(".", "_")) if cam_dir else [],
            "masks": unique_names(inputs, input_stem) if masks_dir else [],
        }

    def rows(self, files: list[Path], start: int, on_batch=None) -> list[Prediction]:
        """A row per file of files[start : start + CHUNK], predicted (a non-finite output fails its
        row only), with its overlays and mask written."""
        data = self.trained.config.data
        rows: list[Prediction] = []
        images: dict[int, np.ndarray] = {}  # the readable ones, by row
        for path in files[start : start + CHUNK]:
            name = str(path)
            try:
                image, note = read_slice(
                    path, data.image_size, self.max_pixels, data.plane, VOLUME_HINT, self.strict_size
                )
            except ImageReadError as err:
                rows.append(Prediction(image=name, error=str(err)))
                continue
            except Exception as err:  # whatever else one file does, it fails that file's row only
                rows.append(
                    Prediction(image=name, error=f"{name}: cannot read ({type(err).__name__}: {err})")
                )
                continue
            images[len(rows)] = image
            rows.append(Prediction(image=name, note=note))
        if images:
            probs = self.trained.predict(
                list(images.values()),
                self.runtime,
                tta=self.tta,
                seed=self.seed,
                batch_size=self.batch_size,
                same_draws=True,  # a file's answer does not depend on the other files, nor on its chunk
                on_batch=on_batch,
            )
            for k, i in enumerate(images):
                rows[i] = gated_row(probs, k, self.trained, self.cut, rows[i].image, rows[i].note)
        images = {i: image for i, image in images.items() if not rows[i].error}
        if self.cam_dir is not None:
            for i, image in images.items():
                cams = self.trained.saliency(image, self.runtime)
                write_overlays(self.cam_dir, self.names["cam"][start + i], image, cams)
        if self.masks_dir is not None:
            self.write_masks(rows, images, self.masks_dir, self.names["masks"][start:])
        return rows

    def write_masks(
        self, rows: list[Prediction], images: dict[int, np.ndarray], masks_dir: Path, names: list[str]
    ) -> None:
        """--masks: for each readable file (`images`, by row), DIR/<name>.png (the predicted label map
        at the file's size and in its own geometry; none without a decoder) and DIR/overlays/<name>.png,
        and the row's mask cells; <name> is names[its row]. The file is read again for its own size and
        geometry."""
        plane = self.trained.config.data.plane
        maps = label_maps(self.trained, list(images.values()), self.runtime, self.batch_size)
        for i, label_map in zip(images, maps):
            geometry: list = []
            try:
                image = read_image(rows[i].image, max_pixels=self.max_pixels, plane=plane, geometry=geometry)
            except ImageReadError as err:  # the file changed since it was predicted
                rows[i].note = "; ".join(filter(None, [rows[i].note, f"no mask: {err}"]))
                continue
            answer = horn_answer(image, geometry[0], label_map)
            written = write_answer(
                answer, masks_dir / f"{names[i]}.png", masks_dir / "overlays" / f"{names[i]}.png"
            )
            rows[i].masks = answer.cells(written)
            rows[i].note = "; ".join(filter(None, [rows[i].note, answer.note]))


def input_stem(path: str) -> str:
    """A file's name without its image suffix ('knee.nii.gz' -> 'knee'): masks are named after it.
    A name of no image suffix stays whole: DICOM files named by UID (1.2.840...5.0, ...5.1) would
    otherwise share one name."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix in SUPPORTED_SUFFIXES and name.lower().endswith(suffix) else name


def table_text(columns: list[str], rows: list[dict], as_json: bool, header: bool = False) -> str:
    """Rows as CSV lines with these columns (the header first with `header`), or as JSON lines with
    empty cells as null (JSON lines have no header)."""
    if as_json:
        return "".join(json.dumps(json_row(row, columns)) + "\n" for row in rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    if header:
        writer.writeheader()
    writer.writerows(csv_row(row) for row in rows)
    return text.getvalue()


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
    (_exam_rows_with_masks). Returns the rows this call predicted; each exam's rows are on disk
    (out.partial) before the next exam is read, and the same command continues after a kill.
    """
    console = console or Console(soft_wrap=True)
    _check_outputs(out, None, masks_dir)
    exams = _exams_to_read(exams, console)
    trained, runtime, chosen, tta = _load_for_answers(run_or_checkpoint, threshold, tta_copies, precision, device,
                                                      masks_dir, console)  # fmt: skip
    columns = exam_columns(trained.tasks, trained.outputs, masks=masks_dir is not None)
    names = [str(path) for path in exams]
    folders = unique_names(names, input_stem)
    settings = table_settings(
        trained, runtime, names, as_json, tta=tta.copies, threshold=chosen.value, seed=seed,
        batch_size=batch_size, slices=with_slices, masks=masks_dir,
    )  # fmt: skip
    rows: list[dict] = []
    table = ResumableTable(out, table_text(columns, [], as_json, header=True), settings)
    with _interruption_note(table, len(exams), console):
        for k in range(table.done, len(exams)):
            answer = (trained, exams[k], runtime, tta, chosen.value, seed, batch_size, with_slices)
            if masks_dir is None:
                exam = exam_rows(*answer)
            else:
                exam = _exam_rows_with_masks(
                    *answer, masks_dir / folders[k], masks_dir / "overlays" / folders[k]
                )
            exam = [{column: row.get(column, "") for column in columns} for row in exam]
            table.add(table_text(columns, exam, as_json), 1, 1 if exam[0]["error"] else 0)
            rows += exam
        table.finish()
    console.print(
        f"predicted {len(exams) - table.failed} of {len(exams)} exams ({tta_words(tta.copies)}, fissure "
        f"threshold {chosen.value:.3f}; exam = {trained.exam_rule}) -> {out}"
        + (f"; {table.failed} failed, see the error column" if table.failed else "")
    )
    return rows


def _exams_to_read(inputs: list[Path], console: Console) -> list[Path]:
    """collect_exams, with a note naming the subfolders it did not read."""
    skipped: list[Path] = []
    exams = collect_exams(inputs, skipped)
    if skipped:
        console.print(skipped_note(skipped), highlight=False, markup=False)
    return exams


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
