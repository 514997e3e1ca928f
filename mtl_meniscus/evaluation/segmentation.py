"""Overlap scores of label masks: Dice and IoU per class, for one image and over a set.

Classes are label values of the masks (data/masks.py): 1 meniscus, 2 tear, and optionally 0
background. A class may also be a union of values: WHOLE_MENISCUS scores the meniscus with its tear
(tear pixels lie inside the meniscus), as nested regions are scored elsewhere (BraTS).

The empty case: when a class is in neither the prediction nor the truth, Dice and IoU are 0/0 and
given as NaN (undefined), never 1. Most slices have no tear; counting each as a perfect tear Dice
would lift the mean with images that say nothing about finding tears. A class in only one of the two
scores 0. So:
- "mean over images" averages the images where the class is defined (NaN ones left out; the count
  of images it averages is given with it), and is what a bootstrap over images resamples;
- "pooled" adds the pixel counts of all images first (one big image): large images and large
  structures weigh more, and it is NaN only when the class is in no image at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mtl_meniscus.evaluation.metrics import _draw, _strata, percentile_ci

CLASSES: dict[str, tuple[int, ...]] = {"meniscus": (1,), "tear": (2,)}  # name -> mask values
WITH_BACKGROUND: dict[str, tuple[int, ...]] = {"background": (0,), **CLASSES}
WHOLE_MENISCUS: dict[str, tuple[int, ...]] = {"meniscus": (1, 2), "tear": (2,)}  # nested regions
SCORES = ("dice", "iou")

# Columns of the counts arrays: pixels in both, in the prediction, in the truth.
INTERSECTION, PREDICTED, TRUE = 0, 1, 2


def overlap_counts(
    prediction: np.ndarray, truth: np.ndarray, classes: Mapping[str, Sequence[int]] = CLASSES
) -> np.ndarray:
    """(C, 3) int64 pixel counts of each class, in `classes` order: [in both, predicted, true]."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    counts = np.zeros((len(classes), 3), np.int64)
    for row, values in enumerate(classes.values()):
        predicted, true = np.isin(prediction, values), np.isin(truth, values)
        counts[row] = ((predicted & true).sum(), predicted.sum(), true.sum())
    return counts


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice 2|P and T| / (|P| + |T|) of counts (..., 3) -> (...); NaN where both are empty."""
    counts = np.asarray(counts, float)
    both = counts[..., PREDICTED] + counts[..., TRUE]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(both > 0, 2 * counts[..., INTERSECTION] / both, np.nan)


def iou_from_counts(counts: np.ndarray) -> np.ndarray:
    """IoU |P and T| / |P or T| of counts (..., 3) -> (...); NaN where both are empty."""
    counts = np.asarray(counts, float)
    union = counts[..., PREDICTED] + counts[..., TRUE] - counts[..., INTERSECTION]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, counts[..., INTERSECTION] / union, np.nan)


_FROM_COUNTS = {"dice": dice_from_counts, "iou": iou_from_counts}


def image_scores(
    prediction: np.ndarray, truth: np.ndarray, classes: Mapping[str, Sequence[int]] = CLASSES
) -> dict[str, dict[str, float]]:
    """{"dice": {class: value}, "iou": {class: value}} of one (H, W) prediction against its truth."""
    counts = overlap_counts(prediction, truth, classes)
    return {score: dict(zip(classes, _FROM_COUNTS[score](counts).tolist())) for score in SCORES}


@dataclass(frozen=True)
class SetScores:
    """The pixel counts of a set of images, class by class, and the scores they give."""

    classes: tuple[str, ...]
    counts: np.ndarray  # (N, C, 3) int64: per image and class, [in both, predicted, true]

    def per_image(self, score: str = "dice") -> dict[str, np.ndarray]:
        """{class: (N,) score of each image}, NaN where the class is in neither mask."""
        values = _FROM_COUNTS[score](self.counts)  # (N, C)
        return {name: values[:, k] for k, name in enumerate(self.classes)}

    def mean_over_images(self, score: str = "dice") -> dict[str, float]:
        """{class: mean of the per-image scores over the images where it is defined}; NaN if none."""
        return {name: _nanmean(values) for name, values in self.per_image(score).items()}

    def defined_images(self) -> dict[str, int]:
        """{class: number of images the mean over images averages}."""
        return {name: int(np.sum(~np.isnan(v))) for name, v in self.per_image("dice").items()}

    def pooled(self, score: str = "dice") -> dict[str, float]:
        """{class: score of the pixels of all images pooled}, as if they were one image."""
        totals = _FROM_COUNTS[score](self.counts.sum(axis=0))  # (C,)
        return dict(zip(self.classes, totals.tolist()))


def set_scores(
    predictions: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    classes: Mapping[str, Sequence[int]] = CLASSES,
) -> SetScores:
    """The pixel counts of every (prediction, truth) pair (images may differ in size)."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} truths")
    counts = [overlap_counts(p, t, classes) for p, t in zip(predictions, truths)]
    stacked = np.stack(counts) if counts else np.zeros((0, len(classes), 3), np.int64)
    return SetScores(classes=tuple(classes), counts=stacked)


def mean_score_ci(
    per_image: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Sequence[str] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean per-image score (e.g. Dice from
    SetScores.per_image): the images where it is defined are resampled with replacement.

    `groups` (a patient id per image) makes it a cluster bootstrap, as for the AUCs
    (evaluation/metrics.py): whole patients are drawn, so that slices of one knee, which are not
    independent, widen the interval. NaNs when no image has the score defined.
    """
    per_image = np.asarray(per_image, float)
    rows = np.flatnonzero(~np.isnan(per_image))
    if groups is not None:
        groups = list(groups)
    # one stratum (no classes to keep apart): every defined image, or every patient, in it
    strata = _strata(rows, np.zeros(len(rows)), groups)
    rng = np.random.default_rng(seed)
    means = [_nanmean(per_image[_draw(rng, strata)]) for _ in range(n_resamples)] if len(rows) else []
    return percentile_ci(np.asarray(means), level)


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if len(defined) else float("nan")


def segmentation_summary(
    scores: SetScores, n_resamples: int = 1000, seed: int = 0, groups: Sequence[str] | None = None
) -> dict[str, object]:
    """What evaluate reports of a set's segmentations: per class the mean Dice and IoU over the
    images where the class is defined, each with its percentile bootstrap interval over images
    (over patients with `groups`, one per image; NaN without resamples), the pooled Dice and IoU
    and the number of images each mean averages. JSON-ready: plain floats and lists."""
    per_class: dict[str, dict[str, object]] = {}
    means = {score: scores.mean_over_images(score) for score in SCORES}
    pooled = {score: scores.pooled(score) for score in SCORES}
    per_image = {score: scores.per_image(score) for score in SCORES}
    for name, defined in scores.defined_images().items():
        entry: dict[str, object] = {"n_images": defined}
        for score in SCORES:
            entry[score] = means[score][name]
            entry[f"{score}_ci95"] = list(
                mean_score_ci(per_image[score][name], n_resamples, seed, groups=groups)
            )
            entry[f"pooled_{score}"] = pooled[score][name]
        per_class[name] = entry
    return {"n_images": len(scores.counts), "classes": per_class}
