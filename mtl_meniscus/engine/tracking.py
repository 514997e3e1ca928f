"""Weights & Biases logging behind a small interface; 'disabled' makes every call a no-op."""

from __future__ import annotations

import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mtl_meniscus.config import WandbConfig
from mtl_meniscus.errors import MeniscusError

MODEL_ARTIFACT_PREFIX = "model-"  # + the run folder's name: the artifact train logs best.pt as


# $WANDB_MODE's values that we support, in any case; 'dryrun' and 'run' are wandb's old names
ENV_MODES = {
    "online": "online",
    "offline": "offline",
    "disabled": "disabled",
    "dryrun": "offline",
    "run": "online",
}


def resolve_wandb_mode(config: WandbConfig) -> str:
    """The configured mode, else $WANDB_MODE, else offline. A $WANDB_MODE that is not one of
    ENV_MODES is refused even beside a configured mode: wandb reads it itself and stops on it with
    a validation error. Commands call this before any work, so that it stops them before they write.
    Disabled, wandb is never started, and its variable does not matter."""
    if config.mode == "disabled":
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").strip()
    if env and env.lower() not in ENV_MODES:
        raise MeniscusError(
            f"$WANDB_MODE: unknown wandb mode {env!r} (allowed, in any case: online, offline, disabled, "
            "and the old names dryrun and run); set one of them, or unset it"
        )
    return config.mode or ENV_MODES.get(env.lower(), "offline")


def _respell_env_mode() -> None:
    """$WANDB_MODE as wandb spells it: wandb reads it itself, also beside mode=, and refuses the
    spellings resolve_wandb_mode accepts ('OFFLINE', ' offline', an empty value). The value means
    the same after, to this run and every later one."""
    if "WANDB_MODE" in os.environ:
        respelt = ENV_MODES.get(os.environ["WANDB_MODE"].strip().lower())
        if respelt:
            os.environ["WANDB_MODE"] = respelt
        else:  # empty: unset, as resolve_wandb_mode read it
            del os.environ["WANDB_MODE"]


# How long wandb.init waits for the server, unless $WANDB_INIT_TIMEOUT says: wandb's own 90 s (it
# then waits 10 s more) kept a run without a network silent for 100 s, Ctrl-C ignored meanwhile.
INIT_TIMEOUT_SECONDS = 20


def _init_timeout() -> dict[str, float]:
    return {} if os.environ.get("WANDB_INIT_TIMEOUT", "").strip() else {"init_timeout": INIT_TIMEOUT_SECONDS}


