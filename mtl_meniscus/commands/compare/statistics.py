"""The comparison's numbers: per-variant scores over seeds, bootstrap CIs of the seed means, paired differences against the baseline, DeLong tests, and the plain-floor check."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtl_meniscus.commands.compare.plan import Variant, baselines
from mtl_meniscus.config import SEGMENTATION
from mtl_meniscus.evaluation.calibration import brier_score, expected_calibration_error
from mtl_meniscus.evaluation.metrics import (
    challenge_score,
    delong_test,
    paired_cluster_test,
    percentile_ci,
    resampled_aucs,
    seeds_and_images_interval,
    task_resamples,
)
from mtl_meniscus.labels import DEFAULT_TASKS, TaskTable

BOOTSTRAP_SEED = 0


@dataclass
class ScoredVariant:
    """A variant's test-split probabilities and its cost figures (from result.json)."""

    variant: Variant
    result: dict[str, Any]
    images: list[str]
    probs: dict[str, np.ndarray]  # {task: (N,)} in the order of `images`
    # {task: (N,)} the targets it was scored against, NaN where undefined (read back from its file)
    labels: dict[str, np.ndarray] = field(default_factory=dict)


def summarize(
    scored: Sequence[ScoredVariant],
    targets: np.ndarray,
    n_bootstrap: int,
    budget: str = "per-network",
    tasks: TaskTable = DEFAULT_TASKS,
    patients: list[str] | None = None,
    on_resample: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per group (mode, trunk, training fraction): means and sds over seeds, intervals,
    differences to the group's baseline (the cascade trained on the same fraction).

    Intervals hold two sources of error: the training seeds (a t-interval over the seeds; a
    bootstrap of 3-5 seeds cannot leave their range and is too narrow) and the test images (a
    bootstrap of the test split with every seed kept: each task on its own rows, stratified on its
    own class, patient-grouped: metrics.task_resamples), added in quadrature
    (metrics.seeds_and_images_interval). A difference to the baseline is paired twice: per seed
    (each seed's score minus the baseline's score of the same seed) and per resample (both groups on
    the same drawn images). The image-only intervals keep the seeds as they are.
    """
    groups: dict[str, list[ScoredVariant]] = {}
    for item in scored:
        groups.setdefault(item.variant.group, []).append(item)
    baseline_of = baselines([s.variant for s in scored])
    names = list(scored[0].probs)  # the tasks of the comparison, in table order
    samples = _image_bootstrap(groups, targets, n_bootstrap, names, tasks, patients, on_resample)
    table = []
    for group, members in groups.items():
        baseline = baseline_of[group]
        row = _group_row(group, members, names, samples)
        row |= _difference_columns(members, groups[baseline], samples[group], samples[baseline], baseline)
        for key, values in _calibration_columns(members, targets, tasks).items():
            row[f"{key}_mean"] = float(np.mean(values))
        row |= _cost_columns(members, budget, n_bootstrap)
        row["n_patients"] = len(set(patients)) if patients else row["n_test"]
        table.append(row)
    return table


def _image_bootstrap(
    groups: dict[str, list[ScoredVariant]],
    targets: np.ndarray,
    n_bootstrap: int,
    names: list[str],
    tasks: TaskTable,
    patients: list[str] | None = None,
    on_resample: Callable[[], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """{group: {task or "score": the seed mean on each resample of the test images}}; every group
    is scored on the same resamples, so differences can be taken resample by resample.
    `on_resample()` after each resample (a progress display)."""
    keys = [*names, "score"]
    means = {g: {k: [] for k in keys} for g in groups}
    for rows_by_task in task_resamples(targets, n_bootstrap, BOOTSTRAP_SEED, tuple(names), tasks, patients):
        for group, members in groups.items():
            aucs = [resampled_aucs(targets, m.probs, rows_by_task, tasks) for m in members]
            # (seeds, tasks + score); the score as the test score's (an unscored task's NaN left out)
            per_seed = np.array([[*(a[t] for t in names), challenge_score(a, tasks)] for a in aucs])
            for column, key in enumerate(keys):
                means[group][key].append(per_seed[:, column].mean())
        if on_resample is not None:
            on_resample()
    return means


def _group_row(
    group: str,
    members: list[ScoredVariant],
    names: list[str],
    samples: dict[str, dict[str, list[float]]],
) -> dict[str, Any]:
    """A group's accuracy columns: AUC and score means, sds and intervals (seeds and images, and
    images only), and the seeds whose training was still improving when its budget ended."""
    first = members[0]
    scores = np.array([m.result["test_score"] for m in members])
    row: dict[str, Any] = {
        "variant": group,
        "mode": first.variant.mode,
        "trunk": first.variant.trunk,
        "roi": first.variant.roi,
        "segmentation": first.variant.segmentation,
        "train_fraction": first.variant.fraction,
        "seeds": " ".join(str(m.variant.seed) for m in members),
        "n_seeds": len(members),
        # Runs whose validation never left chance are kept in the means (they are what the
        # mode gave) but counted and named, never averaged in silently.
        "not_learned_seeds": " ".join(
            str(m.variant.seed) for m in members if m.result.get("learned") is False
        ),
        "still_improving_seeds": " ".join(str(m.variant.seed) for m in members if still_improving(m.result)),
    }
    for task in names:
        values = np.array([m.result["test_auc"][task] for m in members])
        low, high = seeds_and_images_interval(values, samples[group][task])
        row |= {f"auc_{task}_mean": values.mean(), f"auc_{task}_sd": _sd(values)}
        row |= {f"auc_{task}_ci_low": low, f"auc_{task}_ci_high": high}
    row |= {"score_mean": scores.mean(), "score_sd": _sd(scores)}
    row |= _interval("score_ci", seeds_and_images_interval(scores, samples[group]["score"]))
    row |= _interval("score_ci_images", percentile_ci(np.array(samples[group]["score"])))
    return row


def _difference_columns(
    members: list[ScoredVariant],
    base_members: list[ScoredVariant],
    samples: dict[str, list[float]],
    base_samples: dict[str, list[float]],
    baseline: str,
) -> dict[str, Any]:
    """The difference in score to the baseline: mean over the seeds both have of (score - the
    baseline's score of the same seed), its interval over seeds and images, and over images only."""
    base_by_seed = {m.variant.seed: m.result["test_score"] for m in base_members}
    deltas = np.array(
        [
            m.result["test_score"] - base_by_seed[m.variant.seed]
            for m in members
            if m.variant.seed in base_by_seed
        ]
    )
    image_deltas = np.array(samples["score"]) - np.array(base_samples["score"])
    row: dict[str, Any] = {
        "baseline": baseline,
        "diff_mean": float(deltas.mean()) if len(deltas) else math.nan,
    }
    if members is base_members:  # the baseline against itself: exactly zero
        return row | {f"diff_ci{kind}_{end}": 0.0 for kind in ("", "_images") for end in ("low", "high")}
    row |= _interval("diff_ci", seeds_and_images_interval(deltas, image_deltas))
    row |= _interval("diff_ci_images", percentile_ci(image_deltas))
    return row


STILL_IMPROVING_SHARE = 0.2  # a best epoch in the last 20% of the budget: the budget, not the method, decided


def still_improving(result: dict[str, Any]) -> bool:
    """True when any network of the run restored an epoch in the last STILL_IMPROVING_SHARE of its
    epoch budget and was not stopped early: it was probably still improving when the budget ended,
    so its score says more about the budget than about the method. Classifiers only: the cascade's
    segmentation network (model.segmentation) is judged by its Dice, which often rises to the end."""
    budget = result.get("max_epochs")
    if not budget:
        return False
    return any(
        best["epochs"] >= budget and best["best_epoch"] > (1 - STILL_IMPROVING_SHARE) * budget
        for network, best in result["best"].items()
        if network != SEGMENTATION
    )


def _cost_columns(members: list[ScoredVariant], budget: str, n_bootstrap: int) -> dict[str, Any]:
    """A group's cost columns: parameters, training images and seconds, inference time."""
    first = members[0]
    return {
        "params": first.result["params"],
        "budget": budget,
        "n_train": first.result.get("n_train"),  # its share of the training split, in images
        "train_images_mean": float(np.mean([m.result["train_images"] for m in members])),
        # results scored before FLOPs were counted have none: NaN, not a made-up number
        "train_flops_mean": float(np.mean([m.result.get("train_flops", math.nan) for m in members])),
        "train_seconds_mean": float(np.mean([m.result["train_wall_seconds"] for m in members])),
        "train_images_per_s_mean": float(np.mean([m.result["train_images_per_s"] for m in members])),
        "infer_ms_per_image_median": float(np.median([m.result["infer_ms_per_image"] for m in members])),
        "tta_copies": first.result["tta_copies"],
        "n_test": first.result["n_test"],
        "bootstrap_resamples": n_bootstrap,
    }


def _interval(prefix: str, bounds: tuple[float, float]) -> dict[str, float]:
    return {f"{prefix}_low": bounds[0], f"{prefix}_high": bounds[1]}


def delong_rows(
    scored: Sequence[ScoredVariant],
    targets: np.ndarray,
    tasks: TaskTable = DEFAULT_TASKS,
    patients: list[str] | None = None,
) -> list[dict[str, Any]]:
    """A paired test of each task's AUC: every variant against the baseline of the same seed.
    DeLong's when every row is its own patient; where rows share patients, the paired cluster
    bootstrap (metrics.paired_cluster_test), since DeLong's takes rows as independent."""
    clustered = patients is not None and len(set(patients)) < len(patients)
    baseline_of = baselines([s.variant for s in scored])
    by_group_seed = {(s.variant.group, s.variant.seed): s for s in scored}
    rows = []
    for item in scored:
        baseline = baseline_of[item.variant.group]
        base = by_group_seed.get((baseline, item.variant.seed))
        if item.variant.group == baseline or base is None:
            continue
        row: dict[str, Any] = {
            "variant": item.variant.name,
            "baseline": base.variant.name,
            "test": "paired cluster bootstrap" if clustered else "DeLong",
        }
        for task in item.probs:
            scored_rows = tasks.scored_rows(targets, task)
            arguments = (
                targets[scored_rows, tasks.index(task)],
                item.probs[task][scored_rows],
                base.probs[task][scored_rows],
            )
            if clustered:
                groups = [patients[k] for k in np.flatnonzero(scored_rows)]
                test = paired_cluster_test(*arguments, groups, seed=BOOTSTRAP_SEED)
            else:
                test = delong_test(*arguments)
            row |= {
                f"{task}_auc_diff": test["difference"],
                f"{task}_z": test["z"],
                f"{task}_p": test["p_value"],
            }
        rows.append(row)
    return rows


def _calibration_columns(
    members: Sequence[ScoredVariant], targets: np.ndarray, tasks: TaskTable
) -> dict[str, list[float]]:
    """{"ece_<task>" | "brier_<task>": one value per member}: each seed's calibration on the test
    split (the uncalibrated probabilities: compare does not calibrate its runs)."""
    columns: dict[str, list[float]] = {}
    for member in members:
        for task, probs in member.probs.items():
            rows = tasks.scored_rows(targets, task)
            y = targets[rows, tasks.index(task)]
            columns.setdefault(f"ece_{task}", []).append(expected_calibration_error(y, probs[rows]))
            columns.setdefault(f"brier_{task}", []).append(brier_score(y, probs[rows]))
    return columns


def _sd(values: np.ndarray) -> float:
    """Sample standard deviation; NaN for fewer than two values."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def per_seed_rows(
    scored: Sequence[ScoredVariant], targets: np.ndarray, tasks: TaskTable = DEFAULT_TASKS
) -> list[dict[str, Any]]:
    """One row per trained variant (a seed): its test AUCs and score, calibration and costs."""
    rows = []
    for item in scored:
        r = item.result
        calibration = {key: values[0] for key, values in _calibration_columns([item], targets, tasks).items()}
        rows.append(
            {
                "variant": item.variant.name,
                "group": item.variant.group,
                "mode": item.variant.mode,
                "trunk": item.variant.trunk,
                "roi": item.variant.roi,
                "segmentation": item.variant.segmentation,
                "seed": item.variant.seed,
                **{f"auc_{t}": auc for t, auc in r["test_auc"].items()},
                "score": r["test_score"],
                "train_fraction": item.variant.fraction,
                "train_images": r["train_images"],
                "train_flops": r.get("train_flops", math.nan),
                "still_improving": still_improving(r),
                **calibration,
                "params": r["params"],
                "train_seconds": r["train_wall_seconds"],
                "train_images_per_s": r["train_images_per_s"],
                "infer_ms_per_image": r["infer_ms_per_image"],
                "best_epochs": " ".join(f"{m}:{b['best_epoch']}/{b['epochs']}" for m, b in r["best"].items()),
                "learned": r.get("learned", True),
                # a ROI model's test crops at a fallback window (no horn found), of all its test crops
                "roi_fallbacks": f"{r['roi_fallbacks']}/{r['roi_images']}" if "roi_images" in r else "",
            }
        )
    return rows


FLOOR_MARGIN = 0.02  # a variant this far below the plain floor of its mode loses to it


# What a variant and its plain floor share: all but the trunk (a preset trained on half the
# training split is judged against the floor trained on the same half, not on all of it).
FLOOR_KEYS = ("mode", "train_fraction", "roi", "segmentation")


def floor_findings(table: list[dict[str, Any]]) -> list[str]:
    """For every variant with a plain-floor variant alike but for the trunk (FLOOR_KEYS) in the
    table: a sentence saying whether it beat the floor (mean test score), so a user sees at once
    when a preset loses to the simple baseline on their data. A floor is not judged."""

    def alike(row: dict[str, Any]) -> tuple:
        return tuple(row.get(key) for key in FLOOR_KEYS)

    floors = {alike(row): row for row in table if row["trunk"] == "plain"}
    findings = []
    for row in table:
        floor = floors.get(alike(row))
        if floor is None or row["trunk"] == "plain":
            continue
        gap = row["score_mean"] - floor["score_mean"]
        if math.isnan(gap):  # neither a pass nor a loss: one of the two has no test score
            undefined = " and ".join(r["variant"] for r in (row, floor) if math.isnan(r["score_mean"]))
            verdict = (
                f"cannot be judged against the plain floor {floor['variant']}: the test score of "
                f"{undefined} is undefined (see its row)"
            )
        elif gap < -FLOOR_MARGIN:
            verdict = (
                f"LOSES to the plain floor {floor['variant']} by {-gap:.3f}: on this data the preset is "
                "worse than a plain CNN"
            )
        else:
            verdict = (
                f"is within {FLOOR_MARGIN} of the plain floor {floor['variant']} or above it ({gap:+.3f})"
            )
        findings.append(f"Floor check: {row['variant']} {verdict}.")
    return findings
