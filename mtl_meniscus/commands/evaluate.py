"""Evaluation of a trained run: AUCs with bootstrap CIs, threshold metrics, cascade view, ROC plot.

Scoring rules: fissure AUC on all images; orientation and position AUC on images whose *true*
fissure is 1 (they are only defined for tears); the challenge score weights them 0.4/0.3/0.3.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from mtl_meniscus.config import DataConfig, TTAConfig, WandbConfig, tta_words
from mtl_meniscus.data.masks import MASK_TEAR
from mtl_meniscus.data.records import PreparedData, write_exclusions
from mtl_meniscus.engine.horns import label_maps, roi_hit_rates, roi_window, truth_masks
from mtl_meniscus.engine.inference import segmentation_metrics
from mtl_meniscus.engine.progress import progress_bar
from mtl_meniscus.engine.runtime import Runtime, resolve_runtime
from mtl_meniscus.engine.tracking import resolve_wandb_mode
from mtl_meniscus.engine.trained import TrainedModel, evaluation_data, load_trained
from mtl_meniscus.engine.validation_fits import calibrate_run, choose_threshold
from mtl_meniscus.errors import DataError, ImageReadError, MeniscusError
from mtl_meniscus.evaluation.calibration import calibration_summary
from mtl_meniscus.evaluation.figures import degenerate_interval
from mtl_meniscus.evaluation.metrics import (
    binary_counts,
    bootstrap_cis,
    challenge_score,
    task_aucs,
)
from mtl_meniscus.io.outputs import json_text, write_text_atomic
from mtl_meniscus.io.runlock import folder_lock
from mtl_meniscus.labels import DEFAULT_TASKS, TaskTable
from mtl_meniscus.networks.models import segments


def cascade_view(
    targets: np.ndarray, probs: dict[str, np.ndarray], threshold: float, tasks: TaskTable = DEFAULT_TASKS
) -> dict[str, Any]:
    """What the gated cascade reports for the true tears: detected, and right orientation/position
    (and any other task gated by fissure), each counted over the detected tears whose label is
    known (`<task>_known`); all right over those whose every gated label is known (`all_known`):
    a tear of unknown orientation counted as right in "both" made both outnumber orientation."""
    root = tasks.root.name
    tears = targets[:, tasks.index(root)] == 1
    detected = tears & (probs[root] >= threshold)
    view: dict[str, Any] = {"true_tears": int(tears.sum()), "detected": int(detected.sum())}
    correct, all_known = detected.copy(), detected.copy()
    for task in (t.name for t in tasks if t.gated_by == root and t.name in probs):
        column = targets[:, tasks.index(task)]
        known = detected & ~np.isnan(column)
        right = known & ((probs[task] >= 0.5) == (column == 1))
        view[f"{task}_correct"], view[f"{task}_known"] = int(right.sum()), int(known.sum())
        correct &= right
        all_known &= known
    view["all_correct"], view["all_known"] = int(correct.sum()), int(all_known.sum())
    return view


def evaluate(
    trained: TrainedModel,
    data: PreparedData,
    split: str,
    runtime: Runtime,
    tta: TTAConfig | None,
    threshold: float,
    n_bootstrap: int = 1000,
    seed: int = 0,
    console: Console | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, list[int]]:
    """Metrics of one split ('all' = every kept row).

    Returns (metrics, probs, plain_probs, targets, indices): the metrics are computed on `probs`,
    the TTA-averaged probabilities (the plain ones when TTA is off), calibrated when the run is;
    `plain_probs` are without TTA. One forward pass gives both (row 0 of the logits is the images
    as they are), and the uncalibrated probabilities for the calibration's before/after.
    """
    indices = list(range(len(data.records))) if split == "all" else list(data.indices(split))
    if not indices:
        raise MeniscusError(
            f"the {split} split of {data.data_dir} is empty ({data.split_summary()}): choose another with --split, "
            "or another data folder with --data"
        )
    targets = data.targets[indices]
    probs, plain, uncalibrated = _predict_split(trained, data.view(indices), runtime, tta, seed, console)
    tasks = data.tasks
    aucs = task_aucs(targets, probs, tasks)
    patients = data.patients(indices)  # the bootstrap resamples patients where rows share them
    cis = (
        bootstrap_cis(targets, probs, n_resamples=n_bootstrap, seed=seed, tasks=tasks, groups=patients)
        if n_bootstrap
        else {}
    )
    per_task = _per_task(targets, probs, aucs, cis, threshold, tasks, uncalibrated)
    score = challenge_score(aucs, tasks)
    metrics = {
        "split": split,
        "n_images": len(indices),
        "n_patients": len(set(patients)) if patients else len(indices),
        "sample": data.unit_phrase(indices),
        "tta_copies": tta.copies if tta else 0,
        "seed": seed,  # of the TTA copies and the bootstrap
        "fissure_threshold": threshold,
        "calibration": (
            {"temperatures": trained.calibration.temperatures, "file": str(trained.calibration.source)}
            if trained.calibration
            else None
        ),
        "tasks": per_task,
        "challenge_score": score,
        # NaN when the model does not predict a weighted task (bootstrap_cis), or with no bootstrap
        "challenge_score_ci95": list(cis.get("score", (math.nan, math.nan))),
        "cascade": cascade_view(targets, probs, threshold, tasks),
        **_segmentation_entry(trained, data, indices, runtime, n_bootstrap, seed),
        **_roi_entry(trained, data, indices, runtime, n_bootstrap, seed),
        "bootstrap_resamples": n_bootstrap,
        "bootstrap_method": "percentile; each task resampled on its own scored rows, stratified on its own class",
    }
    return metrics, probs, plain, targets, indices


def _segmentation_entry(
    trained: TrainedModel,
    data: PreparedData,
    indices: list[int],
    runtime: Runtime,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """{"segmentation": Dice and IoU per class with bootstrap CIs} for a segmenting model on the
    rows with a mask (the masks were read: evaluation_data reads them for such a model), else {}."""
    if not segments(trained.model):
        return {}
    summary = segmentation_metrics(
        trained.model,
        data,
        indices,
        trained.config.preprocess.edge_filter,
        runtime,
        trained.config.train.eval_batch_size,
        n_bootstrap,
        seed,
    )
    return {"segmentation": summary} if summary else {}


def _roi_entry(
    trained: TrainedModel,
    data: PreparedData,
    indices: list[int],
    runtime: Runtime,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """{"roi_hit_rate": engine/horns.py roi_hit_rates} on the rows whose mask has a tear: the
    classical finder's horns, and a segmenting run's predicted ones; {} when no row has such a mask
    (or the rows are exams). Masks a run did not read are read here; bad ones are named in the
    entry ("not_computed") rather than stopping an evaluation that does not need them."""
    config = trained.config.data
    if data.exams:
        return {}
    try:
        masks = truth_masks(data, indices, config.image_size, config.max_pixels)
    except DataError as err:
        return {"roi_hit_rate": {"not_computed": str(err)}}
    tears = [k for k, mask in enumerate(masks) if mask is not None and (mask == MASK_TEAR).any()]
    if not tears:
        return {}
    images = [data.images[indices[k]] for k in tears]
    maps = label_maps(trained, images, runtime, trained.config.train.eval_batch_size)
    patients = data.patients([indices[k] for k in tears])
    entry = roi_hit_rates(
        images,
        [masks[k] for k in tears],
        roi_window(config.image_size, trained.config.model),  # a ROI model's own crop
        predicted=None if maps[0] is None else maps,
        groups=patients,
        n_resamples=n_bootstrap,
        seed=seed,
    )
    return {"roi_hit_rate": entry}


# What evaluate writes into its folder, named in the refusal of a folder it did not write (--out).
EVALUATION_FILES = "metrics.json, predictions.csv, roc.png and the other figures"
EXCLUSIONS_FILE = "exclusions.csv"  # the data's rows left out (unreadable, wrong size...), as train writes it
ROI_SOURCES = {"classical": "classical finder", "predicted_mask": "predicted mask"}


def roi_line(entry: dict[str, Any]) -> str:
    """'ROI hit rate (...): classical finder 20/28 = 0.714 (95% CI 0.536-0.857), ...' from
    metrics["roi_hit_rate"]."""
    if "not_computed" in entry:
        return f"ROI hit rate not computed: {entry['not_computed']}"
    parts = []
    for source, name in ROI_SOURCES.items():
        if source in entry:
            found = entry[source]
            missing = f", no horns on {found['no_horns']}" if found["no_horns"] else ""
            parts.append(
                f"{name} {found['hits']}/{entry['n_tears']} = {_fmt(found['rate'])} "
                f"(95% CI {_ci(found['rate_ci95']) or 'undefined'}{missing})"
            )
    return (
        f"ROI hit rate (the whole tear inside the two {entry['window_px']}-px horn windows, "
        f"{entry['n_tears']} tear{'s' if entry['n_tears'] != 1 else ''} with a mask): " + "; ".join(parts)
    )


def segmentation_table(summary: dict[str, Any]) -> Table:
    """Dice and IoU per class (mean over the images where the class is defined) with their 95% CIs."""
    table = Table(title=f"segmentation, {summary['n_images']} images with a mask")
    for column in ("class", "n", "Dice", "95% CI", "IoU", "95% CI", "pooled Dice"):
        table.add_column(column, justify="right" if column != "class" else "left", no_wrap=True)
    for name, entry in summary["classes"].items():
        table.add_row(
            name,
            str(entry["n_images"]),
            _fmt(entry["dice"]),
            _ci(entry["dice_ci95"]),
            _fmt(entry["iou"]),
            _ci(entry["iou_ci95"]),
            _fmt(entry["pooled_dice"]),
        )
    return table


def _predict_split(trained: TrainedModel, images, runtime: Runtime, tta, seed: int, console: Console | None):
    """(probs, plain, uncalibrated) of evaluate, from one forward pass with a progress bar."""
    copies = tta.copies if tta else 0
    with progress_bar(console or Console(quiet=True)) as progress:
        bar = progress.add_task("predicting", total=len(images) * (copies + 1))
        logits = trained.predict_logits(
            images,
            runtime,
            tta=tta if copies else None,
            seed=seed,
            on_batch=lambda n: progress.advance(bar, n),
        )
    probs = trained.probabilities(logits)
    plain = trained.probabilities({task: z[:1] for task, z in logits.items()})  # row 0: no augmentation
    uncalibrated = trained.probabilities(logits, calibrated=False) if trained.calibration else None
    return probs, plain, uncalibrated


def write_predictions(path: Path, scored: Scored) -> None:
    """One row per scored image: labels (1 = tear / horizontal / anterior, empty where a task does
    not apply), probabilities without and with TTA (full precision) and the gated predictions."""
    data, indices, probs, plain, threshold = (
        scored.data,
        scored.indices,
        scored.probs,
        scored.plain,
        scored.threshold,
    )
    tasks = data.tasks
    names = [t for t in tasks.names if t in probs]
    header = [
        "image",
        "slice",
        "split",
        *names,
        *(tasks[t].p_column for t in names),  # predict's names: one column name per probability
        *(f"{tasks[t].p_column}_tta" for t in names),
        *(f"pred_{t}" for t in names),
    ]
    lines = []
    for k, index in enumerate(indices):
        record = data.records[index]
        labels = [
            "" if math.isnan(v) else int(v) for v in data.targets[index, [tasks.index(t) for t in names]]
        ]
        predicted = tasks.predicted_labels({t: float(probs[t][k]) for t in names}, threshold)
        lines.append(
            [
                record.image,
                "" if record.slice is None else record.slice,
                data.splits[index],
                *labels,
                *(repr(float(plain[t][k])) for t in names),
                *(repr(float(probs[t][k])) for t in names),
                # coded as the labels are (1/0), empty where the gate is closed
                *(int(tasks[t].target(predicted[t])) if predicted[t] else "" for t in names),
            ]
        )
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(lines)
    write_text_atomic(path, buffer.getvalue())


def metrics_table(metrics: dict[str, Any], title: str) -> Table:
    """Readable terminal table of an evaluation; a CI marked "!" is degenerate (see table_notes)."""
    table = Table(title=title)
    for column in ("task", "n (pos)", "AUC", "95% CI", "sens", "spec", "TP/FP/TN/FN", "ECE", "Brier"):
        table.add_column(column, justify="right" if column != "task" else "left", no_wrap=True)
    for task, m in metrics["tasks"].items():
        table.add_row(
            task,
            f"{m['n']} ({m['n_positive']})",
            _fmt(m["auc"]),
            _ci(m["auc_ci95"]) + (" !" if m.get("auc_ci95_note") else ""),
            _fmt(m["sensitivity"]),
            _fmt(m["specificity"]),
            f"{m['tp']}/{m['fp']}/{m['tn']}/{m['fn']}",
            _fmt(m["calibration"]["ece"]),
            _fmt(m["calibration"]["brier"]),
        )
    table.add_row(
        "challenge score",
        "",
        _fmt(metrics["challenge_score"]),
        _ci(metrics["challenge_score_ci95"]),
        *[""] * 5,
        style="bold",
    )
    return table


def table_notes(metrics: dict[str, Any]) -> list[str]:
    """The lines printed under the table: degenerate intervals, and calibration before/after."""
    notes = [
        f"! {task}: {m['auc_ci95_note']}" for task, m in metrics["tasks"].items() if m.get("auc_ci95_note")
    ]
    if metrics.get("calibration"):
        changes = ", ".join(
            f"{task} {m['uncalibrated']['ece']:.3f} -> {m['calibration']['ece']:.3f}"
            for task, m in metrics["tasks"].items()
            if "uncalibrated" in m
        )
        notes.append(
            f"calibrated probabilities ({metrics['calibration']['file']}); ECE before -> after: {changes}"
        )
    return notes


def _fmt(value: float) -> str:
    return "undefined" if value is None or math.isnan(value) else f"{value:.3f}"


def _ci(bounds) -> str:
    low, high = bounds
    return "" if math.isnan(low) else f"{low:.3f}-{high:.3f}"


def run_evaluation(
    run_or_checkpoint: Path,
    data_dir: Path | None = None,
    split: str = "test",
    tta_copies: int | None = None,
    threshold: float | None = None,
    youden: bool = False,
    n_bootstrap: int = 1000,
    seed: int | None = None,
    out_dir: Path | None = None,
    precision: str = "auto",
    console: Console | None = None,
    wandb_mode: str | None = None,
    cam_dir: Path | None = None,
    device: str | None = None,
    calibrate: bool = False,
) -> dict[str, Any]:
    """The `evaluate` command: metrics.json, predictions.csv, the figures, a terminal table and the
    same in wandb. --calibrate first fits the run's calibration (engine.validation_fits)."""
    console = console or Console(soft_wrap=True)
    if split not in ("test", "val", "train", "all"):
        raise MeniscusError(f"unknown split {split!r} (allowed: test, val, train, all)")
    runtime = resolve_runtime(precision, device)
    # --calibrate fits the calibration anew: a stale or broken calibration.json must not stop it
    trained = load_trained(run_or_checkpoint, runtime, calibration=not calibrate)
    resolve_wandb_mode(_wandb_config(trained, wandb_mode))  # a bad $WANDB_MODE stops here, before any work
    if cam_dir is not None and trained.saliency_refusal:  # before any work
        raise MeniscusError(f"--cam: {trained.saliency_refusal}")
    tta, seed = trained.tta(tta_copies), _own_seed(trained, seed)
    if calibrate:
        calibrate_run(trained, runtime, console)
    threshold = choose_threshold(trained, runtime, youden, threshold, console)
    data, note = evaluation_data(trained, data_dir, split)
    out_dir = Path(out_dir) if out_dir else _default_out_dir(trained, data, split)
    # one evaluation per folder: two writing it at once mixed their files (one's metrics.json
    # beside the other's predictions.csv)
    with folder_lock(out_dir, "evaluation folder"):
        notes = (note, threshold.describe(tta.copies), trained.calibration_note, trained.in_training_note)
        for line in (_data_line(data, out_dir), *filter(None, notes)):
            console.print(line, highlight=False, markup=False)
        training_warnings = _show_training_warnings(trained, console)
        metrics, probs, plain, targets, indices = evaluate(
            trained, data, split, runtime, tta, threshold.value, n_bootstrap, seed, console
        )
        metrics |= {"training_warnings": training_warnings} if training_warnings else {}
        metrics |= {"fissure_threshold_source": threshold.source, "checkpoint": str(trained.checkpoint)}
        metrics |= {"data": str(data.data_dir)} | ({"data_note": note} if note else {})
        scored = Scored(data, indices, probs, plain, targets, threshold.value)
        if cam_dir is not None:
            metrics["cam_peak_in_tear"] = write_cams_and_check_peaks(trained, scored, runtime, Path(cam_dir))
            _print_cam_check(console, metrics["cam_peak_in_tear"], cam_dir)
        figures = _write_outputs(out_dir, metrics, scored, trained, runtime, seed)
        _show(console, metrics, out_dir, figures, tta)
        logged = _log_to_wandb(trained, out_dir, metrics, scored, figures, wandb_mode, cam_dir)
    if logged:
        console.print(logged, highlight=False, markup=False)
    return metrics


