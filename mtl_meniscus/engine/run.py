"""A training run end to end: the run folder and its lock, the data, the members one after another,
the test split's metrics and the files a run writes (config.yaml, splits.csv, exclusions.csv,
history.csv, best.pt/last.pt, metrics.json, training_curves.png).

In separate mode each network ("member") trains in members/<task>/ on its own data (fissure: all
images; orientation, position: tears only) with its own learning-rate schedule and early stopping,
as in the reference method; the run's best.pt is the assembled cascade. The networks can also
train at once in processes of their own (start_run, train_network; compare --jobs).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from torch import nn

from mtl_meniscus.config import (
    SEGMENTATION,
    Config,
    load_config,
    parse_set_option,
    preset_path,
    saved_run_config,
)
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.data.records import PROBLEMS_FILE, PreparedData
from mtl_meniscus.data.roi import HornCentres
from mtl_meniscus.engine.checkpoint import atomic_torch_save, model_payload
from mtl_meniscus.engine.data_source import resolve_data_dir
from mtl_meniscus.engine.distributed import SINGLE, Distributed, check_batch, world_size
from mtl_meniscus.engine.distributed import start as start_processes
from mtl_meniscus.engine.distributed import stop as stop_processes
from mtl_meniscus.engine.inference import predict_probs, predicted_horn_centres, segmentation_metrics
from mtl_meniscus.engine.members import JOINT, Member, check_members, plan_members, tasks_without_labels
from mtl_meniscus.engine.progress import counted_progress
from mtl_meniscus.engine.runtime import Runtime, resolve_runtime
from mtl_meniscus.engine.tracking import MODEL_ARTIFACT_PREFIX, RunLogger, resolve_wandb_mode
from mtl_meniscus.engine.trainer import (
    EpochCallback,
    MemberTrainer,
    has_validation_score,
    validation_warnings,
)
from mtl_meniscus.engine.training_state import MemberCheckpoints
from mtl_meniscus.errors import ConfigError, MeniscusError
from mtl_meniscus.evaluation.metrics import bootstrap_cis, challenge_score, task_aucs
from mtl_meniscus.evaluation.plots import plot_training_curves
from mtl_meniscus.io.outputs import (
    OutputError,
    atomic_csv_file,
    entries_besides,
    is_data_folder,
    json_text,
    remove_stale_temporaries,
    some_of,
    write_text_atomic,
)
from mtl_meniscus.io.runlock import RunLock, folder_lock
from mtl_meniscus.labels import TaskTable
from mtl_meniscus.networks.losses import WEIGHTINGS, check_weighting_contract
from mtl_meniscus.networks.models import (
    MODELS,
    SeparateCascade,
    check_output_contract,
    check_trunk,
    reset_roi_fallbacks,
    roi_fallback_counts,
    segments,
    trains_per_task,
)


def default_run_dir(mode: str) -> Path:
    return Path("runs") / f"{mode}-{datetime.now():%Y%m%d-%H%M%S}"


def train_run(
    config: Config | None,
    run_dir: Path,
    resume: bool = False,
    console: Console | None = None,
    on_epoch_end: EpochCallback | None = None,
    scored_because: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run end to end and return its metrics (also in metrics.json).

    With resume=True the run's own config.yaml is used and `config` is ignored. The run folder
    is locked while training: a second process on the same folder is refused. A network whose
    validation split gives it no score trains with a warning; with `scored_because` (why the caller
    needs the score: tune compares trials by it) the run is refused before it trains.
    """
    run_dir = Path(run_dir)
    if resume and not (run_dir / "config.yaml").is_file():
        raise MeniscusError(f"cannot resume {run_dir}: no config.yaml there (is it a run folder?)")
    if resume:
        config = _load_run_config(run_dir)
        if config.data.path and not Path(config.data.path).is_dir():
            raise MeniscusError(
                f"cannot resume {run_dir}: its data folder {config.data.path} is gone (moved?): put it "
                f"back, or set data.path in {run_dir / 'config.yaml'} to where it is now (the run's "
                "splits.csv then checks that it holds the same data)"
            )
    check_registered(config)  # a misspelt model or weighting stops here, before any work
    resolve_wandb_mode(config.wandb)  # and so does a bad $WANDB_MODE
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
            return _train_locked(config, run_dir, resume, console, on_epoch_end, processes, scored_because)
        finally:
            if lock is not None:
                lock.release()
    finally:
        stop_processes(processes)


