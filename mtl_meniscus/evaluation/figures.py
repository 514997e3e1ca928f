"""The figures of an evaluation (evaluate writes them beside metrics.json): ROC curves with bootstrap
bands and the operating point, precision-recall curves with the prevalence, confusion matrices,
reliability diagrams before and after calibration, and galleries of images. One panel per task,
in the style of plots.paper_style, PNG + PDF."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtl_meniscus.evaluation.metrics import task_resamples
from mtl_meniscus.evaluation.plots import COLUMN_WIDTH, PAGE_WIDTH, paper_style, plt, save_figure
from mtl_meniscus.labels import TaskTable

FPR_GRID = np.linspace(0.0, 1.0, 101)  # where the bootstrap band of a ROC curve is evaluated
SALIENCY_SHOWN_FROM = 0.3  # a gallery draws the saliency map where it is at least this (of its max, 1)
MIN_CLASS_FOR_CI = 5  # fewer positives (or negatives) than this: the interval is shown as degenerate


def degenerate_interval(n_positive: int, n_negative: int) -> str | None:
    """Why a bootstrap interval on these class sizes says little, or None when it is usable: with a
    handful of positives the resampled AUC takes a few values, and with one it is fixed."""
    fewest = min(n_positive, n_negative)
    if fewest >= MIN_CLASS_FOR_CI:
        return None
    which = "positive" if n_positive <= n_negative else "negative"
    if fewest == 0:
        return f"no {which} image: the AUC is undefined"
    return f"only {fewest} {which} image{'s' if fewest != 1 else ''}: the interval is not informative"


def _task_panels(names: Sequence[str], height: float = 2.3):
    width = min(PAGE_WIDTH, COLUMN_WIDTH * 0.8 * len(names) + 0.4)
    fig, axes = plt.subplots(1, len(names), figsize=(width, height), squeeze=False)
    return fig, axes[0]


def _task_rows(targets: np.ndarray, tasks: TaskTable, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, labels) where the task is scored."""
    rows = np.flatnonzero(tasks.scored_rows(targets, task))
    return rows, targets[rows, tasks.index(task)]


def roc_band(
    y: np.ndarray, p: np.ndarray, resamples: Sequence[np.ndarray], level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) sensitivity on FPR_GRID: percentiles over bootstrap resamples (row indices into
    y and p) of each resample's ROC curve, interpolated at the grid's false positive rates."""
    from sklearn.metrics import roc_curve

    curves = []
    for rows in resamples:
        if len(np.unique(y[rows])) < 2:
            continue
        fpr, tpr, _ = roc_curve(y[rows], p[rows])
        curves.append(np.interp(FPR_GRID, fpr, tpr))
    if not curves:
        return np.full_like(FPR_GRID, np.nan), np.full_like(FPR_GRID, np.nan)
    tail = (1 - level) / 2 * 100
    return np.percentile(curves, tail, axis=0), np.percentile(curves, 100 - tail, axis=0)


def roc_figure(
    targets: np.ndarray,
    probs: Mapping[str, np.ndarray],
    tasks: TaskTable,
    thresholds: Mapping[str, float],
    intervals: Mapping[str, Sequence[float]],
    path: Path,
    groups: Sequence[str] | None = None,
    n_resamples: int = 200,
    seed: int = 0,
) -> None:
    """Per task: the ROC curve, its 95% bootstrap band (patient-grouped, class-stratified resamples
    as for the AUC's interval), the operating point at the task's threshold, and chance. The title
    gives the AUC with `intervals[task]` (the evaluation's CI), or says that it is degenerate."""
    from sklearn.metrics import roc_auc_score, roc_curve

    names = [t for t in tasks.names if t in probs]
    draws = list(task_resamples(targets, n_resamples, seed, tuple(names), tasks, groups))
    with paper_style():
        fig, axes = _task_panels(names)
        for ax, task in zip(axes, names):
            rows, y = _task_rows(targets, tasks, task)
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
            ax.set(
                xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), aspect="equal"
            )
            if len(np.unique(y)) < 2:
                ax.set_title(f"{task}: undefined (one class)")
                continue
            p = probs[task][rows]
            position = {row: k for k, row in enumerate(rows)}  # resamples index all rows; p only scored ones
            low, high = roc_band(y, p, [np.array([position[r] for r in d[task]], int) for d in draws])
            fpr, tpr, _ = roc_curve(y, p)
            ax.fill_between(FPR_GRID, low, high, color="C0", alpha=0.2, linewidth=0, label="95% band")
            ax.plot(fpr, tpr, color="C0", label="ROC")
            cut = thresholds[task]
            ax.plot(
                np.mean(p[y == 0] >= cut),
                np.mean(p[y == 1] >= cut),
                "o",
                color="C3",
                markersize=4,
                label=f"threshold {cut:.2f}",
            )
            ci_low, ci_high = intervals[task]
            warning = degenerate_interval(int(np.sum(y == 1)), int(np.sum(y == 0)))
            interval = "CI degenerate" if warning else f"[{ci_low:.2f}, {ci_high:.2f}]"
            ax.set_title(
                f"{task}: AUC {roc_auc_score(y, p):.3f} {interval}\nn={len(y)} ({int(np.sum(y == 1))} pos)"
            )
            ax.legend(loc="lower right")
        fig.tight_layout()
        save_figure(fig, path)


def pr_figure(targets: np.ndarray, probs: Mapping[str, np.ndarray], tasks: TaskTable, path: Path) -> None:
    """Per task: precision against recall, average precision, and the prevalence (what a model
    that learned nothing scores): with few positives this shows what a ROC curve hides."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    names = [t for t in tasks.names if t in probs]
    with paper_style():
        fig, axes = _task_panels(names)
        for ax, task in zip(axes, names):
            rows, y = _task_rows(targets, tasks, task)
            ax.set(
                xlabel="recall (sensitivity)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), aspect="equal"
            )
            if len(np.unique(y)) < 2:
                ax.set_title(f"{task}: undefined (one class)")
                continue
            precision, recall, _ = precision_recall_curve(y, probs[task][rows])
            prevalence = float(np.mean(y == 1))
            ax.step(recall, precision, where="post", color="C0", label="model")
            ax.axhline(
                prevalence, color="grey", linestyle=":", linewidth=0.8, label=f"prevalence {prevalence:.2f}"
            )
            ap = average_precision_score(y, probs[task][rows])
            ax.set_title(f"{task}: average precision {ap:.3f}\nn={len(y)} ({int(np.sum(y == 1))} pos)")
            ax.legend(loc="lower left")
        fig.tight_layout()
        save_figure(fig, path)


def confusion_figure(per_task: Mapping[str, Mapping], tasks: TaskTable, path: Path) -> None:
    """Per task: the 2x2 confusion matrix at its threshold (metrics["tasks"][task] counts), rows the
    truth, columns the prediction, labelled with the task's own class names."""
    names = list(per_task)
    with paper_style():
        fig, axes = _task_panels(names, height=2.0)
        for ax, task in zip(axes, names):
            m = per_task[task]
            matrix = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
            classes = [tasks[task].class_name(0.0), tasks[task].class_name(1.0)]
            ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, matrix.max()))
            ax.grid(False)
            for (i, j), count in np.ndenumerate(matrix):
                dark = count > matrix.max() / 2
                ax.text(j, i, str(count), ha="center", va="center", color="white" if dark else "black")
            ax.set_xticks([0, 1], classes)
            ax.set_yticks([0, 1], classes)
            ax.set(xlabel="predicted", ylabel="true")
            ax.set_title(f"{task} at threshold {m['threshold']:.2f}")
        fig.tight_layout()
        save_figure(fig, path)