def _data_line(data: PreparedData, out_dir: Path) -> str:
    """'data DIR: kept N of M images; excluded K (...) (report: OUT/exclusions.csv)'."""
    report = f" (report: {out_dir / EXCLUSIONS_FILE})" if data.exclusions else ""
    return f"data {data.data_dir}: {data.exclusion_summary()}{report}"


def _own_seed(trained: TrainedModel, seed: int | None) -> int:
    """--seed, else the run's training seed: train drew its test split's TTA copies and bootstrap
    with it, so `evaluate RUN` repeats the test figures in the run's metrics.json."""
    return trained.config.train.seed if seed is None else seed


@dataclass
class Scored:
    """What an evaluation scored: the rows, their probabilities (with TTA and calibration; `plain`
    without TTA), their targets and the fissure threshold."""

    data: PreparedData
    indices: list[int]
    probs: dict[str, np.ndarray]
    plain: dict[str, np.ndarray]
    targets: np.ndarray
    threshold: float

    def thresholds(self) -> dict[str, float]:
        """Each task's cut: the fissure threshold for the root task, 0.5 for the gated ones."""
        root = self.data.tasks.root.name
        return {task: self.threshold if task == root else 0.5 for task in self.probs}


def _show_training_warnings(trained: TrainedModel, console: Console) -> list[str]:
    """Print the warnings the run's training recorded (its splits, whether it learned): they
    qualify the numbers evaluate gives too. Returns them, for metrics.json."""
    warnings = [str(warning) for warning in trained.training_record.get("warnings") or []]
    for warning in warnings:
        console.print(f"warning (from training): {warning}", style="yellow", highlight=False, markup=False)
    return warnings


