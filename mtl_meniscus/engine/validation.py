"""A network's validation after each epoch: AUCs, the score it monitors and the masked loss (and a
segmenting network's Dice)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import nn

from mtl_meniscus.config import Config
from mtl_meniscus.data.records import PreparedData
from mtl_meniscus.data.roi import HornCentres
from mtl_meniscus.engine.distributed import SINGLE, Distributed
from mtl_meniscus.engine.inference import predict_label_maps, predict_probs
from mtl_meniscus.engine.runtime import Runtime
from mtl_meniscus.evaluation.metrics import monitor_score, task_aucs
from mtl_meniscus.evaluation.segmentation import CLASSES, SetScores, set_scores
from mtl_meniscus.labels import TaskTable
from mtl_meniscus.networks.losses import loss_rows
from mtl_meniscus.networks.models import classifies, segments


def validate(
    model: nn.Module,
    data: PreparedData,
    indices: np.ndarray,
    config: Config,
    runtime: Runtime,
    processes: Distributed = SINGLE,
    horns: HornCentres | None = None,
) -> dict[str, Any]:
    """{"auc": {task: AUC}, "score": the monitored score, "loss": masked BCE, "finite": all outputs
    finite} on the images `indices`, and for a segmenting network "dice": {class: Dice} (a network
    without a task, the cascade's segmentation network: score the mean Dice, loss NaN)
    (validation_dice); under torchrun each process predicts its share. `horns`: a ROI model's horn
    centres of every row of `data` (found once for the run, data/roi.py HornCentres)."""
    targets = data.targets[indices]
    shards = processes.shards(len(indices))
    rows = [indices[k] for k in shards[processes.rank]]
    local = (
        predict_probs(
            model,
            data.view(rows),
            config.preprocess.edge_filter,
            runtime,
            config.train.eval_batch_size,
            horns=horns.subset(rows) if horns is not None else None,
        )
        if classifies(model)
        else {}  # the cascade's segmentation network: nothing to classify, no trunk pass to waste
    )
    probs = processes.gather_probs(local, shards)  # every process now holds every probability
    if not all(np.isfinite(p).all() for p in probs.values()):
        return {"finite": False}
    aucs = task_aucs(targets, probs, data.tasks)
    dice = validation_dice(model, data, indices, config, runtime, processes) if segments(model) else None
    if not probs and dice is not None:  # the cascade's segmentation network: no task to score
        score = _mean_dice(dice)
        loss = math.nan
    else:
        score = monitor_score(aucs, data.tasks)
        loss = masked_log_loss(targets, probs, data.tasks, config.train.gated_loss_mean)
    return {
        "finite": True,
        "auc": aucs,
        "score": score,
        "loss": loss,
        **({"dice": dice} if dice is not None else {}),
    }


def _mean_dice(dice: dict[str, float]) -> float:
    """The monitored score of a network that only segments: the mean of its classes' validation
    Dice over the classes defined (NaN when none is)."""
    defined = [value for value in dice.values() if not math.isnan(value)]
    return float(np.mean(defined)) if defined else math.nan


def validation_dice(
    model: nn.Module,
    data: PreparedData,
    indices: np.ndarray,
    config: Config,
    runtime: Runtime,
    processes: Distributed = SINGLE,
) -> dict[str, float]:
    """{class: mean Dice over the images of `indices` with a mask} of a segmenting network (NaN
    where no such image has the class in its mask or its prediction); under torchrun each
    process predicts its share. Reported, not monitored, where the network also classifies: early
    stopping follows the classification (the cascade's segmentation network monitors their mean)."""
    rows = data.rows_with_mask(indices)
    shards = processes.shards(len(rows))
    mine = [rows[k] for k in shards[processes.rank]]
    maps = predict_label_maps(
        model, data.view(mine), config.preprocess.edge_filter, runtime, config.train.eval_batch_size
    )
    width = len(CLASSES) * 3  # per image: [in both, predicted, true] of each class
    counts = set_scores(maps, [data.masks[i] for i in mine]).counts.reshape(len(mine), width)
    # gathered as 1-D columns, as the probabilities are: every process's rows, in the rows' order
    columns = processes.gather_probs({str(k): counts[:, k] for k in range(width)}, shards)
    every = np.stack([columns[str(k)] for k in range(width)], axis=1).reshape(len(rows), len(CLASSES), 3)
    return SetScores(tuple(CLASSES), every.astype(np.int64)).mean_over_images("dice")


def masked_log_loss(
    targets: np.ndarray, probs: dict[str, np.ndarray], tasks: TaskTable, gated_mean: str = "per-image"
) -> float:
    """Validation loss with the training loss's masking and mean (train.gated_loss_mean, as
    networks/losses.py loss_rows): sum over tasks of the BCE summed over the scored rows, divided
    by the task's loss rows (per-image: a gated task's by every image with a gating label). NaN when
    no row is scored (no validation image, or a gated network's without a tear): 0 would read as a
    perfect fit."""
    total, scored = 0.0, False
    for task, p in probs.items():
        rows = tasks.scored_rows(targets, task)
        if rows.any():
            scored = True
            y = targets[rows, tasks.index(task)]
            q = np.clip(p[rows], 1e-7, 1 - 1e-7)
            denominator = loss_rows(targets, task, gated_mean, tasks).sum()  # the training loss's rule
            total += float(-np.sum(y * np.log(q) + (1 - y) * np.log(1 - q)) / denominator)
    return total if scored else math.nan