def start_run(config: Config, run_dir: Path, console: Console | None = None) -> None:
    """Begin a run folder without training anything: read and split the data and write config.yaml,
    splits.csv and exclusions.csv, as train_run does first. A cascade's networks can then train at
    once, each in a process of its own (train_network), and train_run(None, run_dir, resume=True)
    then finds them trained, assembles the cascade and scores it (compare --jobs)."""
    console = console or Console(soft_wrap=True)
    run_dir = Path(run_dir)
    check_registered(config)
    with folder_lock(run_dir):
        if (run_dir / "config.yaml").exists():
            raise MeniscusError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
        data, _, _ = _prepare_run_data(config, run_dir, False, SINGLE, console)
        check_members(plan_members(config, data, run_dir), data, config.model)  # refused before training


def train_network(run_dir: Path, network: str, console: Console | None = None) -> None:
    """Train one network of a cascade run begun by start_run, alone, from its last.pt if it has one;
    the run stays unfinished. Calls for the other networks may run at the same time: each locks its
    network's folder (members/<network>), not the run folder (the run's files they rewrite are the
    same and written atomically). With roi predicted the classifiers crop around the horns of the
    cascade's segmentation network, so they wait for it: a classifier's call is refused until the
    segmentation network has finished. The network logs to a wandb run of its own
    (members/<network>/wandb) in the run's group."""
    console = console or Console(soft_wrap=True)
    run_dir = Path(run_dir)
    config = _load_run_config(run_dir)
    resolve_wandb_mode(config.wandb)  # a bad $WANDB_MODE stops here, before any work
    if not trains_per_task(config.model.name):
        raise MeniscusError(f"{run_dir}: only a cascade trains a network alone (this run has one network)")
    with folder_lock(run_dir / "members" / network, "network folder"):
        runtime = resolve_runtime(config.train.precision, config.train.device)
        data, _, _ = _prepare_run_data(config, run_dir, True, SINGLE, console)
        members = plan_members(config, data, run_dir)
        member = next((m for m in members if m.name == network), None)
        if member is None:
            raise MeniscusError(f"{run_dir} has no network named {network!r}")
        horns = None  # roi classical and truth: the trainer finds them
        if config.model.roi == "predicted" and member.tasks:
            segmenter = next(m for m in members if m.name == SEGMENTATION)  # roi predicted implies one
            horns = _finished_segmentation_horns(segmenter, config, data, runtime, console)
        logger = RunLogger(
            _wandb_config(config, run_dir),
            member.folder,
            f"{run_dir.name}-{network}",
            config.to_dict(),
            resume=True,  # the network's run continues where an earlier call left it
        )
        try:
            logger.define_step_axes([network])
            trainer = MemberTrainer(member, config, data, runtime, logger, console, horns=horns)
            _resume(trainer, console)
            trainer.fit()
        finally:
            logger.finish()


