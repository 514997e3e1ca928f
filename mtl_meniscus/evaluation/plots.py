"""Figures for people who would rather look than read CSV, in one style readable at a journal's
column width: every figure is written as a PNG and, beside it, a vector PDF for a paper."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mtl_meniscus.io.outputs import atomic_write  # noqa: E402
from mtl_meniscus.labels import DEFAULT_TASKS, TaskTable  # noqa: E402

COLUMN_WIDTH = 3.5  # inches: one column of a two-column journal page
PAGE_WIDTH = 7.2  # inches: both columns
PAPER_STYLE = {
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "legend.fontsize": 6,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "lines.linewidth": 1.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "pdf.fonttype": 42,  # TrueType in the PDF: text stays text, editable by journals
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
}

# pyplot, rc_context and matplotlib's text rendering are not thread-safe: tune's parallel trials
# (threads) drawing their training curves at once failed at random (a mathtext ParseException on a
# log-scale tick label). The figure writers that threads reach draw one figure at a time.
FIGURE_LOCK = threading.Lock()


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """The one style of every figure the package writes."""
    with plt.rc_context(PAPER_STYLE):
        yield


def save_figure(fig, path: Path, dpi: int = 200) -> None:
    """`path` (.png) and the same name with .pdf beside it; closes the figure. Each is drawn in
    memory and written atomically: matplotlib writing to the file itself left a cut-short PDF under
    its name on a full disk, and raised its own errors (a zlib.error), not the disk's."""
    path = Path(path)
    try:
        for target, options in ((path, {"dpi": dpi}), (path.with_suffix(".pdf"), {})):
            drawn = io.BytesIO()
            fig.savefig(drawn, format=target.suffix[1:], **options)
            with atomic_write(target) as tmp:
                tmp.write_bytes(drawn.getvalue())
    finally:
        plt.close(fig)


def plot_training_curves(history: list[dict], path: Path, best: Mapping[str, dict] | None = None) -> None:
    """Loss, per-task validation AUC with the monitored score, and learning rate per epoch, one row
    per network. `best` ({network: trainer's best record}) adds the restored (best) epoch and the
    epoch it left chance; learning-rate cuts are dotted lines."""
    members = list(dict.fromkeys(row["member"] for row in history))
    best = best or {}
    with FIGURE_LOCK, paper_style():
        fig, axes = plt.subplots(len(members), 3, figsize=(PAGE_WIDTH, 2.0 * len(members)), squeeze=False)
        for row_axes, member in zip(axes, members):
            rows = [r for r in history if r["member"] == member]
            _plot_member_curves(row_axes, member, rows, best.get(member, {}))
        fig.tight_layout()
        save_figure(fig, path)


def _plot_member_curves(row_axes, member: str, rows: list[dict], best: dict) -> None:
    epochs = [r["epoch"] for r in rows]
    loss_ax, auc_ax, lr_ax = row_axes
    loss_ax.plot(epochs, [r["train_loss"] for r in rows], label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in rows], label="validation")
    loss_ax.set_title(f"{member}: loss")
    tasks = [key[len("val_auc_") :] for key in rows[0] if key.startswith("val_auc_")]
    plotted = 0
    for task in tasks:
        values = [r.get(f"val_auc_{task}") for r in rows]
        if any(v is not None and v == v for v in values):
            auc_ax.plot(epochs, values, label=task)
            plotted += 1
    # a network without a task (the cascade's segmentation network) monitors its mean Dice
    dice = [key for key in rows[0] if key.startswith("val_dice_")] if not plotted else []
    for key in dice:
        auc_ax.plot(epochs, [r.get(key) for r in rows], label=f"Dice {key.removeprefix('val_dice_')}")
    auc_ax.plot(epochs, [r["val_score"] for r in rows], "k--", label="monitored score")
    if best.get("left_chance_epoch"):  # decided per task (stopping.py): an epoch, not one score
        auc_ax.axvline(
            best["left_chance_epoch"], color="grey", linewidth=0.8, linestyle="-.", label="left chance"
        )
    auc_ax.set_title(f"{member}: validation {'Dice' if dice else 'AUC'}")
    auc_ax.set_ylim(0.0 if dice else 0.4, 1.01)  # Dice starts near 0, an AUC near chance
    lr_ax.semilogy(epochs, [r["lr"] for r in rows])
    lr_ax.set_title(f"{member}: learning rate")
    cuts = [e for e, before, after in zip(epochs[1:], rows, rows[1:]) if after["lr"] < before["lr"]]
    for ax in row_axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        for epoch in cuts:
            ax.axvline(epoch, color="grey", linewidth=0.6, linestyle=":")
        if best.get("best_epoch"):
            ax.axvline(
                best["best_epoch"], color="C3", linewidth=0.8, label="best epoch" if ax is auc_ax else None
            )
    loss_ax.legend()
    auc_ax.legend(loc="lower right")