class RunLogger:
    """One wandb run writing into `run_dir/wandb` (offline: sync later with `wandb sync`), its id in
    `run_dir/wandb_id.txt`. A new run each time, but with resume=True (a resumed training): then
    the run of the id there, if any, continues."""

    def __init__(
        self, config: WandbConfig, run_dir: Path, name: str, run_config: dict[str, Any], resume: bool = False
    ):
        self.mode = resolve_wandb_mode(config)
        self.run = None
        self.steps_held = 0  # restored steps the wandb run holds already: log_restored skips them
        if self.mode == "disabled":
            return
        import wandb

        _respell_env_mode()
        id_file = run_dir / "wandb_id.txt"
        # only a resumed training reads the id back: evaluate writes into the same folder each time,
        # and an evaluation logged into the last one's run replaced its numbers
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            self.run = wandb.init(
                project=config.project,
                name=name,
                id=run_id,
                # online the server's run continues; offline, a new folder of the same id (older_folders)
                resume="allow" if resume else None,
                dir=str(run_dir),
                mode=self.mode,
                group=config.group,
                job_type=config.job_type,
                config=run_config,
                settings=wandb.Settings(console="off", x_disable_stats=True, **_init_timeout()),
            )
        except Exception as err:  # wandb's errors come in many types (no API key, no network, ...)
            if self.mode != "online":
                raise
            reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            raise MeniscusError(
                f"wandb online: the run could not start ({type(err).__name__}: {reason}); check "
                "WANDB_API_KEY and the network, or log offline (--wandb offline, then wandb sync); "
                f"$WANDB_INIT_TIMEOUT sets how long to wait for the server (now {INIT_TIMEOUT_SECONDS} s "
                "unless set)"
            ) from None
        # online, a resumed run continues after the steps the server received before the kill;
        # offline, wandb cannot continue a run: the new folder starts at step 0 and holds none
        self.steps_held = self.run.starting_step

    @property
    def folder(self) -> Path | None:
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_restored(self, metrics: dict[str, Any]) -> None:
        """A step of a resumed training logged again, in the order it was first logged, unless the
        wandb run holds it already (the first `steps_held`), so that the run holds the whole
        history once, at monotonic steps, before the training continues."""
        if self.run is None:
            return
        if self.steps_held > 0:
            self.steps_held -= 1
        else:
            self.run.log(metrics)

    def older_folders(self) -> list[Path]:
        """The offline folders of this run's id that earlier starts wrote (a training before its
        --resume): each holds part of the history this run logs whole."""
        if self.run is None or self.mode != "offline":
            return []
        return [
            folder for folder in offline_folders(self.folder.parent, self.run.id) if folder != self.folder
        ]

    def where(self) -> str:
        """'wandb (MODE): FOLDER', and for an offline run what to upload: '(upload: wandb sync
        FOLDER)', after a --resume naming the older folders of the run's id, not to be synced."""
        line = f"wandb ({self.mode}): {self.folder}"
        if self.mode != "offline":
            return line
        older = self.older_folders()
        if not older:
            return f"{line}  (upload: wandb sync {self.folder})"
        names = ", ".join(folder.name for folder in older)
        these = f"the older folders of this run id, {names}, written before --resume, hold"
        if len(older) == 1:
            these = f"the older folder of this run id, {names}, written before --resume, holds"
        whole = f"wandb sync {self.folder} alone: it holds the whole history"
        return f"{line}  (upload: {whole}; {these} only part of it)"

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def log_charts(
        self, task: str, y_true: np.ndarray, y_prob: np.ndarray, threshold: float, classes: list[str]
    ) -> None:
        """wandb's own ROC, precision-recall and confusion-matrix charts of one task ("<task>/roc",
        "<task>/pr", "<task>/confusion"); `classes` names 0 and 1, the confusion is at `threshold`.
        The curves' points are computed here (wandb's roc_curve helper would need pandas) and drawn
        with wandb's area-under-curve chart, the one its own helpers use."""
        if self.run is None or len(np.unique(y_true)) < 2:  # a curve needs both classes
            return
        import wandb
        from sklearn.metrics import precision_recall_curve, roc_curve

        fpr, tpr, _ = roc_curve(y_true, y_prob)
        precision, recall, _ = precision_recall_curve(y_true, y_prob)
        curves = {
            "roc": (fpr, tpr, "1 - specificity", "sensitivity", "ROC"),
            "pr": (recall, precision, "recall", "precision", "precision-recall"),
        }
        charts = {}
        for key, (x, y, x_title, y_title, title) in curves.items():
            table = wandb.Table(
                columns=["class", "x", "y"], data=[[classes[1], float(a), float(b)] for a, b in zip(x, y)]
            )
            charts[f"{task}/{key}"] = wandb.plot_table(
                "wandb/area-under-curve/v0",
                table,
                {"x": "x", "y": "y", "class": "class"},
                {"title": f"{task}: {title}", "x-axis-title": x_title, "y-axis-title": y_title},
            )
        charts[f"{task}/confusion"] = wandb.plot.confusion_matrix(
            y_true=[int(v) for v in y_true],
            preds=[int(p >= threshold) for p in y_prob],
            class_names=classes,
            title=f"{task}: confusion at {threshold:.2f}",
        )
        self.run.log(charts)

    def log_table(
        self, key: str, columns: list[str], rows: list[list[Any]], image_columns: tuple[str, ...] = ()
    ) -> None:
        """A table; values of `image_columns` are PNG paths (or None) shown as images."""
        if self.run is not None:
            import wandb

            at = [columns.index(c) for c in image_columns]
            rows = [
                [wandb.Image(str(v)) if k in at and v is not None else v for k, v in enumerate(row)]
                for row in rows
            ]
            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def define_step_axes(self, prefixes: list[str]) -> None:
        """Each prefix (a network of the cascade, or the shared model) plots against its own
        '<prefix>/epoch', so the three networks trained one after the other share an x-axis."""
        if self.run is not None:
            for prefix in prefixes:
                self.run.define_metric(f"{prefix}/epoch")
                self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/epoch")

    def record_model(self, checkpoint: Path, model_run: Path | None) -> None:
        """Which trained model this run scores. Online, a lineage edge to the model artifact the
        training run logged (`model-<run folder name>`); offline wandb refuses use_artifact, so the
        run's config names the checkpoint and the training run's wandb id either way."""
        if self.run is None:
            return
        id_file = model_run / "wandb_id.txt" if model_run else None
        self.run.config.update(
            {
                "model_checkpoint": str(checkpoint),
                "model_run": str(model_run) if model_run else None,
                "model_wandb_id": id_file.read_text().strip() if id_file and id_file.is_file() else None,
            },
            allow_val_change=True,
        )
        if self.mode == "online" and model_run is not None:
            try:
                self.run.use_artifact(f"{MODEL_ARTIFACT_PREFIX}{model_run.name}:latest")
            except (
                Exception
            ) as err:  # e.g. trained offline or in another project: lineage stays in the config
                warnings.warn(f"wandb: no model artifact to link ({type(err).__name__}: {err})", stacklevel=2)

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


def offline_folders(parent: Path, run_id: str) -> list[Path]:
    """wandb's offline folders of one run id in `parent`, oldest first. wandb names them
    offline-run-<YYYYmmdd_HHMMSS>-<id>, with -1, -2, ... appended when another start of the
    id falls in the same second (a resume right after a kill)."""
    name = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    starts = {}
    for folder in parent.glob(f"offline-run-*-{run_id}*"):
        match = name.fullmatch(folder.name)
        if match:
            starts[folder] = (match[1], int(match[2] or 0))
    return sorted(starts, key=starts.get)
