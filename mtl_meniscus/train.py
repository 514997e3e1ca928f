"""Training: the shared-trunk model, or the reference cascade's three networks one after another.

A run folder holds config.yaml, splits.csv, exclusions.csv, history.csv, best.pt/last.pt,
metrics.json and training_curves.png. In separate mode each network ("member") trains in
members/<task>/ on its own data (fissure: all images; orientation, position: tears only)
with its own learning-rate schedule and early stopping, as in the reference method; the
run's best.pt is the assembled cascade.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from .checkpoint import atomic_torch_save, load_checkpoint, model_payload
from .config import Config, config_from_dict, read_config_file
from .data import PreparedData, prepare_data, resolve_data_dir
from .dataset import EpochBatchSampler, ExamDataset, SliceDataset, training_batches
from .distributed import SINGLE, Distributed, check_batch
from .distributed import start as start_processes
from .distributed import stop as stop_processes
from .errors import MeniscusError
from .inference import predict_probs
from .labels import DEFAULT_TASKS, TaskTable
from .losses import TaskWeighting, build_weighting, task_losses
from .metrics import bootstrap_cis, challenge_score, monitor_score, monitor_weights, task_aucs
from .models import SeparateCascade, build_shared, build_single_task, parameter_groups, set_train_mode
from .outputs import atomic_write, write_text_atomic
from .plots import plot_training_curves
from .runlock import RunLock
from .runtime import Runtime, resolve_runtime
from .stopping import CHANCE, EarlyStopping, chance_sd, learning_score
from .tracking import MODEL_ARTIFACT_PREFIX, RunLogger

EpochCallback = Callable[[str, int], None]  # (member, epoch) after each finished epoch


@dataclass
class Member:
    """One network to train: its name, tasks, folder and the images it trains and validates on."""

    name: str
    tasks: tuple[str, ...]
    folder: Path
    train_indices: np.ndarray
    val_indices: np.ndarray

    def build(self, config: Config) -> nn.Module:
        if self.name == "shared":
            return build_shared(config.model)
        return build_single_task(config.model, self.name)


def default_run_dir(mode: str) -> Path:
    return Path("runs") / f"{mode}-{datetime.now():%Y%m%d-%H%M%S}"


def plan_members(config: Config, data: PreparedData, run_dir: Path) -> list[Member]:
    """Shared: one member on all images. Separate: fissure on all images, the others on tears."""
    train, val = data.indices("train"), data.indices("val")
    if config.model.name == "shared":
        return [Member("shared", config.model.tasks, run_dir, train, val)]
    members = []
    for task in config.model.tasks:
        rows = data.tasks.scored_rows(data.targets, task)  # all images for fissure, true tears for the others
        members.append(Member(task, (task,), run_dir / "members" / task, train[rows[train]], val[rows[val]]))
    return members


def check_members(members: list[Member], data: PreparedData) -> list[str]:
    """Refuse a member with no training image, naming the split and the member, before anything
    trains; return warnings for members without validation images and for an empty test split."""
    by_column = bool(data.records) and all(r.split for r in data.records)
    origin = "the 'split' column of labels.csv" if by_column else "the automatic split (data.split_fractions)"
    counts = ", ".join(f"{name} {len(data.indices(name))}" for name in ("train", "val", "test"))
    warnings = []
    for member in members:
        # a gated task's network trains on the rows where its gate is positive (true tears)
        only_tears = member.name in data.tasks and data.tasks[member.name].gated_by is not None
        if not len(member.train_indices):
            if only_tears and len(data.indices("train")):
                raise MeniscusError(
                    f"the {member.name} network has no training image: separate mode trains it on the "
                    f"true tears of the train split, and the train split has none ({data.split_summary()})"
                )
            raise MeniscusError(
                f"the train split is empty: {origin} puts none of the {len(data.records)} kept images "
                f"there ({counts}); nothing to train on"
            )
        if not len(member.val_indices):
            what = (
                "the val split has no tear"
                if only_tears and len(data.indices("val"))
                else "the val split is empty"
            )
            warnings.append(
                f"[{member.name}] no validation image ({what}): the run has no validation score to pick "
                "its best epoch or to stop early"
            )
    if not len(data.indices("test")):
        warnings.append(f"the test split is empty ({counts}): the run ends without test metrics")
    return warnings


class TrainingDivergedError(MeniscusError):
    """The loss or the network's outputs stopped being finite numbers."""