def _default_out_dir(trained: TrainedModel, data, split: str) -> Path:
    """RUN/eval-<split>; on another data folder RUN/eval-<split>-<its name>, so that the run's own
    held-out evaluation is not replaced by one on other data (nor by another checkpoint's:
    _evaluation_folder)."""
    own = trained.trained_on(data.data_dir)
    return _evaluation_folder(trained, split if own else f"{split}-{Path(data.data_dir).resolve().name}")


def _evaluation_folder(trained: TrainedModel, what: str) -> Path:
    """RUN/eval-<what> for the run's best.pt; RUN/eval-<what>-<checkpoint> for another checkpoint
    (last.pt: eval-test-last), which must not replace best.pt's evaluation."""
    name = f"eval-{what}" + ("" if trained.checkpoint.name == "best.pt" else f"-{trained.checkpoint.stem}")
    return (trained.run_dir or trained.checkpoint.parent) / name


def _write_outputs(
    out_dir: Path, metrics, scored: Scored, trained: TrainedModel, runtime, seed: int
) -> list[Path]:
    """metrics.json, predictions.csv and the figures (PNG + PDF) in out_dir; returns the PNGs.
    An earlier evaluation's metrics.json goes first and the new one is written last: a folder whose
    writing failed (a full disk) holds no metrics.json beside a mix of new and old files."""
    from mtl_meniscus.evaluation.figures import confusion_figure, pr_figure, reliability_figure, roc_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").unlink(missing_ok=True)
    exclusions = out_dir / EXCLUSIONS_FILE
    if scored.data.exclusions:  # the rows no figure counts, each with its reason
        scored.data.write_exclusions(exclusions)
        metrics["excluded_rows"] = len(scored.data.exclusions)
    else:
        exclusions.unlink(missing_ok=True)  # an earlier evaluation's, of other data
    write_predictions(out_dir / "predictions.csv", scored)
    tasks, targets, probs = scored.data.tasks, scored.targets, scored.probs
    intervals = {task: m["auc_ci95"] for task, m in metrics["tasks"].items()}
    patients = scored.data.patients(scored.indices)
    roc_figure(
        targets, probs, tasks, scored.thresholds(), intervals, out_dir / "roc.png", patients, seed=seed
    )
    pr_figure(targets, probs, tasks, out_dir / "pr.png")
    confusion_figure(metrics["tasks"], tasks, out_dir / "confusion.png")
    reliability = {
        task: {
            "calibrated": m["calibration"],
            **({"uncalibrated": m["uncalibrated"]} if "uncalibrated" in m else {}),
        }
        for task, m in metrics["tasks"].items()
    }
    reliability_figure(reliability, out_dir / "reliability.png")
    figures = [out_dir / name for name in ("roc.png", "pr.png", "confusion.png", "reliability.png")]
    figures += write_galleries(trained, scored, runtime, out_dir)
    write_text_atomic(out_dir / "metrics.json", json_text(metrics))  # last: the evaluation is whole
    return figures