def _train_locked(
    config: Config,
    run_dir: Path,
    resume: bool,
    console: Console | None,
    on_epoch_end: EpochCallback | None,
    processes: Distributed = SINGLE,
    scored_because: str | None = None,
) -> dict[str, Any]:
    console = (console or Console(soft_wrap=True)) if processes.main else Console(quiet=True)  # rank 0 prints
    run_dir = Path(run_dir)
    if not resume and ((run_dir / "last.pt").exists() or (run_dir / "members").exists()):
        raise MeniscusError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    check_batch(processes, config.train.batch_size)
    runtime = resolve_runtime(config.train.precision, config.train.device)  # a missing GPU stops here
    if processes.active and runtime.device.type == "cuda":  # one GPU per process
        runtime = Runtime(torch.device("cuda", processes.local_rank), runtime.bf16)
    data, data_name, warnings = _prepare_run_data(config, run_dir, resume, processes, console)
    members = plan_members(config, data, run_dir)
    warnings += check_members(members, data, config.model)
    if scored_because:
        _check_validation_scores(members, data, run_dir, scored_because)
    for warning in warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)
    console.print(
        f"training {config.model.name} on {runtime.describe()} -> {run_dir}"
        + (f" ({processes.world} processes, torchrun)" if processes.active else "")
    )
    wandb_config = _wandb_config(config, run_dir)
    if not processes.main:
        wandb_config.mode = "disabled"
    logger = RunLogger(wandb_config, run_dir, run_dir.name, config.to_dict(), resume=resume)
    logger.define_step_axes([member.name for member in members])
    if resume and processes.main:  # a cascade's own best.pt.<pid>.tmp: its members clean their folders
        for tmp in remove_stale_temporaries(run_dir):
            console.print(f"deleted {tmp.name}, left by a process that was killed", markup=False)
    try:
        trainers, had_finished = [], resume
        horns = None  # a cascade's horns from its segmentation network, once it has trained (roi predicted)
        for member in members:
            with _member_lock(member, run_dir, processes):
                trainer = MemberTrainer(member, config, data, runtime, logger, console, processes, horns)
                if resume:
                    _resume(trainer, console)
                had_finished &= trainer.state.finished
                trainer.fit(on_epoch_end)
            trainers.append(trainer)
            if member.name == SEGMENTATION and config.model.roi == "predicted":
                horns = _segmentation_network_horns(trainer.state.model, config, data, runtime, console)
            if processes.main:
                _write_history(run_dir / "history.csv", [row for t in trainers for row in t.state.history])
        if not processes.main:
            return {}  # rank 0 scores the test split and writes the run's files
        if had_finished and _finished_files_kept(run_dir, console):
            return json.loads((run_dir / "metrics.json").read_text())
        return _finish_run(trainers, config, data, runtime, run_dir, warnings, data_name, logger, console)
    finally:
        logger.finish()


def _member_lock(member: Member, run_dir: Path, processes: Distributed) -> contextlib.AbstractContextManager:
    """A cascade network's folder lock while this process trains it, as train_network holds it: a
    `compare --jobs` worker training the network and `train --resume RUN` would otherwise both
    write its checkpoints. None for a one-network run (its folder is RUN, locked already) or
    another rank than the first (it writes nothing)."""
    if member.folder == run_dir or not processes.main:
        return contextlib.nullcontext()
    return folder_lock(member.folder, "network folder")


def _finished_files_kept(run_dir: Path, console: Console) -> bool:
    """Whether a resumed run that had finished keeps its best.pt and metrics.json (it has both):
    written again, best.pt's bytes would change (the same weights), and the calibration or threshold
    fitted on it since would be refused as fitted on another best.pt."""
    if not ((run_dir / "best.pt").is_file() and (run_dir / "metrics.json").is_file()):
        return False  # stopped between its last epoch and its last files: they are written now
    console.print(
        f"{run_dir} had finished: its best.pt and metrics.json are kept as they are (its test scores: "
        f"metrics.json, or evaluate {run_dir})",
        markup=False,
        highlight=False,
    )
    return True


def _check_validation_scores(members: list[Member], data: PreparedData, run_dir: Path, because: str) -> None:
    """Refuse a run whose validation split gives a network no score, naming why, before it trains."""
    unscored = [m for m in members if m.tasks and not has_validation_score(m, data)]
    if not unscored:
        return
    reasons = [
        reason
        for member in unscored
        for reason in (
            validation_warnings(member, data)
            if len(member.val_indices)
            else [f"[{member.name}] no validation image"]
        )
    ]
    raise MeniscusError(f"{run_dir}: {because}, and this data's val split gives none: {'; '.join(reasons)}")


