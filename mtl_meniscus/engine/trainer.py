"""The epoch loop of one network ("member"): steps, validation, stopping decision, checkpoints.

A run (engine/run.py) trains its members one after another: one network for all tasks, or the
reference cascade's one network per task (engine/members.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import TextColumn

from mtl_meniscus.config import SEGMENTATION, Config
from mtl_meniscus.data.records import PreparedData
from mtl_meniscus.data.roi import HornCentres, horn_source
from mtl_meniscus.data.torch_dataset import (
    NO_MASK,
    EpochBatchSampler,
    ExamDataset,
    SliceDataset,
    training_batches,
)
from mtl_meniscus.engine.distributed import SINGLE, Distributed
from mtl_meniscus.engine.members import Member, class_counts, member_chance_bars, member_config
from mtl_meniscus.engine.progress import progress_bar
from mtl_meniscus.engine.runtime import Runtime
from mtl_meniscus.engine.stopping import (
    CHANCE,
    CHANCE_ALPHA,
    CONFIRMING_EPOCHS,
    EarlyStopping,
    decide_after_epoch,
)
from mtl_meniscus.engine.tracking import RunLogger
from mtl_meniscus.engine.training_state import MemberCheckpoints, TrainingState
from mtl_meniscus.engine.validation import validate
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.evaluation.metrics import monitor_weights
from mtl_meniscus.labels import Task
from mtl_meniscus.networks.losses import build_weighting, segmentation_loss, task_losses
from mtl_meniscus.networks.models import (
    SegmentationTraining,
    parameter_groups,
    reset_roi_fallbacks,
    roi_fallback_counts,
    segments,
    set_train_mode,
)

EpochCallback = Callable[[str, int], None]  # (member, epoch) after each finished epoch


class TrainingDivergedError(MeniscusError):
    """The loss or the network's outputs stopped being finite numbers."""