def _show(console: Console, metrics, out_dir: Path, figures: list[Path], tta) -> None:
    """The terminal summary: the table, its notes, the cascade and what was written."""
    title = (
        f"{metrics['split']} split, {metrics['sample']}, {tta_words(tta.copies)}, "
        f"fissure threshold {metrics['fissure_threshold']:.3f}"
    )
    console.print(metrics_table(metrics, title))
    if metrics.get("segmentation"):
        console.print(segmentation_table(metrics["segmentation"]))
    if metrics.get("roi_hit_rate"):
        console.print(roi_line(metrics["roi_hit_rate"]), highlight=False, markup=False)
    for line in table_notes(metrics):
        console.print(line, highlight=False, markup=False)
    console.print(cascade_line(metrics["cascade"]), highlight=False)
    console.print(
        f"wrote {out_dir / 'metrics.json'}, predictions.csv and the figures "
        f"{', '.join(path.stem for path in figures)} (.png and .pdf)",
        highlight=False,
        markup=False,
    )


def _per_task(
    targets, probs, aucs, cis, threshold: float, tasks, uncalibrated=None
) -> dict[str, dict[str, Any]]:
    """Each task's AUC and CI (with a note when too few images of a class make it degenerate), its
    counts, its confusion at its threshold (the fissure threshold for the root task, 0.5 for the
    others) and its calibration (and, for a calibrated run, the network's own before it)."""
    per_task = {}
    for task in (t for t in tasks.names if t in probs):
        rows = tasks.scored_rows(targets, task)
        cut = threshold if task == tasks.root.name else 0.5
        y = targets[rows, tasks.index(task)]
        n_positive = int(np.sum(y == 1))
        per_task[task] = {
            "auc": aucs[task],
            "auc_ci95": list(cis.get(task, (math.nan, math.nan))),
            "auc_ci95_note": degenerate_interval(n_positive, len(y) - n_positive),
            "n": int(rows.sum()),
            "n_positive": n_positive,
            "threshold": cut,
            **binary_counts(y, probs[task][rows], cut),
            "calibration": calibration_summary(y, probs[task][rows]),
        }
        if uncalibrated is not None:
            per_task[task]["uncalibrated"] = calibration_summary(y, uncalibrated[task][rows])
    return per_task