def _wandb_config(config: Config, run_dir: Path):
    """A run of its own is a wandb group of its own, which its evaluate runs join (evaluate.py)."""
    return config.wandb.model_copy(
        update={"job_type": config.wandb.job_type or "train", "group": config.wandb.group or run_dir.name}
    )


def _resume(trainer: MemberTrainer, console: Console) -> None:
    """Load the network's last.pt, if it has one, and say so; a checkpoint's temporary file that a
    killed process left is deleted."""
    for tmp in remove_stale_temporaries(trainer.member.folder):
        console.print(
            f"[{trainer.member.name}] deleted {tmp.name}, left by a process that was killed", markup=False
        )
    if trainer.try_resume():
        console.print(
            f"[{trainer.member.name}] resumed after epoch {trainer.state.epoch}"
            + (" (finished)" if trainer.state.finished else ""),
            markup=False,
        )
        trainer.log_restored_history()


def _segmentation_network_horns(
    network: nn.Module, config: Config, data: PreparedData, runtime: Runtime, console: Console
) -> HornCentres:
    """Every row's horns as the cascade's trained segmentation network finds them: what its
    classifiers of roi predicted crop around in training (moved with each augmentation, as the
    classical horns are) and validation; the assembled cascade finds them itself."""
    centres = predicted_horn_centres(
        network, data.images, config.preprocess.edge_filter, runtime, config.train.eval_batch_size
    )
    horns = HornCentres.found_by_network(data.images, centres)
    console.print(
        f"[{SEGMENTATION}] horns of {len(data.images)} {data.unit} for the classifiers "
        f"({horns.not_found()} without both: cropped at a fallback window)",
        markup=False,
        highlight=False,
    )
    return horns


def _finished_segmentation_horns(
    member: Member, config: Config, data: PreparedData, runtime: Runtime, console: Console
) -> HornCentres:
    """A classifier of roi predicted trained alone (train_network): the horns of the cascade's
    segmentation network (`member`), found by its best weights once it has finished training,
    as train_run finds them after training it."""
    checkpoints = MemberCheckpoints(member.folder, member.name)
    if not checkpoints.finished():
        raise MeniscusError(
            f"{member.folder / 'last.pt'}: the segmentation network has not finished training; with roi "
            f"predicted the classifiers crop around its horns, so it trains first (train_network(run, "
            f"'{SEGMENTATION}'))"
        )
    network = runtime.prepare_model(member.build(config))
    checkpoints.restore_best(network)
    return _segmentation_network_horns(network, config, data, runtime, console)


def _prepare_run_data(
    config: Config, run_dir: Path, resume: bool, processes: Distributed, console: Console
) -> tuple[PreparedData, str, list[str]]:
    """Read and split the data (the built-in phantom when no folder is configured), leave out tasks
    without a known label, write config.yaml, splits.csv and exclusions.csv (atomically: other
    processes may read them meanwhile); (data, what the summary calls it, warnings)."""
    processes.barrier()  # every process has checked the folder before rank 0 writes into it
    if processes.main:  # rank 0 generates the built-in phantom, the others then find it cached
        data_dir = resolve_data_dir(config.data, console)
    processes.barrier()
    if not processes.main:
        data_dir = resolve_data_dir(config.data)
    # what the summary calls the data: the built-in phantom by its level, a user's folder by its path
    data_name = f"the {config.data.phantom_difficulty} phantom" if not config.data.path else str(data_dir)
    config.data.path = str(data_dir.resolve())
    with counted_progress(console, "reading the data") as on_row:
        data = prepare_data(
            data_dir, config.data, report_dir=run_dir, on_row=on_row, masks=config.model.reads_masks
        )
    if resume and not (run_dir / "splits.csv").is_file() and any(run_dir.rglob("*.pt")):
        raise MeniscusError(  # split again, the data could put the run's training images in its test split
            f"cannot resume {run_dir}: its splits.csv is gone, so there is no telling whether the data "
            "still splits as the run began: restore splits.csv, or train a new run"
        )
    changes = data.splits_changes(run_dir / "splits.csv") if resume else ""
    if changes:  # resuming on other splits would train on test images, on other labels mix two
        raise MeniscusError(
            f"cannot resume {run_dir}: the data changed since the run started ({changes}; its "
            "splits.csv lists what it began with): restore the data, or train a new run"
        )
    unlabelled = tasks_without_labels(config.model.tasks, data)
    if unlabelled:  # the model predicts what it can learn; config.yaml and the checkpoints say so
        kept = tuple(t for t in config.model.tasks if t not in unlabelled)
        config.model = config.model.model_copy(update={"tasks": kept})
    if processes.main:
        (run_dir / PROBLEMS_FILE).unlink(missing_ok=True)  # an earlier start's, whose data had them
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        data.write_splits(run_dir / "splits.csv")
        data.write_exclusions(run_dir / "exclusions.csv")
    console.print(f"data {data_dir}: {data.exclusion_summary()} (report: {run_dir / 'exclusions.csv'})")
    console.print(f"splits: {data.split_summary()}")
    warnings = [
        f"{task}: no known label in the train split ({count} {data.tasks.root.noun}s, every one unknown): "
        f"not trained, and not predicted by this run's model"
        for task, count in unlabelled.items()
    ]
    return data, data_name, warnings