class MemberTrainer:
    """The epoch loop of one network: training steps, validation, the stopping decision
    (stopping.py) and the checkpoints that make it resumable (training_state.py). `horns`: every
    row's horns when another network found them (a cascade's classifier of roi predicted: its
    segmentation network's); else found here for roi classical and truth."""

    def __init__(
        self,
        member: Member,
        config: Config,
        data: PreparedData,
        runtime: Runtime,
        logger: RunLogger,
        console: Console,
        processes: Distributed = SINGLE,
        horns: HornCentres | None = None,  # from another network: _segmentation_network_horns (run.py)
    ):
        self.member, self.config, self.data, self.runtime = member, config, data, runtime
        self.logger, self.console, self.processes = logger, console, processes
        train = config.train
        torch.manual_seed(train.seed)  # the same initial weights in every process
        model = runtime.prepare_model(member.build(config))
        self.checkpoints = MemberCheckpoints(member.folder, member.name, processes)
        # the decoder trains when a training row has a mask; without any, its loss is absent
        self.segmenting = segments(model) and len(data.rows_with_mask(member.train_indices)) > 0
        if segments(model) and not self.segmenting:  # frozen: DDP refuses parameters that get no gradient
            model.decoder.requires_grad_(False)
        self.loss_names = (*member.tasks, SEGMENTATION) if self.segmenting else member.tasks
        weighting = build_weighting(train.weighting, self.loss_names, train.task_weights).to(runtime.device)
        groups = parameter_groups(model, train.lr, train.backbone_lr_factor, config.model.freeze_backbone)
        groups.append({"params": list(weighting.parameters()), "lr": train.lr})
        self.initial_lrs = [group["lr"] for group in groups]  # what a restart sets them back to
        self.state = TrainingState(
            model=model,
            weighting=weighting,
            optimizer=torch.optim.Adam(groups, lr=train.lr),
            stopping=EarlyStopping(
                patience=train.early_stopping_patience,
                lr_patience=train.lr_patience,
                chance_bars=member_chance_bars(data.targets[member.val_indices], member.tasks, data.tasks),
            ),
        )
        kind = ExamDataset if data.exams else SliceDataset
        labels = {"masks": data.masks} if self.segmenting else {}  # else the batches have no mask element
        # a ROI model's horns from outside it (roi classical, truth): found once per row, kept for the run
        if horns is None and member.tasks:  # the cascade's segmentation network crops nothing
            horns = horn_source(config.model.roi, data.images, data.masks)
        self.horns = horns
        labels |= {"horns": self.horns} if self.horns is not None else {}
        self.train_roi_counts = (0, 0)  # the last epoch's (images, cropped at a fallback window)
        self.dataset = kind(
            data.images, data.targets, config.preprocess.edge_filter, config.augment, **labels
        )
        self.sampler = EpochBatchSampler(
            member.train_indices,
            train.steps_per_epoch,
            train.batch_size,
            train.seed,
            rank=processes.rank,
            world=processes.world,
        )
        trained = SegmentationTraining(self.state.model) if self.segmenting else self.state.model
        self.net = processes.wrap(trained, runtime.device)  # DDP under torchrun
        processes.seed_own_stream(train.seed)  # dropout: each process its own masks (rank 0 as before)
        self.split_warnings = split_warnings(member, data)  # said before training and under the test metrics

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

    # ---- resume ------------------------------------------------------------------------------
    def try_resume(self) -> bool:
        return self.checkpoints.resume(self.state, self.config)

    def log_restored_history(self) -> None:
        """The restored epochs in wandb again, before the next one: offline, a resumed training is a
        new wandb folder, which would else lack them (and the killed run's folder lacks those
        wandb had not written yet)."""
        for row in self.state.history:
            self.logger.log_restored(self._wandb_row(row))
        if self.state.history:
            self._summarize_best()

    # ---- loop --------------------------------------------------------------------------------
    def fit(self, on_epoch_end: EpochCallback | None = None) -> None:
        """Train epoch after epoch until the stopping rule or the budget ends it; the model then
        holds the best epoch's weights (best.pt)."""
        train = self.config.train
        if not self.state.finished:
            for warning in self.split_warnings:
                self.console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)
        while not self.state.finished:
            self.state.epoch += 1
            start = time.perf_counter()
            train_loss, task_weights = self._train_epoch()
            self.state.train_seconds += time.perf_counter() - start
            val = validate(
                self.state.model,
                self.data,
                self.member.val_indices,
                self.config,
                self.runtime,
                self.processes,
                self.horns,
            )
            if not val["finite"]:
                raise self.diverged("the network's outputs on the validation images are not finite numbers")
            lr = self.state.optimizer.param_groups[0]["lr"]
            decision = decide_after_epoch(
                self.state.stopping,
                self.state.epoch,
                val["score"],
                lr,
                train.min_lr,
                train.max_epochs,
                task_aucs=val["auc"],  # "left chance" is decided per task
                restart_after=train.restart_if_at_chance_after,
            )
            if decision.improved:
                self.checkpoints.save_best(self.state, member_config(self.config, self.member))
            elif decision.cut_lr:
                self._cut_lr()
            row = self._history_row(train_loss, task_weights, val, decision.improved, lr, start)
            self.state.history.append(row)
            self.state.finished = decision.finished
            if self.state.stopping.best_score is None and self.state.finished:
                # never a defined score (e.g. one-class validation): keep the last weights
                self.checkpoints.save_best(self.state, member_config(self.config, self.member))
            self._report(row, decision.improved)
            if decision.restart:  # before last.pt: a resumed run continues from the new weights
                self._restart()
            self.logger.log(self._wandb_row(row))
            self._summarize_best()
            self.checkpoints.save_last(self.state, self.config)
            if on_epoch_end is not None:
                on_epoch_end(self.member.name, self.state.epoch)
        self.processes.barrier()  # rank 0 has written best.pt
        self.checkpoints.restore_best(self.state.model)
        if self.chance_note:
            self.console.print(f"note: {self.chance_note}", style="yellow", markup=False, highlight=False)

    def _history_row(self, train_loss, task_weights, val, improved, lr, start) -> dict[str, Any]:
        """One row of history.csv: the epoch's losses, AUCs, score, learning rate and task weights."""
        names = self.data.tasks.names
        weighted = (*names, SEGMENTATION) if self.segmenting else names
        return {
            "member": self.member.name,
            "epoch": self.state.epoch,
            "train_loss": train_loss,
            "val_loss": val["loss"],
            **{f"val_auc_{t}": val["auc"].get(t, float("nan")) for t in names},
            "val_score": val["score"],
            **{f"val_dice_{c}": dice for c, dice in val.get("dice", {}).items()},  # a segmenting network's
            **self._roi_fallback_column(),
            "improved": int(improved),
            "lr": lr,
            **{f"weight_{t}": task_weights.get(t, float("nan")) for t in weighted},
            "seconds": time.perf_counter() - start,
        }

    def _roi_fallback_column(self) -> dict[str, float]:
        """A ROI model's {"roi_fallbacks": share of the epoch's training images cropped at a fallback
        window (no horn found)}; {} for other models and for the cascade's segmentation network.
        Under torchrun: this process's images."""
        if self.config.model.roi == "none" or not self.member.tasks:
            return {}
        images, fallbacks = self.train_roi_counts
        return {"roi_fallbacks": fallbacks / max(images, 1)}

    def _restart(self) -> None:
        """Start the network again from new initial weights (engine/stopping.py restart_due): new
        weights and task weighting drawn from restart_seed, the optimizer's moments cleared and its
        learning rates reset, the stopping state cleared but for the restart's epoch. In place, so
        that DDP and the optimizer keep their parameters; every process draws the same weights."""
        epoch, stopping = self.state.epoch, self.state.stopping
        seed = restart_seed(self.config.train.seed, len(stopping.restarts) + 1)
        torch.manual_seed(seed)
        fresh = self.runtime.prepare_model(self.member.build(self.config))
        self.state.model.load_state_dict(fresh.state_dict())
        train = self.config.train
        weighting = build_weighting(train.weighting, self.loss_names, train.task_weights)
        self.state.weighting.load_state_dict(weighting.state_dict())
        self.state.optimizer.state.clear()
        for group, lr in zip(self.state.optimizer.param_groups, self.initial_lrs):
            group["lr"] = lr
        self.state.stopping = stopping.restarted(epoch)
        self.processes.seed_own_stream(seed)
        self.console.print(
            f"[{self.member.name}] no task above chance in epochs {stopping.start_epoch + 1}-{epoch} "
            f"({_bars_text(stopping.chance_bars)}): starting again from new initial weights "
            f"(train.restart_if_at_chance_after {train.restart_if_at_chance_after}; epoch {epoch + 1} of "
            f"{train.max_epochs})",
            style="yellow",
            highlight=False,
            markup=False,
        )

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
        can_tell = stopping.best_score is not None and stopping.can_tell_chance
        return {
            "best_epoch": stopping.best_epoch,
            "val_score": stopping.best_score,
            "epochs": self.state.epoch,
            "learned": stopping.started if can_tell else None,  # None: no score, or too few rows to tell
            # the first epoch of the confirming pair; patience counted from the second (stopping.py)
            "left_chance_epoch": stopping.started_epoch or None,
            "left_chance_tasks": dict(stopping.left_chance_epochs),  # {task: first epoch of its pair}
            "tasks_at_chance": stopping.tasks_at_chance,
            "chance_bars": dict(stopping.chance_bars),  # {task: validation AUC counted as above chance}
            "restarts": list(stopping.restarts),  # epochs after which it started again from new weights
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
        """'did not learn: ...' when no task of the network left chance on validation, else None."""
        return did_not_learn_warning(self.member.name, self.state.stopping)

    @property
    def chance_note(self) -> str | None:
        """The tasks that stayed at chance in a network that learned others, else None."""
        return tasks_at_chance_note(self.member.name, self.state.stopping)

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
        reset_roi_fallbacks(self.state.model)
        total, steps = 0.0, 0
        weight_sums: dict[str, float] = {}
        with progress_bar(self.console, TextColumn("loss {task.fields[loss]:.4f}")) as progress:
            epoch = f"[bold]{self.member.name}[/] epoch {self.state.epoch}/{train.max_epochs}"
            bar = progress.add_task(epoch, total=len(self.sampler), loss=float("nan"))
            for batch in loader:
                losses = self._batch_losses(*batch)
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
        self.train_roi_counts = roi_fallback_counts(self.state.model)  # before validation adds its own
        return total / max(steps, 1), {task: w / max(steps, 1) for task, w in weight_sums.items()}

    def _batch_losses(
        self, inputs: tuple[torch.Tensor, ...], y: torch.Tensor, *masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """{task: masked loss} of one training batch, and {"segmentation": its loss} when the network
        segments (the batch then carries masks (B, H, W) int64, NO_MASK on rows without one)."""
        train, tasks = self.config.train, self.data.tasks
        # x (B, C, H, W); for exams (N, C, H, W), every slice of the B exams, and lengths (B,); for
        # a ROI model of horns found outside it, horns (B, 2, 3)
        x, *rest = inputs
        x, y = self.runtime.prepare_input(x), y.to(self.runtime.device)  # y (B, T)
        with self.runtime.autocast():
            outputs = self.net(x, *(t.to(self.runtime.device) for t in rest))
        if self.segmenting:
            outputs, segmentation = outputs  # {task: (B,)}, (B, 3, H, W)
        # torchrun only: the global batch's counts
        denominators = self.processes.loss_denominators(y, list(outputs), tasks, train.gated_loss_mean)
        losses = task_losses(outputs, y, train.pos_weights, tasks, denominators, train.gated_loss_mean)
        if self.segmenting:
            labels = masks[0].to(self.runtime.device, non_blocking=True)  # (B, H, W)
            rows = self.processes.rows_denominator((labels != NO_MASK).flatten(1).any(1))
            losses[SEGMENTATION] = segmentation_loss(segmentation, labels, rows, NO_MASK)
        return losses

    def _report(self, row: dict[str, Any], improved: bool) -> None:
        aucs = " ".join(
            f"{t} {row[f'val_auc_{t}']:.3f}"
            for t in self.data.tasks.names
            if not math.isnan(row[f"val_auc_{t}"])
        )
        aucs = aucs or "undefined"  # one class in validation: split_warnings said why before training
        star = " *" if improved else ""
        dice = " ".join(
            f"{key.removeprefix('val_dice_')} {value:.3f}"
            for key, value in row.items()
            if key.startswith("val_dice_")
        )
        # the cascade's segmentation network has no task: its score is the mean Dice (validation.py)
        loss = "undefined" if math.isnan(row["val_loss"]) else f"{row['val_loss']:.4f}"
        classification = f"val loss {loss}  AUC {aucs}  " if self.member.tasks else ""
        score = "undefined" if math.isnan(row["val_score"]) else f"{row['val_score']:.4f}"
        self.console.print(
            f"[{self.member.name}] epoch {row['epoch']:>2}  loss {row['train_loss']:.4f}  "
            f"{classification}score {score}{star}  "
            + (f"Dice {dice}  " if dice else "")
            + f"lr {row['lr']:.2g}  {row['seconds']:.1f}s",
            highlight=False,
            markup=False,
        )

    def _wandb_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A history row as wandb logs it: each value under the network's name ("fissure/val_score")."""
        return {f"{self.member.name}/{key}": value for key, value in row.items() if key != "member"}

    def _summarize_best(self) -> None:
        """The network's best validation score and its epoch in wandb's summary ("<network>/val_score",
        "<network>/best_epoch", metrics.json's names under members): the epoch best.pt holds and tune
        ranks by. wandb's summary otherwise keeps the last epoch's score, and runs sort by it."""
        best = self.best
        self.logger.summary(
            {
                f"{self.member.name}/val_score": best["val_score"],
                f"{self.member.name}/best_epoch": best["best_epoch"],
            }
        )


def did_not_learn_warning(name: str, stopping: EarlyStopping) -> str | None:
    """'[name] did not learn: no task left chance ...' when none did, else None (also when there
    is no validation score, warned before training, or too few validation rows to tell)."""
    if stopping.started or stopping.best_score is None or not stopping.can_tell_chance:
        return None
    return (
        f"[{name}] did not learn: no task left chance on validation "
        f"({_bars_text(stopping.chance_bars)}, each needed in {CONFIRMING_EPOCHS} consecutive epochs; "
        f"best validation score {stopping.best_score:.2f}, chance is {CHANCE:.2f}"
        + (
            f"; started again from new weights after epoch {', '.join(map(str, stopping.restarts))}"
            if stopping.restarts
            else ""
        )
        + "); check the labels, or train longer or with another learning rate"
    )


def tasks_at_chance_note(name: str, stopping: EarlyStopping) -> str | None:
    """'[name] orientation did not leave chance ...' in a network that learned other tasks, else
    None: softer than the warning, since the network did learn (and its patience counted)."""
    at_chance = stopping.tasks_at_chance
    if not stopping.started_epoch or not at_chance:
        return None
    learned = ", ".join(f"{task} from epoch {epoch}" for task, epoch in stopping.left_chance_epochs.items())
    return (
        f"[{name}] {', '.join(at_chance)} did not leave chance on validation "
        f"({_bars_text({task: stopping.chance_bars[task] for task in at_chance})} never reached in "
        f"{CONFIRMING_EPOCHS} consecutive epochs); the network learned {learned}"
    )


def split_warnings(member: Member, data: PreparedData) -> list[str]:
    """What a network's splits keep it from learning or from telling, before it trains: a task
    with one class in its training rows, a task whose validation AUC is undefined or too few
    validation rows to tell any of its tasks from chance. [] for the cascade's segmentation
    network (no task) and for a network without validation images (check_members warns)."""
    if not member.tasks:
        return []
    warnings = training_class_warnings(member, data)
    if len(member.val_indices):
        warnings += validation_warnings(member, data)
    return warnings


def training_class_warnings(member: Member, data: PreparedData) -> list[str]:
    """'[shared] position: no anterior among the 9 tears of the train split ...' for each task of
    the network whose training rows hold one class: its loss has nothing to tell apart, so the
    task is not learned, yet its test AUC enters the challenge score. A task without any known
    training label is left out of the model before this (tasks_without_labels), and a root task
    (fissure) with one class is refused (check_members)."""
    warnings = []
    for name in member.tasks:
        positives, negatives = class_counts(data.targets[member.train_indices], name, data.tasks)
        if not (positives + negatives) or (positives and negatives):  # no known label, or both classes
            continue
        task = data.tasks[name]
        warnings.append(
            f"[{member.name}] {name}: {_one_class_text(task, positives, negatives, data)} of the train split "
            f"({positives} {task.class_name(1.0)}, {negatives} {task.class_name(0.0)}): the network trains "
            "this task on one class and cannot learn it; its test AUC, which enters the challenge score, "
            "measures no learning"
        )
    return warnings


def has_validation_score(member: Member, data: PreparedData) -> bool:
    """True when the network's validation rows give it a score: one of its tasks has both classes
    there (metrics.monitor_score, which takes a task of weight 0 when no weighted one is defined;
    otherwise the score is undefined in every epoch)."""
    val = data.targets[member.val_indices]
    return any(all(class_counts(val, name, data.tasks)) for name in member.tasks)


def validation_warnings(member: Member, data: PreparedData) -> list[str]:
    """Why some of the network's monitored tasks say nothing on validation (the network has
    validation images): a task with one class, or none, among its scored validation rows has no
    AUC; a task with too few rows for any AUC to be rare by chance has no bar (stopping.py
    chance_bar). Silent when at least one defined task has a bar: the did-not-learn check then
    runs, and `chance_bars` in metrics.json shows which tasks it rests on."""
    val = data.targets[member.val_indices]
    weights = monitor_weights(member.tasks, data.tasks)  # a task of weight 0 moves neither score nor bar
    monitored = [name for name in member.tasks if weights[name] > 0]
    undefined, too_few = {}, {}  # {task: why}
    for name in monitored:
        positives, negatives = class_counts(val, name, data.tasks)
        task = data.tasks[name]
        if not positives + negatives:  # a gated task on a val split without its gate's positives
            gate = data.tasks[task.gated_by].noun
            undefined[name] = f"no {gate} in the val split to score it on"
        elif not (positives and negatives):
            undefined[name] = f"{_one_class_text(task, positives, negatives, data)} of the val split"
        else:
            too_few[name] = _versus_text(task, positives, negatives)
    bars = member_chance_bars(val, member.tasks, data.tasks)
    too_few = {name: counts for name, counts in too_few.items() if name not in bars}
    warnings = []
    why = "; ".join(f"{name}: {reason}" for name, reason in undefined.items())
    if undefined and len(undefined) == len(monitored):
        # no defined AUC in any epoch: the monitored score is NaN throughout (metrics.monitor_score)
        warnings.append(
            f"[{member.name}] no validation AUC can be computed ({why}): the network has no validation "
            "score, so the run cannot choose a best epoch (it keeps the last one), stop early, or tell "
            "whether the network learned (learned is unknown); put both classes of each task in the val split"
        )
    elif undefined:
        they = "it counts" if len(undefined) == 1 else "they count"
        warnings.append(
            f"[{member.name}] validation AUC undefined ({why}): {they} neither in "
            "the validation score that picks the best epoch nor in whether the network left chance"
        )
    if too_few and not bars:  # the did-not-learn check has nothing to test: say so, not learned=null alone
        counts = "; ".join(f"{name}: {text}" for name, text in too_few.items())
        if len(too_few) == 1:
            counts = next(iter(too_few.values()))
        warnings.append(
            f"[{member.name}] too few validation images ({counts}) to test whether "
            f"{_either(list(too_few))} left chance: even an AUC of 1 is reached by random scores more "
            f"often than {CHANCE_ALPHA:.0%} of the time; learned is unknown"
        )
    return warnings


def _either(names: list[str]) -> str:
    """'fissure', 'fissure or orientation', 'fissure, orientation or position'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _rows_text(task: Task, count: int, data: PreparedData) -> str:
    """'19 images' (a root task's rows), '1 tear' (a gated task's)."""
    noun = data.tasks[task.gated_by].noun + "s" if task.gated_by else data.unit
    return f"{count} {noun.removesuffix('s') if count == 1 else noun}"


def _one_class_text(task: Task, positives: int, negatives: int, data: PreparedData) -> str:
    """'no tear among the 19 images', 'only horizontal among the 3 tears' (one of the counts is 0)."""
    rows = _rows_text(task, positives + negatives, data)
    if not positives:
        return f"no {task.class_name(1.0)} among the {rows}"
    only = f"{task.positive}s" if task.positive else task.class_name(1.0)
    return f"only {only} among the {rows}"


def _versus_text(task: Task, positives: int, negatives: int) -> str:
    """'2 tears vs 3 others' (a task named by its positive class), '2 horizontal vs 1 vertical'."""
    if task.positive:
        plural = "" if positives == 1 else "s"
        return f"{positives} {task.positive}{plural} vs {negatives} other{'' if negatives == 1 else 's'}"
    return f"{positives} {task.class_name(1.0)} vs {negatives} {task.class_name(0.0)}"


def _bars_text(bars: dict[str, float]) -> str:
    """'fissure AUC >= 0.65, position AUC >= 0.81'."""
    return ", ".join(f"{task} AUC >= {bar:.2f}" for task, bar in bars.items())


def restart_seed(seed: int, restart: int) -> int:
    """The torch seed of a network's weights after its `restart`-th restart (1, 2, ...)."""
    return int(np.random.default_rng([seed, restart]).integers(2**31))


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
