"""The meniscus horns of a model's slices: for `predict --masks`, a slice's predicted label map and
horn boxes in its input's own geometry, with a picture of both; for `evaluate`, the ROI hit rate
(does the true tear lie inside the fixed-size windows around the two horns?).

Geometry: a model sees a slice in the canonical view (io/orientation.py) at its own size. A label
map is resized back to the canonical slice's size (nearest: labels stay labels), its horn boxes are
found there (which horn is anterior is known only in the canonical view), and both are then laid
on the file's own pixels by undoing the reader's transpose and flips (SliceGeometry.undo and
undo_box): a mirrored DICOM gets a mirrored mask and mirrored boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mtl_meniscus.config import ModelConfig, roi_crop_pixels
from mtl_meniscus.data.masks import MASK_TEAR, read_masks, resized_mask
from mtl_meniscus.data.records import PreparedData
from mtl_meniscus.data.roi import (
    Box,
    HornBoxes,
    find_horns_classical,
    horn_boxes_from_mask,
    tear_coverage,
    window_around,
)
from mtl_meniscus.engine.inference import predict_label_maps
from mtl_meniscus.engine.runtime import Runtime
from mtl_meniscus.engine.trained import TrainedModel
from mtl_meniscus.evaluation.segmentation import mean_score_ci
from mtl_meniscus.io.exams import resized_slices
from mtl_meniscus.io.imageio import write_png
from mtl_meniscus.io.orientation import SliceGeometry
from mtl_meniscus.networks.models import segments, trains_per_task

# predict's columns with --masks: the mask file written, the two horn boxes ("x0 y0 x1 y1" in the
# input's own pixels, x1 and y1 excluded; a list of four in JSON) and where the boxes came from.
MASK_COLUMNS = ("mask", "anterior_box", "posterior_box", "boxes_from")
FROM_MASK, FROM_CLASSICAL = "mask", "classical"

# The ROI window around each horn of a model that crops none: 96 pixels at 256 (data/roi.py
# WORK_SIZE), scaled to the model's image size. A ROI model's window is its own crop (model.roi_crop).
ROI_WINDOW_AT_256 = 96


def roi_window(image_size: int, model: ModelConfig | None = None) -> int:
    """The side in pixels of the window around a horn for images of `image_size` pixels: a ROI
    model's crop (model.roi_crop), else ROI_WINDOW_AT_256 scaled to the size."""
    crop = model.roi_crop if model is not None and model.roi != "none" else ROI_WINDOW_AT_256
    return roi_crop_pixels(crop, image_size)


# ---- predict --masks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HornAnswer:
    """One slice's masks answer, in its input's own geometry (the file's pixels as stored)."""

    image: np.ndarray  # (H, W) float32: the slice as stored in the file
    mask: np.ndarray | None  # (H, W) uint8: 0 background, 1 meniscus, 2 tear; None without a decoder
    boxes: HornBoxes | None  # None when no pair of horns was found
    source: str  # FROM_MASK: the predicted mask's horns; FROM_CLASSICAL: data/roi.find_horns_classical

    def cells(self, mask_file: str) -> dict[str, object]:
        """Its cells of MASK_COLUMNS: boxes as Box tuples (predict writes them as text in CSV)."""
        anterior, posterior = self.boxes if self.boxes else ("", "")
        return {
            "mask": mask_file,
            "anterior_box": anterior,
            "posterior_box": posterior,
            "boxes_from": self.source,
        }

    @property
    def note(self) -> str:
        """Why a row has no boxes, or ''."""
        if self.boxes is not None:
            return ""
        return (
            "no pair of horns in the predicted mask" if self.source == FROM_MASK else "no pair of horns found"
        )


def label_maps(
    trained: TrainedModel, images: Sequence[np.ndarray], runtime: Runtime, batch_size: int
) -> list[np.ndarray | None]:
    """Each image's predicted label map (uint8, the model's size) from a run with a segmentation
    decoder; None for each from a run without one (its boxes come from the classical finder)."""
    if not segments(trained.model):
        return [None] * len(images)
    edge_filter = trained.config.preprocess.edge_filter
    return predict_label_maps(trained.model, images, edge_filter, runtime, batch_size)