def _print_cam_check(console: Console, hit: dict[str, Any], cam_dir: Path) -> None:
    if hit["n"]:
        console.print(
            f"saliency (LayerCAM): fissure peak inside the dilated tear mask on {hit['hits']}/{hit['n']} "
            f"true-positive images ({hit['rate']:.1%}); overlays in {cam_dir}"
        )


def cascade_line(view: dict[str, int]) -> str:
    """'cascade: 20/28 true tears detected; of those, orientation right 18, position right 19, both
    right 17' from metrics["cascade"]; a count over fewer tears (labels unknown) says of how many,
    e.g. 'orientation right 1 of 2 known'."""
    detected = view["detected"]

    def right(key: str) -> str:
        known = view.get(f"{key}_known", detected)  # metrics of older runs have no _known
        return f"right {view[f'{key}_correct']}" + (f" of {known} known" if known != detected else "")

    gated = [
        f"{key.removesuffix('_correct')} {right(key.removesuffix('_correct'))}"
        for key in view
        if key.endswith("_correct") and key != "all_correct"
    ]
    line = f"cascade: {detected}/{view['true_tears']} true tears detected"
    if gated:  # each gated task's count, then all of them at once
        every = "both" if len(gated) == 2 else "all"
        line += "; of those, " + ", ".join(gated) + f", {every} {right('all')}"
    return line