def _finish_run(
    trainers: list[MemberTrainer],
    config: Config,
    data: PreparedData,
    runtime: Runtime,
    run_dir: Path,
    warnings: list[str],
    data_name: str,
    logger: RunLogger,
    console: Console,
) -> dict[str, Any]:
    """Assemble the model, score the test split, write best.pt, metrics.json and the curves, print
    the summary and the warnings of networks that did not learn or started late, or whose splits
    left them a task of one class or validation that cannot tell (trainer.py split_warnings)."""
    trained: dict[str, nn.Module] = {t.member.name: t.state.model for t in trainers}
    history = [row for t in trainers for row in t.state.history]
    best_by_member = {t.member.name: t.best for t in trainers}
    learn_warnings = [t.warning for t in trainers if t.warning]  # networks that did not learn
    late_warnings = [t.late_start for t in trainers if t.late_start]  # started just before the budget ended
    # a task trained on one class, validation that cannot pick an epoch or tell chance: said before
    # training, and again under the test metrics, which they qualify
    split_warnings = [warning for t in trainers for warning in t.split_warnings]
    model = trained[JOINT] if JOINT in trained else SeparateCascade(trained)
    train_seconds = sum(t.state.train_seconds for t in trainers)
    # a ROI model's horns from outside it, found once for the run (a cascade's segmentation network has none)
    horns = next((t.horns for t in trainers if t.horns is not None), None)
    metrics = _final_metrics(model, config, data, runtime, history, best_by_member, train_seconds, horns)
    # whether it learned is the classifiers' question (a segmentation network has no chance bar)
    unknown = any(best_by_member[t.member.name]["learned"] is None for t in trainers if t.member.tasks)
    metrics["learned"] = False if learn_warnings else (None if unknown else True)
    metrics["warnings"] = warnings + split_warnings + late_warnings + learn_warnings
    atomic_torch_save(model_payload(model, config, {"metrics": metrics}), run_dir / "best.pt")
    plot_training_curves(history, run_dir / "training_curves.png", best_by_member)
    # last: compare takes a variant with metrics.json as finished (one stopped between the two never
    # got its curves)
    write_text_atomic(run_dir / "metrics.json", json_text(metrics))
    _print_metrics(console, metrics, data_name)
    for warning in split_warnings + late_warnings + learn_warnings:
        console.print(f"WARNING: {warning}", style="bold red", highlight=False, markup=False)
    logger.summary(
        _flatten("test", metrics["test"])
        | _flatten("test_tta", metrics["test_tta"])
        | {"learned": metrics["learned"], "warnings": "; ".join(metrics["warnings"])}
    )
    logger.log_image("training_curves", run_dir / "training_curves.png")
    logger.log_artifact(run_dir / "best.pt", name=f"{MODEL_ARTIFACT_PREFIX}{run_dir.name}")
    if logger.folder is not None:
        console.print(logger.where(), markup=False, highlight=False)
    return metrics


