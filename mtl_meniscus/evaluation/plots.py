"""PNG plots for people who would rather look than read CSV."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from mtl_meniscus.labels import DEFAULT_TASKS, TaskTable  # noqa: E402


def plot_training_curves(history: list[dict], path: Path) -> None:
    """Loss, per-task validation AUC with the monitored score, and learning rate per epoch."""
    members = list(dict.fromkeys(row["member"] for row in history))
    fig, axes = plt.subplots(len(members), 3, figsize=(13, 3.4 * len(members)), squeeze=False)
    for row_axes, member in zip(axes, members):
        rows = [r for r in history if r["member"] == member]
        epochs = [r["epoch"] for r in rows]
        loss_ax, auc_ax, lr_ax = row_axes
        loss_ax.plot(epochs, [r["train_loss"] for r in rows], label="train")
        loss_ax.plot(epochs, [r["val_loss"] for r in rows], label="validation")
        loss_ax.set_title(f"{member}: loss")
        tasks = [key[len("val_auc_") :] for key in rows[0] if key.startswith("val_auc_")]
        for task in tasks:
            values = [r.get(f"val_auc_{task}") for r in rows]
            if any(v is not None and v == v for v in values):
                auc_ax.plot(epochs, values, label=task)
        auc_ax.plot(epochs, [r["val_score"] for r in rows], "k--", label="monitored score")
        auc_ax.set_title(f"{member}: validation AUC")
        auc_ax.set_ylim(0.4, 1.01)
        lr_ax.semilogy(epochs, [r["lr"] for r in rows])
        lr_ax.set_title(f"{member}: learning rate")
        for ax in row_axes:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        loss_ax.legend()
        auc_ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_score_bars(table: list[dict], per_seed: list[dict], path: Path) -> None:
    """Seed-mean challenge score per variant with its bootstrap 95% CI, and each seed as a dot."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(table), 4))
    for x, row in enumerate(table):
        low, high = row["score_ci_low"], row["score_ci_high"]
        ax.bar(x, row["score_mean"], color=f"C{x}", alpha=0.6)
        error = [[row["score_mean"] - low], [high - row["score_mean"]]]
        ax.errorbar(x, row["score_mean"], yerr=error, color="k", capsize=6)
        seeds = [r["score"] for r in per_seed if r["group"] == row["variant"]]
        ax.plot([x] * len(seeds), seeds, "o", color="k", markersize=4)
    ax.set_xticks(range(len(table)), [row["variant"] for row in table], rotation=20, ha="right")
    ax.set_ylabel("challenge score (test)")
    ax.set_ylim(max(0.0, min(r["score_ci_low"] for r in table) - 0.05), 1.005)
    ax.set_title("score: seed mean, 95% bootstrap CI (seeds + images), seeds as dots", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc_overlay(scored, targets, path: Path, tasks: TaskTable = DEFAULT_TASKS) -> None:
    """Test ROC per task: one colour per variant, one line per seed."""
    from mtl_meniscus.evaluation.metrics import roc_points

    names = list(scored[0].probs)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
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
                ax.plot(fpr, tpr, color=colour, alpha=0.7, linewidth=1.2, label=group if first else None)
    for ax, task in zip(axes, names):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{task} (test)")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        if ax.get_legend_handles_labels()[0]:  # a task undefined on the test split has no curves
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
