"""Batched prediction of task probabilities, optionally with test-time augmentation, and of a
segmenting network's label maps."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mtl_meniscus.config import TTAConfig
from mtl_meniscus.data.records import PreparedData
from mtl_meniscus.data.roi import HornCentres
from mtl_meniscus.data.torch_dataset import ExamDataset, SliceDataset, collate_batch
from mtl_meniscus.engine.runtime import Runtime
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.evaluation.calibration import scaled_probability
from mtl_meniscus.evaluation.segmentation import segmentation_summary, set_scores
from mtl_meniscus.networks.models import needs_horns, predicted_horns, roi_of, takes_exams


def predict_probs(
    model: nn.Module,
    images: Sequence[np.ndarray],
    edge_filter: str,
    runtime: Runtime,
    batch_size: int = 64,
    tta: TTAConfig | None = None,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
    horns: HornCentres | None = None,
) -> dict[str, np.ndarray]:
    """{task: (N,) probabilities}; with TTA, the mean over the original and `tta.copies` copies.
    (A trained run's calibration is applied by engine.trained.TrainedModel.)"""
    logits = predict_logits(model, images, edge_filter, runtime, batch_size, tta, seed, on_batch, horns)
    return {task: scaled_probability(value, 1.0) for task, value in logits.items()}


def model_horns(
    model: nn.Module, images: Sequence[np.ndarray], horns: HornCentres | None = None
) -> HornCentres | None:
    """The horns a ROI model needs from outside the network (models.needs_horns): `horns` when
    given, else for roi classical the classical pipeline's on `images`; None for a model that needs
    none. A model of the true horns (roi truth) is refused without them: they come from masks."""
    if not needs_horns(model):
        return None
    if horns is not None:
        return horns
    if roi_of(model) == "classical":
        return HornCentres("classical", images)
    raise MeniscusError(
        "this model crops around the true horns (model.roi truth, an upper bound for the study), which "
        "come from each image's mask; only train and compare pass them. To score or predict new images, "
        "train with model.roi classical or predicted"
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: Sequence[np.ndarray],
    edge_filter: str,
    runtime: Runtime,
    batch_size: int = 64,
    tta: TTAConfig | None = None,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
    horns: HornCentres | None = None,
    same_draws: bool = False,
) -> dict[str, np.ndarray]:
    """{task: (copies + 1, N) logits}: row 0 the images as they are, row k their k-th augmented copy.

    Copy k of image i is augmented with the generator seeded (seed, i, k): deterministic and
    independent of the batch size. With same_draws, (seed, k) for every image: copy k of every
    image is the same rotation, shift and noise draw, so an image's answer depends neither on the
    other images predicted with it nor on how its pixels were stored (8 or 16 bits, a DICOM
    intercept: the draws are the same and the input is standardised); predict and serve use it,
    evaluate and compare score fixed splits and keep the positions. (A checksum of the pixels as
    seed gave an 8-bit PNG and its 16-bit copy fissure probabilities 0.034 apart with 5 copies.)
    For an exam model (models.takes_exams) `images` are whole exams (S, H, W), one output each,
    and `batch_size` counts exams. A ROI model of horns found outside it gets them from `horns`
    (one per image), or finds them (model_horns).
    """
    model.eval()
    n = len(images)
    copies = tta.copies if tta is not None else 0
    kind = ExamDataset if takes_exams(model) else SliceDataset
    horns = model_horns(model, images, horns)
    roi = {"horns": horns} if horns is not None else {}  # the centres move with each TTA copy
    dataset = kind(images, np.zeros((n, 1), np.float32), edge_filter, tta.augment if copies else None, **roi)
    keys = [(i, None) for i in range(n)]
    keys += [
        (i, int(np.random.SeedSequence([seed, 0 if same_draws else i, k]).generate_state(1)[0]))
        for k in range(copies)
        for i in range(n)
    ]
    loader = DataLoader(
        keys,
        batch_size=batch_size,
        collate_fn=lambda batch: collate_batch(
            [dataset[key] for key in batch], runtime.channels_last, horns=horns is not None
        ),
    )
    chunks: dict[str, list[np.ndarray]] = {}
    for inputs, _ in loader:
        # x (B, C, H, W); for exams (N, C, H, W) and lengths (B,); for a ROI model horns (B, 2, 3)
        x, *rest = inputs
        with runtime.autocast():
            logits = model(runtime.prepare_input(x), *(t.to(runtime.device) for t in rest))
        for task, value in logits.items():
            chunks.setdefault(task, []).append(value.float().cpu().numpy())
        if on_batch is not None:
            on_batch(len(value))
    return {task: np.concatenate(parts).reshape(copies + 1, n) for task, parts in chunks.items()}


def predict_label_maps(
    model: nn.Module, images: Sequence[np.ndarray], edge_filter: str, runtime: Runtime, batch_size: int = 64
) -> list[np.ndarray]:
    """Each image's segmentation by a segmenting network (models.segments): uint8 (H, W), the most
    probable of 0 background, 1 meniscus, 2 tear at every pixel."""
    maps = []
    for logits in _segmentation_logits(model, images, edge_filter, runtime, batch_size):
        maps += list(logits.argmax(1).to(torch.uint8).cpu().numpy())
    return maps


def predicted_horn_centres(
    model: nn.Module, images: Sequence[np.ndarray], edge_filter: str, runtime: Runtime, batch_size: int = 64
) -> np.ndarray:
    """(N, 2, 3): each image's horns (x, y, found; anterior first) as a segmenting network's
    output gives them (models.predicted_horns), on the images as they are."""
    centres = [np.zeros((0, 2, 3), np.float32)]
    for logits in _segmentation_logits(model, images, edge_filter, runtime, batch_size):
        centres.append(predicted_horns(logits.float()).cpu().numpy())
    return np.concatenate(centres)


def _segmentation_logits(
    model: nn.Module, images: Sequence[np.ndarray], edge_filter: str, runtime: Runtime, batch_size: int
) -> Iterator[torch.Tensor]:
    """A segmenting network's logits (B, 3, H, W), batch after batch of `images` in their order."""
    model.eval()
    dataset = SliceDataset(images, np.zeros((len(images), 1), np.float32), edge_filter)
    loader = DataLoader(
        range(len(images)),
        batch_size=batch_size,
        collate_fn=lambda batch: collate_batch([dataset[key] for key in batch], runtime.channels_last),
    )
    for (x,), _ in loader:
        with torch.no_grad(), runtime.autocast():  # not across the yield: the caller's mode is its own
            logits = model.segment(runtime.prepare_input(x))
        yield logits


def segmentation_metrics(
    model: nn.Module,
    data: PreparedData,
    indices: Sequence[int],
    edge_filter: str,
    runtime: Runtime,
    batch_size: int = 64,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, object] | None:
    """Dice and IoU per class with bootstrap intervals (evaluation/segmentation.py
    segmentation_summary) of a segmenting network on the rows of `indices` that have a mask; the
    bootstrap resamples patients where rows share them. None when no such row has a mask."""
    rows = data.rows_with_mask(indices)
    if not len(rows):
        return None
    maps = predict_label_maps(model, data.view(rows), edge_filter, runtime, batch_size)
    scores = set_scores(maps, [data.masks[i] for i in rows])
    return segmentation_summary(scores, n_resamples, seed, groups=data.patients(rows))
