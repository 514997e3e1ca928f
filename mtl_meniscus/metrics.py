"""Metrics as pure functions on arrays. AUCs use scikit-learn; a one-class subset gives NaN."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

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


def binary_counts(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, float]:
    """Confusion matrix at a threshold (p >= threshold is positive), sensitivity and specificity."""
    y_true = np.asarray(y_true).astype(bool)
    predicted = np.asarray(y_prob) >= threshold
    tp = int(np.sum(predicted & y_true))
    fp = int(np.sum(predicted & ~y_true))
    tn = int(np.sum(~predicted & ~y_true))
    fn = int(np.sum(~predicted & y_true))
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
    }


def youden_threshold(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 on the ROC curve."""
    from sklearn.metrics import roc_curve

    if len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y_true, y_prob)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))  # roc_curve's first threshold is +inf


def roc_points(
    targets: np.ndarray, probs: Mapping[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(fpr, tpr) per task on its scored rows; tasks with one class are left out."""
    from sklearn.metrics import roc_curve

    curves = {}
    for task, p in probs.items():
        rows = supervised_rows(targets, task)
        y = targets[rows, TASKS.index(task)]
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, np.asarray(p)[rows])
            curves[task] = (fpr, tpr)
    return curves


def stratified_resamples(targets: np.ndarray, n_resamples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Row indices of `n_resamples` stratified bootstrap resamples of `targets` (N, 3).

    Rows are drawn with replacement within each joint-label stratum (fissure, orientation,
    position), so every resample keeps the class counts and every AUC stays defined when it is
    defined on the full set. Same targets and seed, same resamples: variants scored on the same
    test split can be compared resample by resample (paired bootstrap).
    """
    rng = np.random.default_rng(seed)
    strata: dict[tuple, list[int]] = {}
    for row, label in enumerate(map(tuple, np.nan_to_num(targets, nan=-1.0))):
        strata.setdefault(label, []).append(row)
    groups = [np.asarray(rows) for rows in strata.values()]
    for _ in range(n_resamples):
        yield np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the defined (non-NaN) values; NaNs if there are none."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return (float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))


def bootstrap_cis(
    targets: np.ndarray,
    probs: Mapping[str, np.ndarray],
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals of each task AUC and the challenge score (stratified bootstrap)."""
    samples: dict[str, list[float]] = {task: [] for task in probs}
    samples["score"] = []
    for rows in stratified_resamples(targets, n_resamples, seed):
        aucs = task_aucs(targets[rows], {t: np.asarray(p)[rows] for t, p in probs.items()})
        for task, value in aucs.items():
            samples[task].append(value)
        samples["score"].append(challenge_score(aucs) if set(aucs) == set(TASKS) else monitor_score(aucs))
    return {key: percentile_ci(np.asarray(values), level) for key, values in samples.items()}
