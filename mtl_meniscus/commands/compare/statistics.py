"""The comparison's numbers: per-variant scores over seeds, bootstrap CIs of the seed means, paired differences against the baseline, DeLong tests, and the plain-floor check."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtl_meniscus.commands.compare.plan import Variant, baseline_group
from mtl_meniscus.evaluation.calibration import brier_score, expected_calibration_error
from mtl_meniscus.evaluation.metrics import (
    delong_test,
    paired_cluster_test,
    percentile_ci,
    resampled_aucs,
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


def summarize(
    scored: Sequence[ScoredVariant],
    targets: np.ndarray,
    n_bootstrap: int,
    budget: str = "per-network",
    tasks: TaskTable = DEFAULT_TASKS,
    patients: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per group (mode, trunk): means and sds over seeds, bootstrap CIs, differences.

    Two-level bootstrap: each resample draws the test images (each task on its own rows,
    stratified on its own class: metrics.task_resamples) and, for every group independently,
    its seeds with replacement; the group's value is the mean over the drawn seeds of the AUCs on
    the drawn images. Its intervals therefore hold both the test-set and the seed-to-seed
    variance. The image-only intervals keep every seed once and resample the images alone. A
    difference to the baseline is taken resample by resample on the same drawn images (paired on
    images; the seeds of the two groups are drawn independently).
    """
    groups: dict[str, list[ScoredVariant]] = {}
    for item in scored:
        groups.setdefault(item.variant.group, []).append(item)
    baseline = baseline_group([s.variant for s in scored])
    names = list(scored[0].probs)  # the tasks of the comparison, in table order
    samples = _bootstrap(groups, targets, n_bootstrap, names, tasks, patients)
    base_mean = float(np.mean([m.result["test_score"] for m in groups[baseline]]))
    table = []
    for group, members in groups.items():
        row = _group_row(group, members, names, samples, baseline, base_mean)
        for key, values in _calibration_columns(members, targets, tasks).items():
            row[f"{key}_mean"] = float(np.mean(values))
        row |= _cost_columns(members, budget, n_bootstrap)
        row["n_patients"] = len(set(patients)) if patients else row["n_test"]
        table.append(row)
    return table


