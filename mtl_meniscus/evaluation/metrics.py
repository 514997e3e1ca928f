"""Metrics as pure functions on arrays. AUCs are Mann-Whitney statistics from mid-ranks (equal
to scikit-learn's roc_auc_score, tested); a one-class subset gives NaN."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

from mtl_meniscus.labels import DEFAULT_TASKS, TaskTable


def binary_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC, or NaN when only one class is present (undefined, not a crash).

    Computed as the Mann-Whitney statistic from mid-ranks (ties count half), which equals
    scikit-learn's roc_auc_score (the tests check it) at a fraction of its overhead: the
    bootstraps compute hundreds of thousands of AUCs.
    """
    positives = np.asarray(y_true) == 1
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(y_score, dtype=float))  # 1-based, ties get their mean rank
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def task_aucs(
    targets: np.ndarray, probs: Mapping[str, np.ndarray], tasks: TaskTable = DEFAULT_TASKS
) -> dict[str, float]:
    """Per-task AUC: fissure on all images, orientation and position on true tears only."""
    out = {}
    for task, p in probs.items():
        rows = tasks.scored_rows(targets, task)
        out[task] = binary_auc(targets[rows, tasks.index(task)], np.asarray(p)[rows])
    return out


def challenge_score(aucs: Mapping[str, float], tasks: TaskTable = DEFAULT_TASKS) -> float:
    """0.4 AUC(fissure) + 0.3 AUC(orientation) + 0.3 AUC(position): the AUCs' mean weighted by the
    tasks' weights, divided by the weights' sum (1 for these three), so that a table with an extra
    scored task keeps the AUC's scale (chance 0.5, perfect 1), as the monitored score and the
    stopping rule's chance level assume. NaN if any weighted task is undefined. Tasks of weight 0
    are reported, not scored."""
    scored = [t for t in tasks if t.weight > 0]
    total = sum(t.weight for t in scored)
    return float(sum(t.weight * aucs.get(t.name, float("nan")) for t in scored) / total)


def monitor_weights(names: Iterable[str], tasks: TaskTable = DEFAULT_TASKS) -> dict[str, float]:
    """The weights of the monitored score over these tasks: their challenge weights, or equal
    weights when all of them are 0 (a network of an unscored task)."""
    weights = {name: tasks.weight(name) for name in names}
    return weights if any(weights.values()) else dict.fromkeys(weights, 1.0)


def monitor_score(aucs: Mapping[str, float], tasks: TaskTable = DEFAULT_TASKS) -> float:
    """Challenge-weighted mean over the tasks present and defined (the challenge score for all three).

    Used to pick the best epoch: a single-task network of the cascade monitors its own AUC. Tasks
    of weight 0 count only when no weighted task is there (monitor_weights).
    """
    defined = {t: a for t, a in aucs.items() if not math.isnan(a)}
    if not defined:
        return float("nan")
    weights = monitor_weights(defined, tasks)
    return float(sum(weights[t] * a for t, a in defined.items()) / sum(weights.values()))


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
    # Not roc_curve's first threshold, +inf (nothing positive): as a probability it would become
    # 1.0, which calls p = 1 positive. Its J = 0 is also the last point's (everything positive), so
    # a model no cut helps gets a finite cut of J = 0 (the first such one), whose J is the one claimed.
    best = 1 + int(np.argmax((tpr - fpr)[1:]))
    return float(thresholds[best])