def reliability_figure(calibration: Mapping[str, Mapping], path: Path) -> None:
    """Per task: observed positive rate against mean probability per bin, with the bins' image
    counts below; `calibration[task]` holds "calibrated" and, when the run is calibrated,
    "uncalibrated" summaries (evaluation.calibration.calibration_summary)."""
    names = list(calibration)
    with paper_style():
        width = min(PAGE_WIDTH, COLUMN_WIDTH * 0.8 * len(names) + 0.4)
        fig, axes = plt.subplots(
            2,
            len(names),
            figsize=(width, 2.9),
            squeeze=False,
            gridspec_kw={"height_ratios": [3, 1]},
            sharex=True,
        )
        for k, task in enumerate(names):
            curve_ax, count_ax = axes[0][k], axes[1][k]
            curve_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
            title = [task]
            styles = (("uncalibrated", "C7", "s"), ("calibrated", "C0", "o"))
            shown = [(key, colour, marker) for key, colour, marker in styles if key in calibration[task]]
            for key, colour, marker in shown:
                summary = calibration[task][key]
                bins = [b for b in summary["bins"] if b["n"]]
                label = key if len(shown) > 1 else "model"
                curve_ax.plot(
                    [b["mean_probability"] for b in bins],
                    [b["positive_rate"] for b in bins],
                    marker=marker,
                    markersize=3,
                    color=colour,
                    label=label,
                )
                centres = [(b["low"] + b["high"]) / 2 for b in summary["bins"]]
                offset = (
                    -0.02 if key == "uncalibrated" and len(shown) > 1 else (0.02 if len(shown) > 1 else 0)
                )
                count_ax.bar(
                    np.array(centres) + offset,
                    [b["n"] for b in summary["bins"]],
                    width=0.04 if len(shown) > 1 else 0.08,
                    color=colour,
                )
                title.append(f"{label}: ECE {summary['ece']:.3f}, Brier {summary['brier']:.3f}")
            curve_ax.set(ylabel="observed positive rate", xlim=(0, 1), ylim=(0, 1.01))
            curve_ax.set_title("\n".join(title))
            curve_ax.legend(loc="upper left")
            count_ax.set(xlabel="predicted probability", ylabel="images")
            count_ax.set_yscale("symlog", linthresh=10)
        fig.tight_layout()
        save_figure(fig, path)


@dataclass(frozen=True)
class GalleryItem:
    """One image of a gallery: the slice, an optional saliency overlay (H, W) in [0, 1], an optional
    tear mask (H, W) drawn as an outline, and its caption."""

    image: np.ndarray
    caption: str
    saliency: np.ndarray | None = None
    mask: np.ndarray | None = None


def gallery_figure(items: Sequence[GalleryItem], title: str, path: Path, columns: int = 4) -> None:
    """A grid of slices with captions (probability and truth), the saliency map in red to yellow
    over the slice where it is high, and the tear mask's outline in green."""
    if not items:
        return
    rows = math.ceil(len(items) / columns)
    with paper_style():
        fig, axes = plt.subplots(rows, columns, figsize=(PAGE_WIDTH, 2.15 * rows + 0.2), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, item in zip(axes.flat, items):
            ax.imshow(item.image, cmap="gray")
            if item.saliency is not None:
                # only where the map is high, so the slice stays readable under it
                shown = np.ma.masked_less(item.saliency, SALIENCY_SHOWN_FROM)
                ax.imshow(shown, cmap="autumn_r", alpha=0.55, vmin=0, vmax=1)
            if item.mask is not None and np.any(item.mask):
                ax.contour(item.mask.astype(float), levels=[0.5], colors="lime", linewidths=0.6)
            ax.set_title(item.caption, fontsize=6)
        fig.suptitle(title, fontsize=7)
        fig.tight_layout()
        save_figure(fig, path)