def write_cams_and_check_peaks(
    trained: TrainedModel, scored: Scored, runtime: Runtime, cam_dir: Path, dilation_px: int = 5
) -> dict[str, Any]:
    """Saliency (LayerCAM) overlays of every evaluated image; on true positives with a tear mask, how often the
    fissure map's peak falls inside the tear mask dilated by `dilation_px` pixels."""
    from mtl_meniscus.networks.cam import peak_in_mask, unique_names, write_overlays

    data, root = scored.data, scored.data.tasks.root.name
    hits = checked = 0
    names = unique_names(
        [data.records[i].image for i in scored.indices], lambda p: Path(p).stem
    )  # no overwrites
    for k, index in enumerate(scored.indices):
        image = data.images[index]
        cams = trained.saliency(image, runtime)
        write_overlays(cam_dir, names[k], image, cams)
        true_positive = data.targets[index, 0] == 1 and scored.probs[root][k] >= scored.threshold
        mask = tear_mask(data, index, trained.config.data) if true_positive else None
        if mask is not None:
            checked += 1
            hits += peak_in_mask(cams[root], mask, dilation_px)
    return {
        "n": checked,
        "hits": hits,
        "rate": hits / checked if checked else float("nan"),
        "dilation_px": dilation_px,
    }


def tear_mask(data: PreparedData, index: int, config: DataConfig) -> np.ndarray | None:
    """(image_size, image_size) bool: the tear (mask value 2) of row `index` at the model's size and
    in its image's canonical view, as the images are; None when the row has no mask or a bad one
    (evaluate's ROI entry names it). It was the file's pixels as stored: a mask of another size than
    the model's was dropped, a mirrored image's mask kept unmirrored."""
    try:
        (mask,) = truth_masks(data, [index], config.image_size, config.max_pixels)
    except DataError:
        return None
    return None if mask is None else mask == MASK_TEAR


GALLERY_SIZE = 8


def write_galleries(trained: TrainedModel, scored: Scored, runtime: Runtime, out_dir: Path) -> list[Path]:
    """errors.png: the fissure task's false positives and false negatives, most confident first, then
    the correct images nearest the threshold; saliency.png: the detected tears with the fissure
    saliency (LayerCAM) and the tear mask's outline. Captions give probability and truth. Slice
    models only (an exam has no single image to show)."""
    from mtl_meniscus.evaluation.figures import GalleryItem, gallery_figure

    if trained.config.model.exam_pooling is not None:
        return []
    root, data = scored.data.tasks.root.name, scored.data
    p = scored.probs[root]
    y = scored.targets[:, data.tasks.index(root)]
    predicted = p >= scored.threshold
    confidence = np.abs(p - scored.threshold)
    false_pos = sorted(np.flatnonzero(predicted & (y == 0)), key=lambda k: -confidence[k])
    false_neg = sorted(np.flatnonzero(~predicted & (y == 1)), key=lambda k: -confidence[k])
    correct = sorted(np.flatnonzero(predicted == (y == 1)), key=lambda k: confidence[k])
    true_pos = sorted(np.flatnonzero(predicted & (y == 1)), key=lambda k: -p[k])

    def item(k: int, kind: str, saliency: bool = False) -> GalleryItem:
        index = scored.indices[k]
        image = data.images[index]
        truth = data.tasks[root].class_name(float(y[k]))
        return GalleryItem(
            image,
            f"{kind} p={p[k]:.2f} ({truth})\n{Path(data.records[index].image).name}",
            trained.saliency(image, runtime, [root])[root] if saliency else None,
            tear_mask(data, index, trained.config.data),
        )

    # the shown images only: an item reads the row's mask (and its image) from disk again
    shown = (
        [(k, "FP") for k in false_pos] + [(k, "FN") for k in false_neg] + [(k, "correct") for k in correct]
    )
    errors = [item(k, kind) for k, kind in shown[:GALLERY_SIZE]]
    written = [out_dir / "errors.png", out_dir / "saliency.png"]
    title = f"{root}: false positives and negatives first ({len(false_pos)} FP, {len(false_neg)} FN), threshold {scored.threshold:.2f}"
    gallery_figure(errors, title, written[0])
    if trained.saliency_refusal:  # a plug-in model: the figure of errors only
        return written[:1]
    detected = [item(k, "TP", saliency=True) for k in true_pos[:GALLERY_SIZE]]
    gallery_figure(detected, f"{root} saliency (LayerCAM) on detected tears; green: tear mask", written[1])
    return [path for path in written if path.is_file()]