def plot_score_bars(table: list[dict], per_seed: list[dict], path: Path) -> None:
    """Seed-mean challenge score per variant with its bootstrap 95% CI, and each seed as a dot."""
    with paper_style():
        fig, ax = plt.subplots(figsize=(min(PAGE_WIDTH, 1.2 + 0.7 * len(table)), 2.6))
        for x, row in enumerate(table):
            low, high = row["score_ci_low"], row["score_ci_high"]
            ax.bar(x, row["score_mean"], color=f"C{x}", alpha=0.6)
            error = [[row["score_mean"] - low], [high - row["score_mean"]]]
            ax.errorbar(x, row["score_mean"], yerr=error, color="k", capsize=4)
            seeds = [r["score"] for r in per_seed if r["group"] == row["variant"]]
            ax.plot([x] * len(seeds), seeds, "o", color="k", markersize=2.5)
        ax.set_xticks(range(len(table)), [row["variant"] for row in table], rotation=20, ha="right")
        ax.set_ylabel("challenge score (test)")
        ax.set_ylim(max(0.0, min(r["score_ci_low"] for r in table) - 0.05), 1.005)
        ax.set_title("seed mean, 95% bootstrap CI (seeds + images), seeds as dots")
        ax.grid(axis="x", visible=False)
        fig.tight_layout()
        save_figure(fig, path)


def plot_forest(table: list[dict], per_seed: list[dict], path: Path) -> None:
    """Forest plot of the difference in challenge score to the baseline: per variant, each seed's
    difference to the baseline run of the same seed (dots) and the pooled difference of the seed
    means with its 95% CI (seeds + images), against the line of no difference."""
    others = [row for row in table if row["variant"] != row["baseline"]]
    if not others:
        return
    baseline = others[0]["baseline"]
    differences = seed_differences(table, per_seed)
    with paper_style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 0.9 + 0.45 * len(others)))
        for y, row in enumerate(reversed(others)):
            deltas = differences[row["variant"]]
            ax.plot(
                deltas,
                [y + 0.18] * len(deltas),
                "o",
                color="grey",
                markersize=2.5,
                label="one seed" if y == 0 else None,
            )
            low, high = row["diff_ci_low"], row["diff_ci_high"]
            ax.errorbar(
                row["diff_mean"],
                y,
                xerr=[[row["diff_mean"] - low], [high - row["diff_mean"]]],
                fmt="D",
                color="C0",
                markersize=3.5,
                capsize=3,
                label="pooled, 95% CI" if y == 0 else None,
            )
        ax.axvline(0.0, color="k", linewidth=0.8)
        ax.set_yticks(range(len(others)), [row["variant"] for row in reversed(others)])
        ax.set_ylim(-0.6, len(others) - 0.4)
        ax.set_xlabel(f"challenge score minus {baseline} (test)")
        ax.grid(axis="y", visible=False)
        ax.legend(loc="best")
        fig.tight_layout()
        save_figure(fig, path)


def plot_learning_curves(table: list[dict], path: Path) -> bool:
    """Test score (seed mean with its 95% interval over seeds and images) against the number of
    training images, one line per mode and trunk: where a shared representation should pay off
    (less data) is where the lines part. False (nothing written) with one training share only."""
    fractions = {row["train_fraction"] for row in table}
    if len(fractions) < 2:
        return False
    lines: dict[str, list[dict]] = {}
    for row in table:
        lines.setdefault(f"{row['mode']}-{row['trunk']}", []).append(row)
    with paper_style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.6))
        for k, (name, rows) in enumerate(lines.items()):
            rows = sorted(rows, key=lambda r: r["train_fraction"])
            x = [r["n_train"] or r["train_fraction"] for r in rows]
            y = [r["score_mean"] for r in rows]
            low = [r["score_mean"] - r["score_ci_low"] for r in rows]
            high = [r["score_ci_high"] - r["score_mean"] for r in rows]
            ax.errorbar(
                x, y, yerr=[low, high], marker="o", markersize=3, capsize=3, color=f"C{k}", label=name
            )
        ax.set_xscale("log")
        ax.set_xlabel("training images (share of the training split)")
        ax.set_ylabel("challenge score (test)")
        ax.set_title("learning curves: seed mean, 95% CI (seeds + images)")
        ax.legend(loc="lower right")
        fig.tight_layout()
        save_figure(fig, path)
    return True


def seed_differences(table: list[dict], per_seed: list[dict]) -> dict[str, list[float]]:
    """{variant: [score of seed s - the baseline's score of seed s, for each seed both have]}."""
    differences = {}
    for row in table:
        base = {r["seed"]: r["score"] for r in per_seed if r["group"] == row["baseline"]}
        seeds = [r for r in per_seed if r["group"] == row["variant"] and r["seed"] in base]
        differences[row["variant"]] = [r["score"] - base[r["seed"]] for r in seeds]
    return differences


def plot_roc_overlay(scored, targets, path: Path, tasks: TaskTable = DEFAULT_TASKS) -> None:
    """Test ROC per task: one colour per variant, one line per seed."""
    from mtl_meniscus.evaluation.metrics import roc_points

    names = list(scored[0].probs)
    with paper_style():
        fig, axes = plt.subplots(
            1, len(names), figsize=(min(PAGE_WIDTH, 2.4 * len(names)), 2.5), squeeze=False
        )
        axes = axes[0]
        colours: dict[str, str] = {}
        for item in scored:
            group = item.variant.group
            first = group not in colours  # label each variant once
            colour = colours.setdefault(group, f"C{len(colours)}")
            curves = roc_points(targets, item.probs, tasks)
            for ax, task in zip(axes, names):
                if task in curves:
                    fpr, tpr = curves[task]
                    ax.plot(fpr, tpr, color=colour, alpha=0.7, linewidth=0.8, label=group if first else None)
        for ax, task in zip(axes, names):
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
            ax.set(title=f"{task} (test)", xlabel="1 - specificity", ylabel="sensitivity", aspect="equal")
            if ax.get_legend_handles_labels()[0]:  # a task undefined on the test split has no curves
                ax.legend(loc="lower right")
        fig.tight_layout()
        save_figure(fig, path)