def horn_answer(canonical: np.ndarray, geometry: SliceGeometry, label_map: np.ndarray | None) -> HornAnswer:
    """The answer for a slice read as `canonical` (H, W, the canonical view at the file's size) by
    `geometry`: with a label map (at the model's size), the map resized back to (H, W) and its horn
    boxes; without one, the classical finder's boxes; all turned back into the file's pixels."""
    height, width = canonical.shape
    if label_map is None:
        boxes, mask, source = find_horns_classical(canonical), None, FROM_CLASSICAL
    else:
        mask = cv2.resize(label_map.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        boxes, source = horn_boxes_from_mask(mask), FROM_MASK
    if boxes is not None:
        boxes = HornBoxes(*(Box(*geometry.undo_box(box, (height, width))) for box in boxes))
    return HornAnswer(geometry.undo(canonical), None if mask is None else geometry.undo(mask), boxes, source)


def box_text(box: tuple[int, int, int, int]) -> str:
    """'x0 y0 x1 y1': a box in a CSV cell."""
    return " ".join(str(int(v)) for v in box)


# BGR colours of the overlay: meniscus outline, tear outline, anterior box, posterior box
MENISCUS_COLOUR, TEAR_COLOUR = (0, 215, 255), (0, 0, 255)
ANTERIOR_COLOUR, POSTERIOR_COLOUR = (0, 200, 0), (255, 128, 0)


def overlay_picture(answer: HornAnswer) -> np.ndarray:
    """BGR uint8 (H, W, 3): the slice (1st-99th percentile window) with the predicted mask's
    outlines (meniscus yellow, tear red) and the horn boxes (anterior green, posterior blue)."""
    low, high = np.percentile(answer.image, [1, 99])
    grey = np.clip((answer.image - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
    picture = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    if answer.mask is not None:
        for region, colour in ((answer.mask > 0, MENISCUS_COLOUR), (answer.mask == MASK_TEAR, TEAR_COLOUR)):
            contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(picture, contours, -1, colour, 1)
    if answer.boxes is not None:
        for box, colour in zip(answer.boxes, (ANTERIOR_COLOUR, POSTERIOR_COLOUR)):
            cv2.rectangle(picture, (box.x0, box.y0), (box.x1 - 1, box.y1 - 1), colour, 1)
    return picture


def write_answer(answer: HornAnswer, mask_path: Path, overlay_path: Path) -> str:
    """The mask PNG (uint8 label values; none without a decoder) and the overlay PNG; returns the
    mask file's path as a row cell ('' when none was written)."""
    if answer.mask is not None:
        write_png(mask_path, answer.mask)
    write_png(overlay_path, overlay_picture(answer))
    return str(mask_path) if answer.mask is not None else ""


# ---- evaluate: the ROI hit rate -----------------------------------------------------------------


def truth_masks(data: PreparedData, indices: Sequence[int], image_size: int, max_pixels: int | None) -> list:
    """Each row's label mask at the model's size, None where a row has none: those read with the
    data (a segmenting run's), else read now from labels.csv's mask column (a DataError naming
    every bad one, tear pixels on a row labelled no tear included, as when a segmenting run reads
    them)."""
    if data.masks is not None:
        return [data.masks[i] for i in indices]
    records = [data.records[i] for i in indices]
    if not any(record.mask for record in records):
        return [None] * len(records)
    found = read_masks(data.data_dir, records, max_pixels=max_pixels)
    return [None if mask is None else resized_mask(mask, image_size) for mask in found]


def roi_hit_rates(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    window: int,
    predicted: Sequence[np.ndarray] | None = None,
    groups: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, object] | None:
    """The ROI hit rate over the images whose mask has tear pixels (the tears): the share whose
    every tear pixel lies inside the two `window`-pixel windows around the horns (data/roi.py
    window_around, tear_inside), for the classical finder's horns on the image and, with
    `predicted` label maps (one per image), the predicted mask's horns. A tear whose horns are not
    found is a miss. Each rate has a percentile bootstrap interval over tears (over patients with
    `groups`, one per image). None when no mask has a tear."""
    tears = [k for k, mask in enumerate(masks) if mask is not None and (mask == MASK_TEAR).any()]
    if not tears:
        return None
    tear_groups = [groups[k] for k in tears] if groups is not None else None
    found = {"classical": [find_horns_classical(images[k]) for k in tears]}
    if predicted is not None:
        found["predicted_mask"] = [horn_boxes_from_mask(predicted[k]) for k in tears]
    entry: dict[str, object] = {"window_px": window, "n_tears": len(tears)}
    for source, boxes in found.items():
        entry[source] = _hits([masks[k] for k in tears], boxes, window, tear_groups, n_resamples, seed)
    return entry


def _hits(masks, boxes, window: int, groups, n_resamples: int, seed: int) -> dict[str, object]:
    """hits, rate and its interval, tears without a pair of horns, and the mean share of tear pixels inside."""
    coverage = np.array(
        [
            tear_coverage(m, [window_around(b, window) for b in found]) if found else 0.0
            for m, found in zip(masks, boxes)
        ]
    )
    hits = (coverage == 1.0).astype(float)
    return {
        "hits": int(hits.sum()),
        "rate": float(hits.mean()),
        "rate_ci95": list(mean_score_ci(hits, n_resamples, seed, groups=groups)),
        "no_horns": sum(found is None for found in boxes),
        "mean_coverage": float(coverage.mean()),
    }


def exam_answers(
    trained: TrainedModel,
    volume: np.ndarray,
    geometry: Sequence[SliceGeometry],
    runtime: Runtime,
    batch_size: int,
) -> list[HornAnswer]:
    """horn_answer of every slice of an exam (S, H, W) read in the canonical view by `geometry`
    (io/exams.read_exam: one per slice, or one for all)."""
    maps = label_maps(
        trained, list(resized_slices(volume, trained.config.data.image_size)), runtime, batch_size
    )
    each = list(geometry) if len(geometry) == len(volume) else [geometry[0]] * len(volume)
    return [horn_answer(pixels, g, label_map) for pixels, g, label_map in zip(volume, each, maps)]


def masks_note(trained: TrainedModel, folder: Path) -> str:
    """What --masks writes for this run, printed once."""
    if segments(trained.model):
        network = "network" if trains_per_task(trained.config.model.name) else "decoder"  # the cascade's own
        return (
            f"masks: the run's segmentation {network}, horn boxes from the predicted mask, in each input's "
            f"own geometry -> {folder}"
        )
    return (
        f"masks: {trained.run_dir or trained.checkpoint} has no segmentation head (train with --set model.segmentation=true "
        f"for masks); horn boxes from the classical finder (data/roi.py), overlays with boxes only -> {folder}"
    )
