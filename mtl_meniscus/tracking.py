"""Weights & Biases logging behind a small interface; 'disabled' makes every call a no-op."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .config import WandbConfig


def resolve_wandb_mode(config: WandbConfig) -> str:
    """The configured mode, else $WANDB_MODE, else offline ('dryrun' is the old name of offline)."""
    mode = config.mode or os.environ.get("WANDB_MODE") or "offline"
    return {"dryrun": "offline", "run": "online"}.get(mode, mode)


class RunLogger:
    """One wandb run writing into `run_dir/wandb` (offline: sync later with `wandb sync`)."""

    def __init__(self, config: WandbConfig, run_dir: Path, name: str, run_config: dict[str, Any]):
        self.mode = resolve_wandb_mode(config)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=config.project,
            name=name,
            id=run_id,
            resume="allow",  # a resumed training run continues the same wandb run
            dir=str(run_dir),
            mode=self.mode,
            group=config.group,
            job_type=config.job_type,
            config=run_config,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    @property
    def folder(self) -> Path | None:
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def log_roc(self, curves: dict[str, tuple[np.ndarray, np.ndarray]], key: str = "roc") -> None:
        """ROC points as one table (task, fpr, tpr), plottable in the wandb UI."""
        rows = [[task, float(f), float(t)] for task, (fpr, tpr) in curves.items() for f, t in zip(fpr, tpr)]
        self.log_table(key, ["task", "fpr", "tpr"], rows)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_image(self, key: str, path: Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def log_artifact(self, path: Path, name: str, kind: str = "model") -> None:
        if self.run is None:
            return
        import wandb

        artifact = wandb.Artifact(name=name, type=kind)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