def _log_to_wandb(
    trained: TrainedModel,
    out_dir: Path,
    metrics: dict,
    scored: Scored,
    figures: list[Path],
    wandb_mode: str | None,
    cam_dir: str | Path | None,
) -> str | None:
    """One 'evaluate' run in its training run's group: the settings in the config, the metrics in the
    summary, wandb's own ROC/PR/confusion charts, the figures as media, the per-image table, and
    which model it scored. Returns where the run is (RunLogger.where), None when nothing was logged."""
    from mtl_meniscus.engine.tracking import RunLogger

    settings = {
        key: value for key, value in metrics.items() if key not in ("tasks", "cascade") and "score" not in key
    }
    name = f"eval-{out_dir.parent.name}-{metrics['split']}"
    logger = RunLogger(_wandb_config(trained, wandb_mode), out_dir, name, settings)
    try:
        logger.record_model(trained.checkpoint, trained.run_dir)
        logger.summary(summary_values(metrics))
        for task in scored.probs:
            rows = scored.data.tasks.scored_rows(scored.targets, task)
            y = scored.targets[rows, scored.data.tasks.index(task)].astype(int)
            classes = [scored.data.tasks[task].class_name(0.0), scored.data.tasks[task].class_name(1.0)]
            logger.log_charts(task, y, scored.probs[task][rows], scored.thresholds()[task], classes)
        for path in figures:
            logger.log_image(f"figures/{path.stem}", path)
        _log_predictions_table(logger, out_dir, cam_dir)
        return logger.where() if logger.folder is not None else None
    finally:
        logger.finish()


def _wandb_config(trained: TrainedModel, wandb_mode: str | None) -> WandbConfig:
    """The run's wandb settings with job type 'evaluate', in its training's group; `wandb_mode`
    (--wandb) over the run's mode."""
    config = trained.config
    group = config.wandb.group or (trained.run_dir.name if trained.run_dir else None)
    return config.wandb.model_copy(
        update={"job_type": "evaluate", "group": group, **({"mode": wandb_mode} if wandb_mode else {})}
    )


