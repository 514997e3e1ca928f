"""The answers of a trained model as predict writes them and serve returns them: a slice read as
predict reads it, its probabilities gated as the cascade gates them, and an exam's row (with a row
per slice on request), each a row of CSV cells or one JSON object."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from mtl_meniscus.engine.horns import MASK_COLUMNS, box_text
from mtl_meniscus.engine.trained import TrainedModel
from mtl_meniscus.errors import ImageReadError
from mtl_meniscus.io.exams import read_exam
from mtl_meniscus.io.imageio import read_image
from mtl_meniscus.labels import DEFAULT_TASKS, TaskTable


def csv_columns(tasks: TaskTable, names: Sequence[str], masks: bool = False) -> list[str]:
    """image, then per task its probability and predicted label (e.g. p_horizontal, orientation),
    with `masks` (predict --masks) the mask file and horn boxes (engine/horns.py MASK_COLUMNS),
    then error and note."""
    per_task = [column for name in names for column in (tasks[name].p_column, name)]
    return ["image", *per_task, *(MASK_COLUMNS if masks else ()), "error", "note"]


def exam_columns(tasks: TaskTable, names: Sequence[str], masks: bool = False) -> list[str]:
    """exam, slice (empty on the exam's own row), slices, top_slice, the per-task columns, error, note."""
    return ["exam", "slice", "slices", "top_slice", *csv_columns(tasks, names, masks)[1:]]


@dataclass
class Prediction:
    """One output row; a gated task's probability and label only where its gate (a tear) is predicted."""

    image: str
    probs: dict[str, float] = field(default_factory=dict)  # task -> probability, where reported
    labels: dict[str, int | str] = field(default_factory=dict)  # task -> predicted label, '' if gated off
    error: str = ""
    note: str = ""
    masks: dict[str, object] = field(default_factory=dict)  # predict --masks: its MASK_COLUMNS cells

    def row(self, tasks: TaskTable = DEFAULT_TASKS, names: Sequence[str] = DEFAULT_TASKS.names) -> dict:
        row: dict = {"image": self.image}
        for name in names:
            row[tasks[name].p_column] = _cell(self.probs.get(name))
            row[name] = _cell(self.labels.get(name))
        row |= self.masks
        row["error"], row["note"] = self.error, self.note
        return row


def _cell(value):
    if value is None:
        return ""
    return round(value, 6) if isinstance(value, float) else value


def json_row(row: dict, columns: Sequence[str]) -> dict:
    """A row as one line of `predict --json`: these columns, empty or missing cells as null (a box
    is a list of four numbers)."""
    return {column: (None if row.get(column, "") == "" else row[column]) for column in columns}


def csv_row(row: dict) -> dict:
    """A row's cells as CSV writes them: a box (a tuple) as 'x0 y0 x1 y1'."""
    return {column: box_text(value) if isinstance(value, tuple) else value for column, value in row.items()}


def gate(probs: dict[str, float], tasks: TaskTable, threshold: float, image: str) -> Prediction:
    """Cascade gating: orientation and position (any task gated by fissure) are reported only when
    fissure >= threshold."""
    labels = tasks.predicted_labels(probs, threshold)
    reported = [name for name, text in labels.items() if text or tasks[name].gated_by is None]
    return Prediction(
        image=image,
        probs={name: probs[name] for name in reported},
        # a digit label (fissure's 0/1) as a number: CSV and JSON show it as before
        labels={name: int(text) if text.isdigit() else text for name, text in labels.items()},
    )


def gated_row(
    probs: dict[str, np.ndarray], k: int, trained: TrainedModel, threshold: float, image: str, note: str = ""
) -> Prediction:
    """Image k of the model's {task: (N,)} probabilities, gated; its error row when not finite."""
    values = {task: float(probs[task][k]) for task in trained.outputs}
    if not np.isfinite(list(values.values())).all():
        return Prediction(image=image, error=f"{image}: the model's output is not finite", note=note)
    gated = gate(values, trained.tasks, threshold, image)
    gated.note = note
    return gated


def read_slice(
    path: Path, size: int, max_pixels: int, plane: str, volume_hint: str, strict_size: bool = False
) -> tuple[np.ndarray, str]:
    """A slice as predict reads it: (the image resized to size x size, its note: the orientation
    note of a DICOM/NIfTI file without geometry, the size it was resized from). Raises
    ImageReadError naming the file; with `strict_size` a slice of another size is refused."""
    notes: list[str] = []
    image = read_image(path, max_pixels=max_pixels, volume_hint=volume_hint, plane=plane, notes=notes)
    if image.shape != (size, size):
        if strict_size:
            raise ImageReadError(
                f"size {image.shape[0]}x{image.shape[1]}, expected {size}x{size} (--strict-size)"
            )
        notes.append(f"resized from {image.shape[0]}x{image.shape[1]} to {size}x{size}")
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image, "; ".join(notes)


def exam_rows(
    trained: TrainedModel, path: Path, runtime, tta, cut, seed, batch_size, with_slices
) -> list[dict]:
    """The exam's row (or its error row), then with `with_slices` a row per slice."""
    config = trained.config
    notes: list[str] = []  # the orientation note of an exam without geometry
    try:
        volume = read_exam(path, config.data.max_pixels, config.data.image_size, config.data.plane, notes)
    except ImageReadError as err:
        return [{"exam": str(path), "error": str(err)}]
    return volume_rows(trained, volume, str(path), notes, runtime, tta, cut, seed, batch_size, with_slices)


def volume_rows(
    trained: TrainedModel,
    volume: np.ndarray,
    name: str,
    notes: list[str],
    runtime,
    tta,
    cut,
    seed,
    batch_size,
    with_slices,
) -> list[dict]:
    """exam_rows of an exam already read, (S, H, W), named `name` in its rows."""
    tasks, names, size = trained.tasks, trained.outputs, trained.config.data.image_size
    exam = {"exam": name}
    if volume.shape[1:] != (size, size):
        notes = [*notes, f"slices resized from {volume.shape[1]}x{volume.shape[2]}"]
    # the same draws for every exam: an exam's answer does not depend on the other exams (predict, serve)
    found = trained.predict_exam(volume, runtime, tta=tta, seed=seed, batch_size=batch_size, same_draws=True)
    probs = found.slices  # {task: (S,)}
    # an exam model's own output is not one of its slices': both are checked
    if (
        not all(np.isfinite(p).all() for p in probs.values())
        or not np.isfinite(list(found.exam.values())).all()
    ):
        return [exam | {"error": f"{name}: the model's output is not finite"}]
    pooled = {task: found.exam[task] for task in names}  # the root's max, the others there
    row = gate(pooled, tasks, cut, name).row(tasks, names)
    rows = [exam | row | {"slices": len(volume), "top_slice": found.top_slice, "note": "; ".join(notes)}]
    if with_slices:
        for index in range(len(volume)):
            values = {task: float(probs[task][index]) for task in names}
            rows.append({"exam": name, "slice": index} | gate(values, tasks, cut, "").row(tasks, names))
    return rows
