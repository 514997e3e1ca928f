"""A network's validation after each epoch: AUCs, the score it monitors and the masked loss."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from mtl_meniscus.config import Config
from mtl_meniscus.data.records import PreparedData
from mtl_meniscus.engine.distributed import SINGLE, Distributed
from mtl_meniscus.engine.inference import predict_probs
from mtl_meniscus.engine.runtime import Runtime
from mtl_meniscus.evaluation.metrics import monitor_score, task_aucs
from mtl_meniscus.labels import TaskTable


def validate(
    model: nn.Module,
    data: PreparedData,
    indices: np.ndarray,
    config: Config,
    runtime: Runtime,
    processes: Distributed = SINGLE,
) -> dict[str, Any]:
    """{"auc": {task: AUC}, "score": the monitored score, "loss": masked BCE, "finite": all outputs
    finite} on the images `indices`; under torchrun each process predicts its share."""
    targets = data.targets[indices]
    shards = processes.shards(len(indices))
    mine = data.view([indices[k] for k in shards[processes.rank]])
    local = predict_probs(model, mine, config.preprocess.edge_filter, runtime, config.train.eval_batch_size)
    probs = processes.gather_probs(local, shards)  # every process now holds every probability
    if not all(np.isfinite(p).all() for p in probs.values()):
        return {"finite": False}
    aucs = task_aucs(targets, probs, data.tasks)
    return {
        "finite": True,
        "auc": aucs,
        "score": monitor_score(aucs, data.tasks),
        "loss": masked_log_loss(targets, probs, data.tasks),
    }


def masked_log_loss(targets: np.ndarray, probs: dict[str, np.ndarray], tasks: TaskTable) -> float:
    """Validation loss with the training loss's masking: sum over tasks of the mean BCE."""
    total = 0.0
    for task, p in probs.items():
        rows = tasks.scored_rows(targets, task)
        if rows.any():
            y = targets[rows, tasks.index(task)]
            q = np.clip(p[rows], 1e-7, 1 - 1e-7)
            total += float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    return total