def roc_points(
    targets: np.ndarray, probs: Mapping[str, np.ndarray], tasks: TaskTable = DEFAULT_TASKS
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(fpr, tpr) per task on its scored rows; tasks with one class are left out."""
    from sklearn.metrics import roc_curve

    curves = {}
    for task, p in probs.items():
        rows = tasks.scored_rows(targets, task)
        y = targets[rows, tasks.index(task)]
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, np.asarray(p)[rows])
            curves[task] = (fpr, tpr)
    return curves


def task_resamples(
    targets: np.ndarray,
    n_resamples: int,
    seed: int = 0,
    names: tuple[str, ...] | None = None,
    tasks: TaskTable = DEFAULT_TASKS,
    groups: Sequence[str] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Per resample, {task: row indices} of a bootstrap of that task's own scored rows.

    Each task is resampled on the rows where it is scored (all images for fissure, true tears
    for orientation and position), with replacement within its own two classes: the task keeps
    its numbers of positives and negatives, and its AUC varies with every one of them. (A
    stratification on the joint label would draw a stratum of one image, e.g. the only anterior
    vertical tear, in every resample and leave the rare class's variance out.) The tasks' draws
    are independent of each other. Same targets and seed, same resamples: variants scored on the
    same test split can be compared resample by resample (paired bootstrap).

    `groups` (one patient id per row) makes it a cluster bootstrap: whole patients are drawn with
    replacement, stratified on whether the patient has a positive of the task, and bring all their
    rows, so that slices of one knee, which are not independent, widen the interval as they
    should. With one row per patient the draws, and so the intervals, are the unclustered ones.
    """
    rng = np.random.default_rng(seed)
    strata: dict[str, list[list[np.ndarray]]] = {}  # task -> strata -> clusters -> rows
    for task in names or tasks.names:
        rows = np.flatnonzero(tasks.scored_rows(targets, task))
        strata[task] = _strata(rows, targets[rows, tasks.index(task)], groups)
    for _ in range(n_resamples):
        yield {task: _draw(rng, clusters) for task, clusters in strata.items()}


def _strata(rows: np.ndarray, labels: np.ndarray, groups: Sequence[str] | None) -> list:
    """The task's rows as [negative stratum, positive stratum] (empty strata left out), each a
    list of clusters (rows of one patient, in row order; one row each without `groups`). A
    patient is in the positive stratum when any of its rows is positive."""
    if groups is None:  # (n, 1): a cluster per row
        return [rows[labels == value][:, None] for value in (0.0, 1.0) if np.any(labels == value)]
    by_patient: dict[str, list[int]] = {}
    for row in rows:
        by_patient.setdefault(groups[row], []).append(row)
    clusters = [np.array(members) for members in by_patient.values()]  # ordered by their first row
    positive = {row for row, label in zip(rows, labels) if label == 1}
    has_positive = [any(row in positive for row in cluster) for cluster in clusters]
    return [
        stratum
        for stratum in (
            [c for c, p in zip(clusters, has_positive) if not p],
            [c for c, p in zip(clusters, has_positive) if p],
        )
        if stratum
    ]


def _draw(rng: np.random.Generator, strata: list) -> np.ndarray:
    """One resample: per stratum as many clusters as it has, drawn with replacement, their rows."""
    if not strata:
        return np.zeros(0, np.int64)
    drawn = []
    for clusters in strata:
        picks = rng.choice(len(clusters), size=len(clusters))
        if isinstance(clusters, np.ndarray):  # one row per cluster
            drawn.append(clusters[picks, 0])
        else:
            drawn.extend(clusters[k] for k in picks)
    return np.concatenate(drawn).astype(np.int64)


def resampled_aucs(
    targets: np.ndarray,
    probs: Mapping[str, np.ndarray],
    rows_by_task: Mapping[str, np.ndarray],
    tasks: TaskTable = DEFAULT_TASKS,
) -> dict[str, float]:
    """AUC of each task on its own resampled rows (see task_resamples)."""
    return {
        task: binary_auc(targets[rows_by_task[task], tasks.index(task)], np.asarray(p)[rows_by_task[task]])
        for task, p in probs.items()
    }


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
    tasks: TaskTable = DEFAULT_TASKS,
    groups: Sequence[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals of each task AUC and of the challenge score.

    Each task's AUC is bootstrapped on its own rows, stratified on its own class (task_resamples);
    the score of a resample combines the tasks' resampled AUCs (challenge_score: NaNs, as the score
    itself, when `probs` lacks a weighted task). With `groups` (a patient id per row) whole patients
    are resampled (a cluster bootstrap).
    """
    samples: dict[str, list[float]] = {task: [] for task in probs}
    samples["score"] = []
    for rows_by_task in task_resamples(targets, n_resamples, seed, tuple(probs), tasks, groups):
        aucs = resampled_aucs(targets, probs, rows_by_task, tasks)
        for task, value in aucs.items():
            samples[task].append(value)
        samples["score"].append(challenge_score(aucs, tasks))
    return {key: percentile_ci(np.asarray(values), level) for key, values in samples.items()}


def paired_cluster_test(
    y_true: np.ndarray,
    score_a: np.ndarray,
    score_b: np.ndarray,
    groups: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Paired test of AUC(a) - AUC(b) on rows that share patients: the difference's standard error
    from a cluster bootstrap (whole patients drawn, stratified on whether they have a positive, as
    task_resamples), z = difference / SE, two-sided normal p. DeLong's test takes rows as
    independent, which slices of one knee are not; this keeps its form (difference, z, p)."""
    y_true, score_a, score_b = (np.asarray(v, float) for v in (y_true, score_a, score_b))
    difference = binary_auc(y_true, score_a) - binary_auc(y_true, score_b)
    strata = _strata(np.arange(len(y_true)), y_true, groups)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        rows = _draw(rng, strata)
        draws.append(binary_auc(y_true[rows], score_a[rows]) - binary_auc(y_true[rows], score_b[rows]))
    spread = float(np.nanstd(draws, ddof=1)) if n_resamples > 1 else math.nan
    return {"difference": difference, **_z_test(difference, spread)}


def _z_test(difference: float, se: float) -> dict[str, float]:
    """{z, p_value}: z = difference / se and its two-sided normal p-value. A zero standard error
    gives z = 0 and p = 1 for no difference (e.g. both models perfect on every draw), else an
    infinite z and p = 0; NaNs where the difference or the error is undefined."""
    if math.isnan(difference) or math.isnan(se):
        return {"z": math.nan, "p_value": math.nan}
    if se == 0.0:
        z = 0.0 if difference == 0 else math.copysign(math.inf, difference)
    else:
        z = difference / se
    return {"z": z, "p_value": math.erfc(abs(z) / math.sqrt(2))}


def delong_test(y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict[str, float]:
    """DeLong's test of two correlated ROC AUCs (two models scored on the same images).

    DeLong, DeLong & Clarke-Pearson 1988: each positive's and each negative's placement value
    (its share of the other class it outranks, ties counting half) gives the AUCs and the
    covariance of their difference. Returns auc_a, auc_b, difference (a - b), its standard
    error, z and the two-sided p-value; NaN where a class is missing, and the error, z and p NaN
    where a class has a single image: the spread of its placement values, half of the variance,
    cannot be estimated from one (taking it as 0 made p < 0.05 in 62% of null draws with 1 positive
    against 25 negatives). Equal AUCs with zero variance (e.g. both perfect) give z = 0 and p = 1.
    """
    y_true = np.asarray(y_true)
    positives, negatives = y_true == 1, y_true == 0
    m, n = int(positives.sum()), int(negatives.sum())
    nan = float("nan")
    if m == 0 or n == 0:
        return {"auc_a": nan, "auc_b": nan, "difference": nan, "se": nan, "z": nan, "p_value": nan}
    v10, v01 = [], []  # per model: placement values of the positives (m,) and of the negatives (n,)
    for scores in (np.asarray(score_a, float), np.asarray(score_b, float)):
        x, y = scores[positives][:, None], scores[negatives][None, :]  # (m, 1), (1, n)
        psi = (x > y) + 0.5 * (x == y)  # (m, n)
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    auc_a, auc_b = float(v10[0].mean()), float(v10[1].mean())
    difference = auc_a - auc_b
    if m < 2 or n < 2:
        return {"auc_a": auc_a, "auc_b": auc_b, "difference": difference, "se": nan, "z": nan, "p_value": nan}
    s10, s01 = np.cov(np.stack(v10)), np.cov(np.stack(v01))  # (2, 2) each
    variance = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    se = math.sqrt(max(float(variance), 0.0))
    return {"auc_a": auc_a, "auc_b": auc_b, "difference": difference, "se": se, **_z_test(difference, se)}


def seeds_and_images_interval(
    per_seed: np.ndarray, image_resamples: np.ndarray, level: float = 0.95
) -> tuple[float, float]:
    """Interval of a mean over training seeds that holds with few seeds: the seeds' own t-interval
    combined with the test images' sampling error.

    `per_seed` (n,) holds one value per seed (a score, or a paired difference: each seed's value
    minus the baseline's of the same seed, on the same test images); `image_resamples` (B,) the
    bootstrap distribution of their mean when only the test images are resampled. The two sources
    of error are independent (the training randomness and the draw of the test set), so their
    half-widths add in quadrature: t(n-1) * sd / sqrt(n) for the seeds (a resampled mean of n
    seeds cannot leave the range of the n values, so it is too narrow with 3-5 seeds) and z * the
    bootstrap's standard deviation for the images. NaNs with fewer than two seeds, and when the
    images were resampled but fewer than two resamples are defined (the images' error is unknown,
    not zero); an empty `image_resamples` (no bootstrap asked for) gives the seeds' interval.
    """
    from scipy import stats

    values = np.asarray(per_seed, dtype=float)
    values = values[~np.isnan(values)]
    resamples = np.asarray(image_resamples, dtype=float)
    resamples = resamples[~np.isnan(resamples)]
    if len(values) < 2:
        return (math.nan, math.nan)
    tail = (1 + level) / 2
    seed_half = stats.t.ppf(tail, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    if len(image_resamples) and len(resamples) < 2:  # resampled, but (almost) no draw was defined
        return (math.nan, math.nan)
    image_half = stats.norm.ppf(tail) * resamples.std(ddof=1) if len(resamples) > 1 else 0.0
    half = math.hypot(seed_half, image_half)
    return (float(values.mean() - half), float(values.mean() + half))