@dataclass
class TrainingState:
    """Everything a network's training needs to continue after a kill, saved in last.pt as one dict.

    Each field is saved and restored the same way: through state_dict()/load_state_dict() where it
    has them (model, weighting, optimizer, early stopping), as a plain value otherwise. The torch
    RNG goes with it so that a resumed run draws the same dropout masks as an uninterrupted one.
    """

    model: nn.Module
    weighting: TaskWeighting
    optimizer: torch.optim.Optimizer
    stopping: EarlyStopping
    epoch: int = 0  # epochs finished
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    train_seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        saved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            saved[f.name] = value.state_dict() if hasattr(value, "state_dict") else value
        saved["torch_rng"] = torch.get_rng_state()
        return saved

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "load_state_dict"):
                value.load_state_dict(saved[f.name])
            else:
                setattr(self, f.name, saved[f.name])
        torch.set_rng_state(saved["torch_rng"])


class MemberTrainer:
    """Epoch loop of one network with LR-on-plateau, early stopping and resumable state."""

    def __init__(
        self,
        member: Member,
        config: Config,
        data: PreparedData,
        runtime: Runtime,
        logger: RunLogger,
        console: Console,
        processes: Distributed = SINGLE,
    ):
        self.member, self.config, self.data, self.runtime = member, config, data, runtime
        self.logger, self.console, self.processes = logger, console, processes
        train = config.train
        torch.manual_seed(train.seed)
        model = runtime.prepare_model(member.build(config))
        weighting = build_weighting(train.weighting, member.tasks, train.task_weights).to(runtime.device)
        groups = parameter_groups(model, train.lr, train.backbone_lr_factor, config.model.freeze_backbone)
        groups.append({"params": list(weighting.parameters()), "lr": train.lr})
        self.state = TrainingState(
            model=model,
            weighting=weighting,
            optimizer=torch.optim.Adam(groups, lr=train.lr),
            stopping=EarlyStopping(
                patience=train.early_stopping_patience,
                lr_patience=train.lr_patience,
                start_score=member_start_score(
                    data.targets[member.val_indices], member.tasks, train.left_chance_max, data.tasks
                ),
            ),
        )
        kind = ExamDataset if data.exams else SliceDataset
        self.dataset = kind(data.images, data.targets, config.preprocess.edge_filter, config.augment)
        self.sampler = EpochBatchSampler(
            member.train_indices,
            train.steps_per_epoch,
            train.batch_size,
            train.seed,
            rank=processes.rank,
            world=processes.world,
        )
        self.net = processes.wrap(self.state.model, runtime.device)  # DDP under torchrun

    def save_last(self) -> None:
        if not self.processes.main:
            return
        payload = model_payload(
            self.state.model,
            self.config,
            {"member": self.member.name, "training_state": self.state.state_dict()},
        )
        atomic_torch_save(payload, self.member.folder / "last.pt")

    def save_best(self) -> None:
        if not self.processes.main:
            return
        extra = {
            "member": self.member.name,
            "best_epoch": self.state.stopping.best_epoch,
            "best_score": self.state.stopping.best_score,
        }
        payload = model_payload(self.state.model, self._member_config(), extra)
        atomic_torch_save(payload, self.member.folder / "best.pt")

    def _member_config(self) -> Config:
        """Config of this member alone (a single-task network is a one-task 'shared' model)."""
        config = config_from_dict(self.config.to_dict(), source="run config")
        config.model = config.model.model_copy(update={"name": "shared", "tasks": self.member.tasks})
        if self.member.name == "fissure" and self.config.model.name == "separate":
            config.model = config.model.model_copy(update={"kernels": self.config.model.fissure_kernels})
        return config

    def try_resume(self) -> bool:
        last = self.member.folder / "last.pt"
        if not last.is_file():
            return False
        payload = load_checkpoint(last)
        if not isinstance(payload.get("training_state"), dict):
            raise MeniscusError(
                f"{last}: holds no training state, so the run cannot resume from it "
                "(a last.pt is written by train after each epoch; best.pt files cannot be resumed)"
            )
        try:
            self.state.load_state_dict(payload["training_state"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            reason = str(err).splitlines()[0] if str(err) else ""
            raise MeniscusError(
                f"{last}: damaged training state, cannot resume ({type(err).__name__}: {reason[:300]})"
            ) from None
        return True

    def diverged(self, what: str) -> TrainingDivergedError:
        """The error that stops a run whose loss or outputs are no longer finite; last.pt is kept."""
        lr = self.config.train.lr
        kept = (
            f"last.pt keeps epoch {self.state.epoch - 1}, the last finished one"
            if self.state.epoch > 1
            else "no epoch had finished, so there is no last.pt"
        )
        return TrainingDivergedError(
            f"[{self.member.name}] training diverged in epoch {self.state.epoch}: {what}. {kept}. Try a lower "
            f"learning rate in a new run (--lr {lr / 10:g}; this run used {lr:g}); --resume would "
            "repeat the same steps"
        )

    # ---- loop --------------------------------------------------------------------------------
    def fit(self, on_epoch_end: EpochCallback | None = None) -> None:
        train = self.config.train
        while not self.state.finished:
            self.state.epoch += 1
            start = time.perf_counter()
            train_loss, task_weights = self._train_epoch()
            self.state.train_seconds += time.perf_counter() - start
            val = self._validate()
            score = val["score"]
            lr = self.state.optimizer.param_groups[0]["lr"]
            improved = self.state.stopping.update(self.state.epoch, score)
            # A cut that falls due at the floor of the learning rate ends the run instead.
            lr_exhausted = lr <= train.min_lr * 1.0001 and self.state.stopping.lr_cut_due
            if improved:
                self.save_best()
            elif self.state.stopping.lr_cut_due and not lr_exhausted:
                self._cut_lr()
            row = {
                "member": self.member.name,
                "epoch": self.state.epoch,
                "train_loss": train_loss,
                "val_loss": val["loss"],
                **{f"val_auc_{t}": val["auc"].get(t, float("nan")) for t in self.data.tasks.names},
                "val_score": score,
                "improved": int(improved),
                "lr": lr,
                **{f"weight_{t}": task_weights.get(t, float("nan")) for t in self.data.tasks.names},
                "seconds": time.perf_counter() - start,
            }
            self.state.history.append(row)
            self.state.finished = (
                self.state.epoch >= train.max_epochs or self.state.stopping.should_stop or lr_exhausted
            )
            if self.state.stopping.best_score is None and self.state.finished:
                self.save_best()  # never a defined score (e.g. one-class validation): keep the last weights
            self.save_last()
            self._report(row, improved)
            if on_epoch_end is not None:
                on_epoch_end(self.member.name, self.state.epoch)
        self.processes.barrier()  # rank 0 has written best.pt
        best = load_checkpoint(self.member.folder / "best.pt")
        self.state.model.load_state_dict(best["state_dict"])

    def _cut_lr(self) -> None:
        """Multiply every group's learning rate by lr_factor, down to min_lr."""
        train = self.config.train
        for group in self.state.optimizer.param_groups:
            group["lr"] = max(group["lr"] * train.lr_factor, train.min_lr)
        self.state.stopping.lr_was_cut()

    @property
    def best(self) -> dict[str, Any]:
        """The restored epoch, as every report gives it, and whether the network learned at all."""
        stopping = self.state.stopping
        return {
            "best_epoch": stopping.best_epoch,
            "val_score": stopping.best_score,
            "epochs": self.state.epoch,
            "learned": stopping.started
            if stopping.best_score is not None
            else None,  # None: no score to tell
            "left_chance_epoch": stopping.started_epoch or None,
            "left_chance_score": stopping.start_score,
        }

    @property
    def late_start(self) -> str | None:
        """A warning when the network left chance only in the last epochs before the budget ended it."""
        return late_start_warning(
            self.member.name,
            self.state.stopping.started_epoch or None,
            self.state.epoch,
            self.config.train.max_epochs,
        )

    @property
    def warning(self) -> str | None:
        """'did not learn: ...' when validation never left chance, else None."""
        stopping = self.state.stopping
        best = stopping.best_score
        if stopping.started or best is None:  # None: no defined validation score, warned before training
            return None
        return (
            f"[{self.member.name}] did not learn: validation score {best:.2f}, "
            f"chance is {CHANCE:.2f} (a score of {stopping.start_score:.2f} would have shown learning); "
            "check the labels, or train longer or with another learning rate"
        )

    def _train_epoch(self) -> tuple[float, dict[str, float]]:
        """One epoch of steps: (mean training loss, {task: mean weight the task weighting applied})."""
        train = self.config.train
        self.sampler.set_epoch(self.state.epoch)
        loader = training_batches(
            self.dataset,
            self.sampler,
            train.num_workers,
            channels_last=self.runtime.channels_last,
            pin_memory=self.runtime.device.type == "cuda",
        )
        set_train_mode(self.state.model, self.config.model.freeze_backbone)
        total, steps = 0.0, 0
        weight_sums: dict[str, float] = {}
        with Progress(
            TextColumn(f"[bold]{self.member.name}[/] epoch {self.state.epoch}/{train.max_epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        ) as progress:
            bar = progress.add_task("train", total=len(self.sampler), loss=float("nan"))
            for inputs, y in loader:
                # x (B, C, H, W); for exams (N, C, H, W), every slice of the B exams, and lengths (B,)
                x, *exam_lengths = inputs
                x, y = self.runtime.prepare_input(x), y.to(self.runtime.device)  # y (B, T)
                with self.runtime.autocast():
                    outputs = self.net(x, *(t.to(self.runtime.device) for t in exam_lengths))
                tasks = self.data.tasks
                denominators = self.processes.loss_denominators(y, list(outputs), tasks)  # torchrun only
                losses = task_losses(outputs, y, train.pos_weights, tasks, denominators)
                self.state.optimizer.zero_grad(set_to_none=True)
                loss, weights = self.state.weighting.backward(losses)
                self.processes.average_gradients(self.state.weighting.parameters())
                loss = self.processes.mean(loss)  # NaN on every process if one diverged
                if not torch.isfinite(loss):  # before the step: the weights stay as they were
                    raise self.diverged(f"the training loss is {float(loss)} at step {steps + 1}")
                self.state.optimizer.step()
                total += float(loss)
                for task, weight in weights.items():
                    weight_sums[task] = weight_sums.get(task, 0.0) + weight
                steps += 1
                progress.update(bar, advance=1, loss=total / steps)
        return total / max(steps, 1), {task: w / max(steps, 1) for task, w in weight_sums.items()}

    def _validate(self) -> dict[str, Any]:
        indices = self.member.val_indices
        targets = self.data.targets[indices]
        # each process predicts its share of the images; all then hold every probability
        shards = self.processes.shards(len(indices))
        mine = [self.data.images[indices[k]] for k in shards[self.processes.rank]]
        local = predict_probs(
            self.state.model,
            mine,
            self.config.preprocess.edge_filter,
            self.runtime,
            self.config.train.eval_batch_size,
        )
        probs = self.processes.gather_probs(local, shards)
        if not all(np.isfinite(p).all() for p in probs.values()):
            raise self.diverged("the network's outputs on the validation images are not finite numbers")
        tasks = self.data.tasks
        aucs = task_aucs(targets, probs, tasks)
        return {
            "auc": aucs,
            "score": monitor_score(aucs, tasks),
            "loss": _masked_log_loss(targets, probs, tasks),
        }

    def _report(self, row: dict[str, Any], improved: bool) -> None:
        aucs = " ".join(
            f"{t} {row[f'val_auc_{t}']:.3f}"
            for t in self.data.tasks.names
            if not math.isnan(row[f"val_auc_{t}"])
        )
        star = " *" if improved else ""
        self.console.print(
            f"[{self.member.name}] epoch {row['epoch']:>2}  loss {row['train_loss']:.4f}  "
            f"val loss {row['val_loss']:.4f}  AUC {aucs}  score {row['val_score']:.4f}{star}  "
            f"lr {row['lr']:.2g}  {row['seconds']:.1f}s",
            highlight=False,
            markup=False,
        )
        self.logger.log({f"{self.member.name}/{k}": v for k, v in row.items() if k != "member"})


LATE_START_EPOCHS = 3  # leaving chance within this many epochs of the budget's end counts as late


def late_start_warning(name: str, left_chance_epoch: int | None, epochs: int, max_epochs: int) -> str | None:
    """'[name] left chance only at epoch 20 of 20 ...' when the budget (max_epochs) ended a network
    that had only just started to learn; None otherwise (also when it never left chance: that is
    the did-not-learn warning)."""
    if (
        left_chance_epoch is None
        or epochs < max_epochs
        or left_chance_epoch <= max_epochs - LATE_START_EPOCHS
    ):
        return None
    return (
        f"[{name}] left chance only at epoch {left_chance_epoch} of {max_epochs}: it had just started to learn "
        "when the budget ended it, so its scores understate what it can learn; train longer (--max-epochs)"
    )


def tasks_without_labels(names: tuple[str, ...], data: PreparedData) -> dict[str, int]:
    """{gated task: the train split's gate positives (tears)} for the tasks whose label is unknown on
    every one of them (MRNet, fastMRI+): nothing to learn from, so the run leaves them out rather
    than predict with an untrained head. A train split without any tear is check_members' error."""
    train, tasks = data.indices("train"), data.tasks
    out = {}
    for name in names:
        gate = tasks[name].gated_by
        if gate is None:
            continue
        gated = int(np.sum(data.targets[train, tasks.index(gate)] == 1))
        if gated and not tasks.scored_rows(data.targets[train], name).any():
            out[name] = gated
    return out


def member_start_score(
    val_targets: np.ndarray, names: tuple[str, ...], cap: float, tasks: TaskTable = DEFAULT_TASKS
) -> float:
    """Validation score at which this network counts as having left chance (see stopping.py)."""
    weights = monitor_weights(names, tasks)  # those of the score it monitors
    spreads = []
    for name in names:
        y = val_targets[tasks.scored_rows(val_targets, name), tasks.index(name)]
        spreads.append((weights[name], chance_sd(int(np.sum(y == 1)), int(np.sum(y == 0)))))
    return learning_score(spreads, cap)


def _masked_log_loss(targets: np.ndarray, probs: dict[str, np.ndarray], tasks: TaskTable) -> float:
    """Validation loss with the training loss's masking: sum over tasks of the mean BCE."""
    total = 0.0
    for task, p in probs.items():
        rows = tasks.scored_rows(targets, task)
        if rows.any():
            y = targets[rows, tasks.index(task)]
            q = np.clip(p[rows], 1e-7, 1 - 1e-7)
            total += float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    return total


def train_run(
    config: Config | None,
    run_dir: Path,
    resume: bool = False,
    console: Console | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run end to end and return its metrics (also in metrics.json).

    With resume=True the run's own config.yaml is used and `config` is ignored. The run folder
    is locked while training: a second process on the same folder is refused.
    """
    run_dir = Path(run_dir)
    if resume and not (run_dir / "config.yaml").is_file():
        raise MeniscusError(f"cannot resume {run_dir}: no config.yaml there (is it a run folder?)")
    if resume:
        config = _load_run_config(run_dir)
    device_type = resolve_runtime(config.train.precision, config.train.device).device.type
    processes = start_processes(device_type)  # one process unless started by torchrun
    try:
        lock, error = None, None
        if processes.main:  # creates the folder and checks that it can be written
            try:
                lock = RunLock(run_dir)
            except MeniscusError as err:
                error = err
        if not processes.agree(error is None):
            raise error or MeniscusError(f"rank 0 could not take {run_dir}: see its message")
        try:
            return _train_locked(config, run_dir, resume, console, on_epoch_end, processes)
        finally:
            if lock is not None:
                lock.release()
    finally:
        stop_processes(processes)


def _train_locked(
    config: Config,
    run_dir: Path,
    resume: bool,
    console: Console | None,
    on_epoch_end: EpochCallback | None,
    processes: Distributed = SINGLE,
) -> dict[str, Any]:
    if processes.main:
        console = console or Console(soft_wrap=True)
    else:
        console = Console(quiet=True)  # rank 0 prints
    run_dir = Path(run_dir)
    if not resume and ((run_dir / "last.pt").exists() or (run_dir / "members").exists()):
        raise MeniscusError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    check_batch(processes, config.train.batch_size)
    runtime = resolve_runtime(config.train.precision, config.train.device)  # a missing GPU stops here
    if processes.active and runtime.device.type == "cuda":  # one GPU per process
        runtime = Runtime(torch.device("cuda", processes.local_rank), runtime.bf16)
    processes.barrier()  # every process has checked the folder before rank 0 writes into it
    if processes.main:  # rank 0 generates the built-in phantom, the others then find it cached
        data_dir = resolve_data_dir(config.data)
    processes.barrier()
    if not processes.main:
        data_dir = resolve_data_dir(config.data)
    # what the summary calls the data: the built-in phantom by its level, a user's folder by its path
    data_name = f"the {config.data.phantom_difficulty} phantom" if not config.data.path else str(data_dir)
    config.data.path = str(data_dir.resolve())
    data = prepare_data(data_dir, config.data, report_dir=run_dir)
    if resume and not data.same_splits_as(run_dir / "splits.csv"):
        # Resuming on other splits would train on test images.
        raise MeniscusError(f"cannot resume {run_dir}: the data or its splits changed since the run started")
    unlabelled = tasks_without_labels(config.model.tasks, data)
    if unlabelled:  # the model predicts what it can learn; config.yaml and the checkpoints say so
        kept = tuple(t for t in config.model.tasks if t not in unlabelled)
        config.model = config.model.model_copy(update={"tasks": kept})
    if processes.main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        data.write_splits(run_dir / "splits.csv")
        data.write_exclusions(run_dir / "exclusions.csv")
    console.print(f"data {data_dir}: {data.exclusion_summary()} (report: {run_dir / 'exclusions.csv'})")
    console.print(f"splits: {data.split_summary()}")

    members = plan_members(config, data, run_dir)
    warnings = [
        f"{task}: no known label in the train split ({count} {data.tasks.root.noun}s, every one unknown): "
        f"not trained, and not predicted by this run's model"
        for task, count in unlabelled.items()
    ] + check_members(members, data)
    for warning in warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)

    console.print(
        f"training {config.model.name} on {runtime.describe()} -> {run_dir}"
        + (f" ({processes.world} processes, torchrun)" if processes.active else "")
    )
    wandb_config = config.wandb.model_copy(update={"job_type": config.wandb.job_type or "train"})
    if not processes.main:
        wandb_config.mode = "disabled"
    logger = RunLogger(wandb_config, run_dir, run_dir.name, config.to_dict())
    logger.define_step_axes([member.name for member in members])
    try:
        trained: dict[str, nn.Module] = {}
        history: list[dict[str, Any]] = []
        best_by_member: dict[str, dict[str, Any]] = {}
        learn_warnings: list[str] = []  # networks that did not learn
        late_warnings: list[str] = []  # networks that started to learn just before the budget ended
        train_seconds = 0.0
        for member in members:
            trainer = MemberTrainer(member, config, data, runtime, logger, console, processes)
            if resume and trainer.try_resume():
                console.print(
                    f"[{member.name}] resumed after epoch {trainer.state.epoch}"
                    + (" (finished)" if trainer.state.finished else ""),
                    markup=False,
                )
            trainer.fit(on_epoch_end)
            trained[member.name] = trainer.state.model
            history += trainer.state.history
            best_by_member[member.name] = trainer.best
            if trainer.warning:
                learn_warnings.append(trainer.warning)
            if trainer.late_start:
                late_warnings.append(trainer.late_start)
            train_seconds += trainer.state.train_seconds
            if processes.main:
                _write_history(run_dir / "history.csv", history)

        if not processes.main:
            return {}  # rank 0 scores the test split and writes the run's files
        model = trained["shared"] if "shared" in trained else SeparateCascade(trained)
        metrics = _final_metrics(model, config, data, runtime, history, best_by_member, train_seconds)
        unknown = any(best["learned"] is None for best in best_by_member.values())
        metrics["learned"] = False if learn_warnings else (None if unknown else True)
        metrics["warnings"] = warnings + late_warnings + learn_warnings
        atomic_torch_save(model_payload(model, config, {"metrics": metrics}), run_dir / "best.pt")
        write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2))
        plot_training_curves(history, run_dir / "training_curves.png")
        _print_metrics(console, metrics, data_name)
        for warning in late_warnings + learn_warnings:
            console.print(f"WARNING: {warning}", style="bold red", highlight=False, markup=False)
        logger.summary(
            _flatten("test", metrics["test"])
            | _flatten("test_tta", metrics["test_tta"])
            | {"learned": metrics["learned"], "warnings": "; ".join(metrics["warnings"])}
        )
        logger.log_image("training_curves", run_dir / "training_curves.png")
        logger.log_artifact(run_dir / "best.pt", name=f"{MODEL_ARTIFACT_PREFIX}{run_dir.name}")
        if logger.folder is not None:
            console.print(
                f"wandb ({logger.mode}): {logger.folder}"
                + (f"  (upload: wandb sync {logger.folder})" if logger.mode == "offline" else "")
            )
        return metrics
    finally:
        logger.finish()


FINAL_BOOTSTRAP = 1000  # stratified bootstrap resamples for the test split's CIs in the summary


def _final_metrics(
    model, config: Config, data: PreparedData, runtime: Runtime, history, best_by_member, train_seconds
) -> dict:
    test = data.indices("test")
    images, targets = [data.images[i] for i in test], data.targets[test]
    results = {}
    for key, tta in (("test", None), ("test_tta", config.tta)):
        probs = predict_probs(
            model,
            images,
            config.preprocess.edge_filter,
            runtime,
            config.train.eval_batch_size,
            tta=tta,
            seed=config.train.seed,
        )
        aucs = task_aucs(targets, probs, data.tasks)
        cis = bootstrap_cis(targets, probs, FINAL_BOOTSTRAP, seed=config.train.seed, tasks=data.tasks)
        results[key] = {
            "auc": aucs,
            "auc_ci95": {task: list(cis[task]) for task in aucs},
            "score": challenge_score(aucs, data.tasks),
            "score_ci95": list(cis["score"]),
            "n_images": len(test),  # exams with data.layout mrnet
            "unit": data.unit,
            "n_tears": int(np.nansum(targets[:, 0])),
        }
    results["members"] = best_by_member
    results["train_seconds"] = train_seconds  # training steps only
    results["train_wall_seconds"] = float(sum(r["seconds"] for r in history))  # with validation
    results["train_images"] = len(history) * config.train.steps_per_epoch * config.train.batch_size
    results["precision"] = runtime.precision
    results["device"] = runtime.device.type
    results["model"] = config.model.name
    return results


def _flatten(prefix: str, values: dict) -> dict:
    out = {f"{prefix}/score": values["score"]}
    out.update({f"{prefix}/auc_{t}": a for t, a in values["auc"].items()})
    return out


def _print_metrics(console: Console, metrics: dict, data_name: str) -> None:
    for key, label in (("test", "test"), ("test_tta", "test + TTA")):
        m = metrics[key]
        aucs = "  ".join(f"{t} {a:.4f}" for t, a in m["auc"].items())
        score = (
            "undefined (a weighted task is not predicted)" if math.isnan(m["score"]) else f"{m['score']:.4f}"
        )
        console.print(
            f"{label}: AUC {aucs}  challenge score {score}  "
            f"({m['n_images']} {m.get('unit', 'images')}, {m['n_tears']} tears)",
            highlight=False,
        )
    reading = result_reading(metrics["test_tta"], data_name)
    if reading:
        console.print(reading, style="bold", highlight=False, markup=False)


REFERENCE_SCORE = 0.892  # the JFR 2018 entry's challenge score on its own test split of real scans


def result_reading(test: dict, data_name: str) -> str | None:
    """One line a newcomer can read: the test score with its 95% CI, on what, and the reference's."""
    low, high = test.get("score_ci95", (math.nan, math.nan))
    if math.isnan(test["score"]):
        return None
    ci = "" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]"
    return (
        f"test score {test['score']:.2f}{ci} with TTA on {data_name} ({test['n_images']} "
        f"{test.get('unit', 'images')}, 95% bootstrap CI); the reference reported {REFERENCE_SCORE} on real scans"
    )


def _write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    with atomic_write(path) as tmp, tmp.open("w", newline="") as handle:
        # every key of every row: rows resumed from a run of an older version may lack newer columns
        columns = list(dict.fromkeys(key for row in history for key in row))
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def _load_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise MeniscusError(f"cannot resume {run_dir}: no config.yaml there (is it a run folder?)")
    return config_from_dict(read_config_file(path), source=str(path))
