"""Batched prediction of task probabilities, optionally with test-time augmentation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mtl_meniscus.config import TTAConfig
from mtl_meniscus.data.torch_dataset import ExamDataset, SliceDataset, collate_batch
from mtl_meniscus.engine.runtime import Runtime
from mtl_meniscus.evaluation.calibration import scaled_probability
from mtl_meniscus.networks.models import takes_exams


def predict_probs(
    model: nn.Module,
    images: Sequence[np.ndarray],
    edge_filter: str,
    runtime: Runtime,
    batch_size: int = 64,
    tta: TTAConfig | None = None,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """{task: (N,) probabilities}; with TTA, the mean over the original and `tta.copies` copies.
    (A trained run's calibration is applied by engine.trained.TrainedModel.)"""
    logits = predict_logits(model, images, edge_filter, runtime, batch_size, tta, seed, on_batch)
    return {task: scaled_probability(value, 1.0) for task, value in logits.items()}


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
) -> dict[str, np.ndarray]:
    """{task: (copies + 1, N) logits}: row 0 the images as they are, row k their k-th augmented copy.

    Copy k of image i is augmented with the generator seeded (seed, i, k): deterministic and
    independent of the batch size. For an exam model (models.takes_exams) `images` are whole
    exams (S, H, W), one output each, and `batch_size` counts exams.
    """
    model.eval()
    n = len(images)
    copies = tta.copies if tta is not None else 0
    kind = ExamDataset if takes_exams(model) else SliceDataset
    dataset = kind(images, np.zeros((n, 1), np.float32), edge_filter, tta.augment if copies else None)
    keys = [(i, None) for i in range(n)]
    keys += [
        (i, int(np.random.SeedSequence([seed, i, k]).generate_state(1)[0]))
        for k in range(copies)
        for i in range(n)
    ]
    loader = DataLoader(
        keys,
        batch_size=batch_size,
        collate_fn=lambda batch: collate_batch([dataset[key] for key in batch], runtime.channels_last),
    )
    chunks: dict[str, list[np.ndarray]] = {}
    for inputs, _ in loader:
        x, *exam_lengths = inputs  # x (B, C, H, W); for exams (N, C, H, W) and lengths (B,)
        with runtime.autocast():
            logits = model(runtime.prepare_input(x), *(t.to(runtime.device) for t in exam_lengths))
        for task, value in logits.items():
            chunks.setdefault(task, []).append(value.float().cpu().numpy())
        if on_batch is not None:
            on_batch(len(value))
    return {task: np.concatenate(parts).reshape(copies + 1, n) for task, parts in chunks.items()}