FINAL_BOOTSTRAP = 1000  # stratified bootstrap resamples for the test split's CIs in the summary


def _final_metrics(
    model,
    config: Config,
    data: PreparedData,
    runtime: Runtime,
    history,
    best_by_member,
    train_seconds,
    horns: HornCentres | None = None,
) -> dict:
    test = data.indices("test")
    results = {}
    for key, tta in (("test", None), ("test_tta", config.tta)):
        reset_roi_fallbacks(model)
        probs = predict_probs(
            model,
            data.view(test),
            config.preprocess.edge_filter,
            runtime,
            config.train.eval_batch_size,
            tta=tta,
            seed=config.train.seed,
            horns=horns.subset(test) if horns is not None else None,
        )
        results[key] = _test_entry(probs, data, test, config.train.seed) | _roi_entry(model, config.model.roi)
    if segments(model):  # Dice and IoU of the test rows with a mask (None: no such row)
        results["test"]["segmentation"] = segmentation_metrics(
            model,
            data,
            test,
            config.preprocess.edge_filter,
            runtime,
            config.train.eval_batch_size,
            FINAL_BOOTSTRAP,
            config.train.seed,
        )
    results["members"] = best_by_member
    results["train_seconds"] = train_seconds  # training steps only
    results["train_wall_seconds"] = float(sum(r["seconds"] for r in history))  # with validation
    results["train_images"] = len(history) * config.train.steps_per_epoch * config.train.batch_size
    results["precision"] = runtime.precision
    results["device"] = runtime.device.type
    results["model"] = config.model.name
    return results


def _test_entry(
    probs: dict[str, np.ndarray], data: PreparedData, test: np.ndarray, seed: int
) -> dict[str, Any]:
    """The test split's AUCs and challenge score with their bootstrap CIs, and what they rest on."""
    targets = data.targets[test]
    patients = data.patients(test)  # the bootstrap resamples patients where rows share them
    aucs = task_aucs(targets, probs, data.tasks)
    cis = bootstrap_cis(targets, probs, FINAL_BOOTSTRAP, seed=seed, tasks=data.tasks, groups=patients)
    return {
        "auc": aucs,
        "auc_ci95": {task: list(cis[task]) for task in aucs},
        "score": challenge_score(aucs, data.tasks),
        "score_ci95": list(cis["score"]),
        "n_images": len(test),  # exams with data.layout mrnet
        "unit": data.unit,
        "n_patients": len(set(patients)) if patients else len(test),
        "sample": data.unit_phrase(test),  # what the CIs rest on, for the summary
        "n_tears": int(np.nansum(targets[:, 0])),
        "undefined": undefined_reasons(aucs, probs, targets, data.tasks),
    }


def _roi_entry(model: nn.Module, roi: str) -> dict[str, Any]:
    """A ROI model's {"roi": where its horns came from, the crops made (with TTA: every copy's) and
    how many were at a fallback window (no horn found)} since reset_roi_fallbacks; {} otherwise."""
    if roi == "none":
        return {}
    images, fallbacks = roi_fallback_counts(model)
    return {"roi": {"horns": roi, "images": images, "fallbacks": fallbacks}}


def undefined_reasons(aucs: dict, probs: dict, targets: np.ndarray, tasks: TaskTable) -> list[str]:
    """Why each weighted task's AUC is undefined: no image to score, not predicted by the model, or
    one class only among the rows it is scored on (e.g. "position: no 'anterior' among the 28 tears it
    is scored on"), each class as a reader says it ('no tear', not its label '0')."""
    if not len(targets):
        return ["no image in the split"]
    reasons = []
    for task in (t for t in tasks if t.weight > 0 and math.isnan(aucs.get(t.name, math.nan))):
        if task.name not in probs:
            reasons.append(f"{task.name}: not predicted by this model")
            continue
        rows = tasks.scored_rows(targets, task.name)
        count = int(rows.sum())
        noun = "image" if task.gated_by is None else tasks[task.gated_by].noun
        if not count:
            reasons.append(f"{task.name}: no {noun} to score it on")
            continue
        missing = 0.0 if np.any(targets[rows, tasks.index(task.name)] == 1) else 1.0
        reasons.append(
            f"{task.name}: no '{task.class_name(missing)}' among the {count} {noun}"
            f"{'' if count == 1 else 's'} it is scored on"
        )
    return reasons