def _bootstrap(
    groups: dict[str, list[ScoredVariant]],
    targets: np.ndarray,
    n_bootstrap: int,
    names: list[str],
    tasks: TaskTable,
    patients: list[str] | None = None,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{"with_seeds" | "images_only": {group: {task or "score": resampled seed means}}} (summarize)."""
    keys = [*names, "score"]
    weights = np.array([tasks.weight(t) for t in names])
    with_seeds = {g: {k: [] for k in keys} for g in groups}
    images_only = {g: {k: [] for k in keys} for g in groups}
    seed_rng = np.random.default_rng([BOOTSTRAP_SEED, 1])
    for rows_by_task in task_resamples(targets, n_bootstrap, BOOTSTRAP_SEED, tuple(names), tasks, patients):
        for group, members in groups.items():
            aucs = [resampled_aucs(targets, m.probs, rows_by_task, tasks) for m in members]
            per_seed = np.array([[a[t] for t in names] for a in aucs])  # (seeds, tasks)
            per_seed = np.column_stack([per_seed, per_seed @ weights])  # (seeds, tasks + score)
            drawn = seed_rng.integers(0, len(members), size=len(members))
            for column, key in enumerate(keys):
                images_only[group][key].append(per_seed[:, column].mean())
                with_seeds[group][key].append(per_seed[drawn, column].mean())
    return {"with_seeds": with_seeds, "images_only": images_only}


def _group_row(
    group: str,
    members: list[ScoredVariant],
    names: list[str],
    samples: dict[str, dict[str, dict[str, list[float]]]],
    baseline: str,
    base_mean: float,
) -> dict[str, Any]:
    """A group's accuracy columns: AUC and score means, sds and CIs, and its difference to the baseline."""
    with_seeds, images_only = samples["with_seeds"], samples["images_only"]
    first = members[0]
    scores = np.array([m.result["test_score"] for m in members])
    row: dict[str, Any] = {
        "variant": group,
        "mode": first.variant.mode,
        "trunk": first.variant.trunk,
        "seeds": " ".join(str(m.variant.seed) for m in members),
        "n_seeds": len(members),
        # Runs whose validation never left chance are kept in the means (they are what the
        # mode gave) but counted and named, never averaged in silently.
        "not_learned_seeds": " ".join(
            str(m.variant.seed) for m in members if not m.result.get("learned", True)
        ),
    }
    for task in names:
        values = np.array([m.result["test_auc"][task] for m in members])
        low, high = percentile_ci(np.array(with_seeds[group][task]))
        row |= {f"auc_{task}_mean": values.mean(), f"auc_{task}_sd": _sd(values)}
        row |= {f"auc_{task}_ci_low": low, f"auc_{task}_ci_high": high}
    row |= {"score_mean": scores.mean(), "score_sd": _sd(scores)}
    row |= _ci_columns("score_ci", with_seeds[group]["score"])
    row |= _ci_columns("score_ci_images", images_only[group]["score"])
    row["baseline"] = baseline
    row["diff_mean"] = float(scores.mean()) - base_mean
    for prefix, drawn in (("diff_ci", with_seeds), ("diff_ci_images", images_only)):
        row |= _ci_columns(prefix, np.array(drawn[group]["score"]) - np.array(drawn[baseline]["score"]))
    return row


def _cost_columns(members: list[ScoredVariant], budget: str, n_bootstrap: int) -> dict[str, Any]:
    """A group's cost columns: parameters, training images and seconds, inference time."""
    first = members[0]
    return {
        "params": first.result["params"],
        "budget": budget,
        "train_images_mean": float(np.mean([m.result["train_images"] for m in members])),
        "train_seconds_mean": float(np.mean([m.result["train_wall_seconds"] for m in members])),
        "train_images_per_s_mean": float(np.mean([m.result["train_images_per_s"] for m in members])),
        "infer_ms_per_image_median": float(np.median([m.result["infer_ms_per_image"] for m in members])),
        "tta_copies": first.result["tta_copies"],
        "n_test": first.result["n_test"],
        "bootstrap_resamples": n_bootstrap,
    }


def _ci_columns(prefix: str, samples) -> dict[str, float]:
    low, high = percentile_ci(np.asarray(samples, dtype=float))
    return {f"{prefix}_low": low, f"{prefix}_high": high}


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
    baseline = baseline_group([s.variant for s in scored])
    base_by_seed = {s.variant.seed: s for s in scored if s.variant.group == baseline}
    rows = []
    for item in scored:
        base = base_by_seed.get(item.variant.seed)
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
                "seed": item.variant.seed,
                **{f"auc_{t}": auc for t, auc in r["test_auc"].items()},
                "score": r["test_score"],
                **calibration,
                "params": r["params"],
                "train_seconds": r["train_wall_seconds"],
                "train_images_per_s": r["train_images_per_s"],
                "infer_ms_per_image": r["infer_ms_per_image"],
                "best_epochs": " ".join(f"{m}:{b['best_epoch']}/{b['epochs']}" for m, b in r["best"].items()),
                "learned": r.get("learned", True),
            }
        )
    return rows


FLOOR_MARGIN = 0.02  # a variant this far below the plain floor of its mode loses to it


def floor_findings(table: list[dict[str, Any]]) -> list[str]:
    """For every variant with a plain-floor variant of the same mode in the table: a sentence
    saying whether it beat the floor (mean test score), so a user sees at once when a preset
    loses to the simple baseline on their data."""
    floors = {row["mode"]: row for row in table if row["trunk"] == "plain"}
    findings = []
    for row in table:
        floor = floors.get(row["mode"])
        if floor is None or row is floor:
            continue
        gap = row["score_mean"] - floor["score_mean"]
        verdict = (
            f"LOSES to the plain floor {floor['variant']} by {-gap:.3f}: on this data the preset is worse "
            "than a plain CNN"
            if gap < -FLOOR_MARGIN
            else f"is within {FLOOR_MARGIN} of the plain floor {floor['variant']} or above it ({gap:+.3f})"
        )
        findings.append(f"Floor check: {row['variant']} {verdict}.")
    return findings
