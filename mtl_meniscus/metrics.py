"""Metrics as pure functions on arrays. AUCs use scikit-learn; a one-class subset gives NaN."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from sklearn.metrics import roc_auc_score

from .labels import CHALLENGE_WEIGHTS, TASKS


def supervised_rows(targets: np.ndarray, task: str) -> np.ndarray:
    """(N,) bool: rows where a task is scored: all known fissure labels; tears only for the others."""
    column = targets[:, TASKS.index(task)]
    known = ~np.isnan(column)
    return known if task == "fissure" else known & (targets[:, 0] == 1)


def binary_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC, or NaN when only one class is present (undefined, not a crash)."""
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return float("nan")
    return float(roc_auc_score(y_true, y_score))


def task_aucs(targets: np.ndarray, probs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-task AUC: fissure on all images, orientation and position on true tears only."""
    out = {}
    for task, p in probs.items():
        rows = supervised_rows(targets, task)
        out[task] = binary_auc(targets[rows, TASKS.index(task)], np.asarray(p)[rows])
    return out


def challenge_score(aucs: Mapping[str, float]) -> float:
    """0.4 AUC(fissure) + 0.3 AUC(orientation) + 0.3 AUC(position); NaN if any is undefined."""
    return float(sum(CHALLENGE_WEIGHTS[t] * aucs.get(t, float("nan")) for t in TASKS))


def monitor_score(aucs: Mapping[str, float]) -> float:
    """Challenge-weighted mean over the tasks present and defined (the challenge score for all three).

    Used to pick the best epoch: a single-task network of the cascade monitors its own AUC.
    """
    defined = {t: a for t, a in aucs.items() if not math.isnan(a)}
    if not defined:
        return float("nan")
    total = sum(CHALLENGE_WEIGHTS[t] for t in defined)
    return float(sum(CHALLENGE_WEIGHTS[t] * a for t, a in defined.items()) / total)