def _flatten(prefix: str, values: dict) -> dict:
    out = {f"{prefix}/score": values["score"]}
    out.update({f"{prefix}/auc_{t}": a for t, a in values["auc"].items()})
    return out


def _print_metrics(console: Console, metrics: dict, data_name: str) -> None:
    if not metrics["test"]["n_images"]:  # split warnings said why; every score would be undefined
        console.print(
            "test: no test scores, the test split is empty (evaluate RUN --data DIR scores the model on "
            "another data folder)",
            highlight=False,
            markup=False,
        )
        return
    for key, label in (("test", "test"), ("test_tta", "test + TTA")):
        m = metrics[key]
        aucs = "  ".join(f"{t} {'undefined' if math.isnan(a) else f'{a:.4f}'}" for t, a in m["auc"].items())
        reasons = "; ".join(m.get("undefined", [])) or "a weighted task's AUC is undefined"
        score = f"undefined ({reasons})" if math.isnan(m["score"]) else f"{m['score']:.4f}"
        console.print(
            f"{label}: AUC {aucs}  challenge score {score}  "
            f"({m.get('sample', str(m['n_images']) + ' images')}, {m['n_tears']} tears)",
            highlight=False,
        )
    if metrics["test"].get("segmentation"):
        console.print(segmentation_line(metrics["test"]["segmentation"]), highlight=False, markup=False)
    if metrics["test"].get("roi"):
        roi = metrics["test"]["roi"]
        console.print(
            f"test ROI ({roi['horns']} horns): {roi['fallbacks']} of {roi['images']} "
            f"{'slices' if metrics['test'].get('unit') == 'exams' else 'images'} cropped at the fallback windows "
            "(no horns found)",
            highlight=False,
            markup=False,
        )
    reading = result_reading(metrics["test_tta"], data_name)
    if reading:
        console.print(reading, style="bold", highlight=False, markup=False)


def segmentation_line(summary: dict) -> str:
    """'test segmentation (6 images with a mask): Dice meniscus 0.77 [0.70, 0.81], tear 0.12 [...]'."""
    parts = []
    for name, entry in summary["classes"].items():
        low, high = entry["dice_ci95"]
        ci = "" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]"
        parts.append(f"{name} {entry['dice']:.2f}{ci}")
    return f"test segmentation ({summary['n_images']} images with a mask): Dice " + ", ".join(parts)


REFERENCE_SCORE = 0.892  # the JFR 2018 entry's challenge score on its own test split of real scans


def result_reading(test: dict, data_name: str) -> str | None:
    """One line a newcomer can read: the test score with its 95% CI, on what, and the reference's."""
    low, high = test.get("score_ci95", (math.nan, math.nan))
    if math.isnan(test["score"]):
        return None
    ci = "" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]"
    return (
        f"test score {test['score']:.2f}{ci} with TTA on {data_name} "
        f"({test.get('sample', str(test['n_images']) + ' images')}, 95% bootstrap CI"
        f"{' over patients' if test.get('n_patients', test['n_images']) < test['n_images'] else ''}); "
        f"the reference reported {REFERENCE_SCORE} on real scans"
    )


def _write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    with atomic_csv_file(path) as handle:
        # every key of every row: rows resumed from a run of an older version may lack newer columns
        columns = list(dict.fromkeys(key for row in history for key in row))
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def _load_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise MeniscusError(f"cannot resume {run_dir}: no config.yaml there (is it a run folder?)")
    return saved_run_config(path)  # a run saved before a key's default changed keeps its old value


