"""PNG plots for people who would rather look than read CSV."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from .labels import TASKS  # noqa: E402


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
        for task in TASKS:
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