def summary_values(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers of an evaluation, flat ("fissure/auc", "fissure/auc_ci_low", ..., "challenge_score"),
    for wandb's summary, where runs are compared."""
    values: dict[str, Any] = {
        "challenge_score": metrics["challenge_score"],
        "challenge_score_ci_low": metrics["challenge_score_ci95"][0],
        "challenge_score_ci_high": metrics["challenge_score_ci95"][1],
    }
    for source, found in metrics.get("roi_hit_rate", {}).items():
        if source in ROI_SOURCES:
            values[f"roi/{source}_hit_rate"] = found["rate"]
    for task, m in metrics["tasks"].items():
        low, high = m["auc_ci95"]
        values |= {
            f"{task}/auc": m["auc"],
            f"{task}/auc_ci_low": low,
            f"{task}/auc_ci_high": high,
            f"{task}/sensitivity": m["sensitivity"],
            f"{task}/specificity": m["specificity"],
            f"{task}/ece": m["calibration"]["ece"],
            f"{task}/brier": m["calibration"]["brier"],
            f"{task}/n": m["n"],
            f"{task}/n_positive": m["n_positive"],
        }
    return values


def _log_predictions_table(logger, out_dir: Path, cam_dir: str | Path | None) -> None:
    """One row per evaluated image, as in predictions.csv, plus the fissure saliency overlay."""
    from mtl_meniscus.networks.cam import unique_names

    with (out_dir / "predictions.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0]) if rows else []
    overlays = [None] * len(rows)
    if cam_dir is not None and rows:
        names = unique_names([r["image"] for r in rows], lambda p: Path(p).stem)
        overlays = [Path(cam_dir) / f"{name}_fissure.png" for name in names]
        overlays = [p if p.is_file() else None for p in overlays]
    logger.log_table(
        "predictions",
        [*columns, "fissure_saliency"],
        [[*r.values(), overlay] for r, overlay in zip(rows, overlays)],
        image_columns=("fissure_saliency",),
    )


def run_exam_evaluation(
    run_or_checkpoint: Path,
    mrnet_dir: Path,
    split: str = "valid",
    tta_copies: int | None = None,
    n_bootstrap: int = 1000,
    seed: int | None = None,
    out_dir: Path | None = None,
    precision: str = "auto",
    console: Console | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """A model on MRNet exams: the exam tear probability of a slice model is its slices' highest
    (max pooling), an exam model's is its own output (TrainedModel.predict_exam); exam-level AUC
    with a stratified bootstrap 95% CI; metrics.json and predictions.csv."""
    from mtl_meniscus.data.mrnet import read_mrnet

    console = console or Console(soft_wrap=True)
    exams = read_mrnet(mrnet_dir, split)
    runtime = resolve_runtime(precision, device)
    trained = load_trained(run_or_checkpoint, runtime)
    tta = trained.tta(tta_copies)
    seed = _own_seed(trained, seed)
    out_dir = Path(out_dir) if out_dir else _evaluation_folder(trained, f"mrnet-{split}")
    with folder_lock(out_dir, "evaluation folder"):  # as run_evaluation
        tasks = trained.tasks
        root = tasks.root.name
        exams, probs, tops, sizes, excluded = _predict_exams(trained, mrnet_dir, exams, runtime, tta, seed)
        # exam rows with only the tear known: the same AUC and per-class bootstrap as for slices
        targets = np.full((len(exams), len(tasks)), np.nan)
        targets[:, tasks.index(root)] = [e.tear for e in exams]
        scores = {root: np.array(probs)}
        ci = bootstrap_cis(targets, scores, n_resamples=n_bootstrap, seed=seed, tasks=tasks)[root]
        note = _training_exams_note(trained, mrnet_dir, split)
        metrics = {
            "data": str(mrnet_dir),
            "split": split,
            **({"data_note": note} if note else {}),
            "n_exams": len(exams),
            "n_tears": sum(e.tear for e in exams),
            "pooling": trained.exam_rule,
            "tta_copies": tta.copies,
            "seed": seed,  # of the TTA copies and the bootstrap
            "auc": task_aucs(targets, scores, tasks)[root],
            "auc_ci95": list(ci),
            "bootstrap_resamples": n_bootstrap,
            "checkpoint": str(trained.checkpoint),
        }
        _write_exam_outputs(out_dir, exams, probs, tops, sizes, metrics, excluded, console)
        low, high = metrics["auc_ci95"]
        if note:
            console.print(f"! {note}", highlight=False, markup=False)
        console.print(
            f"MRNet {split}: {len(exams)} exams ({metrics['n_tears']} tears), exam-level tear AUC "
            f"{_fmt(metrics['auc'])} (95% CI {_fmt(low)}-{_fmt(high)}), {tta_words(tta.copies)} -> {out_dir}",
            highlight=False,
        )
    return metrics


def _training_exams_note(trained: TrainedModel, mrnet_dir: Path, split: str) -> str:
    """A notice when `--split train` scores the exams the run trained on: a run trained with
    --mrnet on this folder learnt from its train folder (split into the run's train and val, the
    val exams choosing the checkpoint), so an AUC there is not a held-out figure; '' otherwise."""
    data = trained.config.data
    if split != "train" or data.layout != "mrnet" or not trained.trained_on(mrnet_dir):
        return ""
    return (
        f"these are the run's training exams (the train folder of {data.path}, which the run split into "
        "its train and val): this AUC is not a held-out figure; the run's test split is MRNet's valid "
        "folder (--split valid, the default)"
    )


def _predict_exams(trained, mrnet_dir: Path, exams, runtime, tta, seed):
    """(the exams read, and of each its tear probability, most suspicious slice and number of
    slices; the exams set aside as (file, reason)). An exam that cannot be read is set aside, as
    train sets it aside, not the end of an evaluation that had read the others; none read is an
    error naming the first."""
    from mtl_meniscus.data.mrnet import exclusion_reason, read_mrnet_exam

    root, data = trained.tasks.root.name, trained.config.data
    kept, probs, tops, sizes, excluded = [], [], [], [], []
    for exam in exams:
        try:
            volume = read_mrnet_exam(exam.path, data.max_pixels, data.image_size, data.plane)
        except ImageReadError as err:
            excluded.append((Path(exam.path).relative_to(mrnet_dir).as_posix(), exclusion_reason(err)))
            continue
        # predict --exams' draws: copy k of every slice of every exam alike, whatever the exam's place
        found = trained.predict_exam(volume, runtime, tta=tta, seed=seed, same_draws=True)
        kept.append(exam)
        probs.append(found.exam[root])
        tops.append(found.top_slice)
        sizes.append(len(found.slices[root]))
    if not kept:
        raise MeniscusError(
            f"{mrnet_dir}: no exam could be read ({len(excluded)} set aside: {excluded[0][1]})"
        )
    return kept, probs, tops, sizes, excluded


def _write_exam_exclusions(
    path: Path, excluded: list[tuple[str, str]], metrics: dict, console: Console
) -> None:
    """The exams set aside, as train's exclusions.csv lists them, their count in the metrics and a
    line saying so; an earlier evaluation's file is removed when none was."""
    if not excluded:
        path.unlink(missing_ok=True)
        return
    console.print(
        f"set aside {len(excluded)} exam{'s' if len(excluded) > 1 else ''} that could not be scored "
        f"(e.g. {excluded[0][0]}, {excluded[0][1].split(':')[0]}; report: {path})",
        highlight=False,
        markup=False,
    )
    write_exclusions(path, [(name, None, reason) for name, reason in excluded])
    metrics["excluded_exams"] = len(excluded)


def _write_exam_outputs(
    out_dir: Path, exams, probs, tops, sizes, metrics: dict, excluded: list[tuple[str, str]], console: Console
) -> None:
    """exclusions.csv and predictions.csv of the exams, then metrics.json: last, the evaluation is
    whole (an earlier one's goes first)."""
    (out_dir / "metrics.json").unlink(missing_ok=True)
    _write_exam_exclusions(out_dir / EXCLUSIONS_FILE, excluded, metrics, console)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "tear", "p_fissure", "top_slice", "slices"])
    writer.writerows([e.case, e.tear, repr(p), t, s] for e, p, t, s in zip(exams, probs, tops, sizes))
    write_text_atomic(out_dir / "predictions.csv", buffer.getvalue())
    write_text_atomic(out_dir / "metrics.json", json_text(metrics))