def check_registered(config: Config) -> None:
    """The config's model, trunk and task weighting are known ones (a ConfigError naming the key),
    and plug-ins keep their contracts (check_output_contract, check_weighting_contract)."""
    MODELS.check(config.model.name)
    check_trunk(config.model.trunk)
    WEIGHTINGS.check(config.train.weighting)
    check_output_contract(config.model, config.data.image_size)
    check_weighting_contract(config.train.weighting, config.model.tasks)


def training_config(
    config_file: Path | None,
    mode: str | None,
    named: list[tuple[str, str, Any]],
    settings: list[str],
    exams: bool,
) -> Config:
    """The config a `train` command asks for: its --config file, else the mode's preset
    (configs/<mode>.yaml); on exams (exams=True, no --config) configs/exams.yaml's budget merged over
    it; then the --set values, then the named options over them: (option, config key, value), e.g.
    ('--lr', 'train.lr', 0.01), those given (value not None)."""
    preset = config_file or preset_path(mode or "shared")
    given = [(f"--set {text}", *parse_set_option(text)) for text in settings]
    given += [
        (option if value is True else f"{option} {value}", key, value)
        for option, key, value in named
        if value is not None
    ]
    overrides = {key: value for _, key, value in given}  # a named option over --set of the same key
    origins = {key: origin for origin, key, _ in given}  # an error names what gave the value
    # a mode's preset counts images per step; on exams the budget is configs/exams.yaml's
    overlay = preset_path("exams") if exams and config_file is None else None
    # a misspelt model, trunk or weighting is named with the file or option that gave it
    return load_config(
        preset if preset.is_file() or config_file else None,
        overrides,
        overlay,
        origins,
        check=check_registered,
    )


def run_folder(out: Path | None, config: Config) -> Path:
    """--out, else runs/<model>-<time>; under torchrun --out is required (every process must write
    to the same folder, and each would name its own dated one)."""
    if out is None and world_size() > 1:
        raise ConfigError("under torchrun give --out: every process must write to the same run folder")
    return out or default_run_dir(config.model.name)


# What a run writes into its folder before its first checkpoint: a start that failed (bad data,
# missing weights) leaves some of them, and the same command may run into that folder again.
STARTED_RUN_ENTRIES = frozenset(
    {"config.yaml", "splits.csv", "exclusions.csv", PROBLEMS_FILE, "history.csv", "wandb", "wandb_id.txt"}
)


def check_new_run_folder(run_dir: Path) -> None:
    """A new run's --out must hold nothing but what a run's start writes: the run would replace
    files of the names it writes (someone's metrics.json, a finished run's best.pt without its
    last.pt) and mix its own with the rest (a data folder's images). A folder with a run's training
    state is train_run's to refuse (use --resume); hidden files and our temporaries are left alone."""
    if (run_dir / "last.pt").exists() or (run_dir / "members").exists():
        return
    if is_data_folder(run_dir):
        raise OutputError(
            f"--out: {run_dir} is a data folder (its label file is there): choose another --out"
        )
    if run_dir.is_dir():
        others = entries_besides(run_dir, STARTED_RUN_ENTRIES)
        if others:
            raise OutputError(
                f"--out: {run_dir} holds files that a new run would replace or sit beside ({some_of(others)}); "
                "a run writes config.yaml, history.csv, best.pt, metrics.json, ... there: choose a new or "
                "empty folder"
            )


def resume_run(run_dir: Path, options: list[str], console: Console | None = None) -> dict[str, Any]:
    """Continue a killed run with its saved config.yaml, which no option changes: `options` (the
    other options given, e.g. ['--max-epochs']) are refused rather than silently ignored."""
    if options:
        raise MeniscusError(
            f"{', '.join(options)}: not with --resume, which continues {run_dir} with its saved "
            "config.yaml; to train with other settings, start a new run (e.g. --config "
            f"{run_dir / 'config.yaml'} with the options and another --out)"
        )
    return train_run(None, run_dir, resume=True, console=console)
