"""What `evaluate` fits on a run's validation split and saves in the run folder, for every later
command (evaluate, predict, export, serve) to apply: the temperatures of calibration.json and the
fissure threshold of threshold.json. Both are fitted on the run's own validation split with the
run's test-time augmentation, never on the split being scored."""

from __future__ import annotations

import json

import numpy as np
from rich.console import Console

from mtl_meniscus.engine.runtime import Runtime
from mtl_meniscus.engine.trained import (
    CALIBRATION_FILE,
    THRESHOLD_FILE,
    Threshold,
    TrainedModel,
    evaluation_data,
    read_calibration,
    resolve_threshold,
)
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.evaluation.calibration import (
    TEMPERATURE_RANGE,
    fit_temperature,
    negative_log_likelihood,
    scaled_probability,
)
from mtl_meniscus.evaluation.metrics import youden_threshold
from mtl_meniscus.io.outputs import json_text, write_text_atomic


def validation_split(trained: TrainedModel, what: str, console: Console):
    """(data, row indices) of the run's own validation split; `what` says what is fitted on it
    ("--youden picks the threshold")."""
    if trained.run_dir is None:
        raise MeniscusError(f"{what} on the run's validation split, so it needs a run folder")
    data, note = evaluation_data(trained, None, "val", scored=False)
    if note:
        console.print(note, highlight=False, markup=False)
    val = data.indices("val")
    if not len(val):
        raise MeniscusError(f"{what} on the val split, and the val split of {trained.run_dir} is empty")
    return data, val


def keep_other_checkpoints_fit(trained: TrainedModel, option: str, *files: str) -> None:
    """Refuse to replace a calibration.json or threshold.json fitted for another checkpoint of the
    run: predict, export and serve apply the one fitted for best.pt, and a fit for last.pt written
    over it would leave them uncalibrated, or with last.pt's threshold, without a word."""
    for name in files:
        path = trained.run_dir / name
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):  # none, or broken: nothing worth keeping
            continue
        # a file from before fits named their checkpoint applies to the one that reads it, and
        # predict, export and serve read best.pt (TrainedModel.saved_threshold)
        fitted_for = record.get("checkpoint", "best.pt") if isinstance(record, dict) else None
        if fitted_for is not None and fitted_for != trained.checkpoint.name:
            raise MeniscusError(
                f"{option}: {path} was fitted for {fitted_for}, and predict, export and serve apply it; "
                f"fitting it for {trained.checkpoint.name} would replace it. Use {fitted_for}, or move "
                f"{name} aside first"
            )


def calibrate_run(trained: TrainedModel, runtime: Runtime, console: Console) -> None:
    """Fit one temperature per task on the validation split (each task on its scored rows, with the
    run's TTA), save calibration.json and apply it to `trained`. A task with one class in the split
    keeps T = 1. A saved threshold.json is chosen again, on the calibrated probabilities."""
    data, val = validation_split(trained, "--calibrate fits the temperatures", console)
    keep_other_checkpoints_fit(trained, "--calibrate", CALIBRATION_FILE, THRESHOLD_FILE)
    tta = trained.config.tta
    logits = trained.predict_logits(data.view(val), runtime, tta=tta, seed=0)  # {task: (copies+1, N)}
    targets, tasks = data.targets[val], data.tasks
    fits = {}
    for task, task_logits in logits.items():
        rows = tasks.scored_rows(targets, task)
        y, z = targets[rows, tasks.index(task)], task_logits[:, rows]
        n_positive = int(np.sum(y == 1))
        if n_positive in (0, len(y)):
            console.print(
                f"calibration: {task} has one class in the val split; left at T = 1", highlight=False
            )
            continue
        t = fit_temperature(y, z)
        fits[task] = {
            "temperature": t,
            "n": len(y),
            "n_positive": n_positive,
            "nll_before": negative_log_likelihood(y, scaled_probability(z, 1.0)),
            "nll_after": negative_log_likelihood(y, scaled_probability(z, t)),
        }
        if not TEMPERATURE_RANGE[0] * 1.01 < t < TEMPERATURE_RANGE[1] * 0.99:
            console.print(
                f"warning: calibration: {task}'s temperature {t:.3g} is at an end of the searched range "
                f"{TEMPERATURE_RANGE}: the logits separate its validation rows perfectly (T small) or say "
                "nothing about them (T large: has the network learned this task?)",
                style="yellow",
                highlight=False,
                markup=False,
            )
    record = {
        "temperatures": {task: fit["temperature"] for task, fit in fits.items()},
        "fits": fits,
        "method": "temperature scaling: p = mean over TTA copies of sigmoid(logit / T), T minimising the NLL",
        "split": "val",
        "tta_copies": tta.copies,
        "tta_seed": 0,
        "checkpoint": trained.checkpoint.name,
        "checkpoint_sha256": trained.checkpoint_sha256,
    }
    write_text_atomic(trained.run_dir / CALIBRATION_FILE, json_text(record))
    trained.calibration = read_calibration(trained.run_dir, trained.checkpoint, trained.checkpoint_sha256)
    console.print(trained.calibration.describe(), highlight=False, markup=False)
    for task, fit in fits.items():
        console.print(
            f"  {task}: validation NLL {fit['nll_before']:.4f} -> {fit['nll_after']:.4f} "
            f"({fit['n']} rows, {fit['n_positive']} positive)",
            highlight=False,
        )
    if (trained.run_dir / THRESHOLD_FILE).is_file():
        threshold = choose_threshold(trained, runtime, youden=True, given=None, console=console)
        console.print(f"threshold.json chosen again on the calibrated probabilities: {threshold.value:.3f}")


def choose_threshold(
    trained: TrainedModel, runtime: Runtime, youden: bool, given: float | None, console: Console
) -> Threshold:
    """--threshold if given; with --youden the Youden-J threshold on the run's validation split,
    with the run's test-time augmentation and calibration (saved as threshold.json in the run);
    else the run's saved threshold, else 0.5."""
    if given is not None or not youden:
        return resolve_threshold(trained, given)
    data, val = validation_split(trained, "--youden picks the threshold", console)
    keep_other_checkpoints_fit(trained, "--youden", THRESHOLD_FILE)
    truth = data.targets[val, data.tasks.index(data.tasks.root.name)]
    tears = int(np.nansum(truth))
    if tears in (0, len(val)):  # youden_threshold would return 0.5, saved as if J had chosen it
        raise MeniscusError(
            f"--youden: the val split of {trained.run_dir} has {tears} tears in {len(val)} images: "
            "Youden's J needs both classes; give --threshold, or keep the saved threshold"
        )
    tta = trained.config.tta
    probs = trained.predict(data.view(val), runtime, tta=tta, seed=0)
    root = data.tasks.root.name
    value = youden_threshold(truth, probs[root])
    record = {
        "fissure_threshold": value,
        "chosen_by": "youden_j",
        "split": "val",
        "n_images": len(val),
        "n_tears": tears,
        "tta_copies": tta.copies,
        "tta_seed": 0,
        "fissure_temperature": trained.calibration.temperature(root) if trained.calibration else 1.0,
        "checkpoint": trained.checkpoint.name,
        "checkpoint_sha256": trained.checkpoint_sha256,
    }
    write_text_atomic(trained.run_dir / THRESHOLD_FILE, json_text(record))
    return trained.saved_threshold
