"""Evaluation of a trained run: AUCs with bootstrap CIs, threshold metrics, cascade view, ROC plot.

Scoring rules: fissure AUC on all images; orientation and position AUC on images whose *true*
fissure is 1 (they are only defined for tears); the challenge score weights them 0.4/0.3/0.3.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from mtl_meniscus.config import TTAConfig
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.data.records import PreparedData
from mtl_meniscus.engine.run import reading_progress
from mtl_meniscus.engine.runtime import Runtime, resolve_runtime
from mtl_meniscus.engine.trained import (
    THRESHOLD_FILE,
    Threshold,
    TrainedModel,
    load_trained,
    resolve_threshold,
)
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.evaluation.metrics import (
    binary_counts,
    bootstrap_cis,
    challenge_score,
    roc_points,
    task_aucs,
    youden_threshold,
)
from mtl_meniscus.io.outputs import json_text, write_text_atomic
from mtl_meniscus.labels import DEFAULT_TASKS, TaskTable


def cascade_view(
    targets: np.ndarray, probs: dict[str, np.ndarray], threshold: float, tasks: TaskTable = DEFAULT_TASKS
) -> dict[str, Any]:
    """What the gated cascade reports for the true tears: detected, and right orientation/position
    (and any other task gated by fissure)."""
    root = tasks.root.name
    tears = targets[:, tasks.index(root)] == 1
    detected = tears & (probs[root] >= threshold)
    view: dict[str, Any] = {"true_tears": int(tears.sum()), "detected": int(detected.sum())}
    correct = detected.copy()
    for task in (t.name for t in tasks if t.gated_by == root and t.name in probs):
        column = targets[:, tasks.index(task)]
        known = detected & ~np.isnan(column)
        right = known & ((probs[task] >= 0.5) == (column == 1))
        view[f"{task}_correct"] = int(right.sum())
        correct &= right | ~known
    view["all_correct"] = int(correct.sum())
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
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, list[int]]:
    """Metrics of one split ('all' = every kept row).

    Returns (metrics, probs, plain_probs, targets, indices): the metrics are computed on `probs`,
    the TTA-averaged probabilities (the plain ones when TTA is off); `plain_probs` are without TTA.
    """
    indices = list(range(len(data.records))) if split == "all" else list(data.indices(split))
    if not indices:
        raise MeniscusError(f"the {split} split of {data.data_dir} is empty")
    targets = data.targets[indices]
    images = data.view(indices)
    plain = trained.predict(images, runtime)
    probs = trained.predict(images, runtime, tta=tta, seed=seed) if tta and tta.copies else plain
    tasks = data.tasks
    aucs = task_aucs(targets, probs, tasks)
    patients = data.patients(indices)  # the bootstrap resamples patients where rows share them
    cis = (
        bootstrap_cis(targets, probs, n_resamples=n_bootstrap, seed=seed, tasks=tasks, groups=patients)
        if n_bootstrap
        else {}
    )
    per_task = _per_task(targets, probs, aucs, cis, threshold, tasks)
    score = challenge_score(aucs, tasks)
    metrics = {
        "split": split,
        "n_images": len(indices),
        "n_patients": len(set(patients)) if patients else len(indices),
        "sample": data.unit_phrase(indices),
        "tta_copies": tta.copies if tta else 0,
        "fissure_threshold": threshold,
        "tasks": per_task,
        "challenge_score": score,
        # undefined (NaN) when the model does not predict a weighted task, and so is its interval
        "challenge_score_ci95": [math.nan, math.nan]
        if math.isnan(score)
        else list(cis.get("score", (math.nan, math.nan))),
        "cascade": cascade_view(targets, probs, threshold, tasks),
        "bootstrap_resamples": n_bootstrap,
        "bootstrap_method": "percentile; each task resampled on its own scored rows, stratified on its own class",
    }
    return metrics, probs, plain, targets, indices


def write_predictions(
    path: Path,
    data: PreparedData,
    indices: list[int],
    probs: dict[str, np.ndarray],
    plain: dict[str, np.ndarray],
    threshold: float,
) -> None:
    """One row per scored image: labels (1 = tear / horizontal / anterior, empty where a task does
    not apply), probabilities without and with TTA (full precision) and the gated predictions."""
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
                *(predicted[t] for t in names),
            ]
        )
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(lines)
    write_text_atomic(path, buffer.getvalue())


def evaluation_data(trained: TrainedModel, data_dir: Path | None, split: str) -> tuple[PreparedData, str]:
    """The data to score and a note on it.

    The run's own data (no --data, or --data naming the run's folder) keeps the splits the run
    was trained with, read from its splits.csv: a recomputed split can move training images
    into the test split when labels.csv has changed. Another folder is split by its own rules.
    """
    config = trained.config
    own_dir = Path(config.data.path) if config.data.path else None
    folder = data_dir if data_dir is not None else own_dir
    if folder is None:
        raise MeniscusError("this checkpoint does not record its data folder; pass --data DIR")
    with reading_progress(Console(soft_wrap=True), "reading the data") as on_row:
        data = prepare_data(folder, config.data, on_row=on_row)
    is_own = own_dir is not None and Path(folder).resolve() == own_dir.resolve()
    if not is_own or split == "all":
        return data, ""
    if trained.run_dir is None:
        raise MeniscusError(
            f"{trained.checkpoint} is not in a run folder, so its {split} split is unknown: evaluate the run "
            "folder (its splits.csv lists the split of every image), or pass --data DIR --split all"
        )
    return data, data.restore_splits(trained.run_dir / "splits.csv")


def choose_threshold(
    trained: TrainedModel, runtime: Runtime, youden: bool, given: float | None, console: Console
) -> Threshold:
    """--threshold if given; with --youden the Youden-J threshold on the run's validation split,
    with the run's test-time augmentation (saved as threshold.json in the run); else the run's
    saved threshold, else 0.5."""
    if given is not None or not youden:
        return resolve_threshold(trained, given)
    if trained.run_dir is None:
        raise MeniscusError(
            "--youden needs a run folder (it picks the threshold on the run's validation split)"
        )
    data, note = evaluation_data(trained, None, "val")
    if note:
        console.print(note, highlight=False, markup=False)
    val = data.indices("val")
    if not len(val):
        raise MeniscusError(
            f"--youden picks the threshold on the val split, and the val split of {trained.run_dir} is empty"
        )
    tta = trained.config.tta
    probs = trained.predict(data.view(val), runtime, tta=tta, seed=0)
    value = youden_threshold(data.targets[val, 0], probs["fissure"])
    record = {
        "fissure_threshold": value,
        "chosen_by": "youden_j",
        "split": "val",
        "n_images": len(val),
        "n_tears": int(np.nansum(data.targets[val, 0])),
        "tta_copies": tta.copies,
        "tta_seed": 0,
        "checkpoint": trained.checkpoint.name,
    }
    write_text_atomic(trained.run_dir / THRESHOLD_FILE, json_text(record))
    return trained.saved_threshold


def metrics_table(metrics: dict[str, Any], title: str) -> Table:
    """Readable terminal table of an evaluation."""
    table = Table(title=title)
    for column in ("task", "n (pos)", "AUC", "95% CI", "sens", "spec", "TP/FP/TN/FN"):
        table.add_column(column, justify="right" if column != "task" else "left", no_wrap=True)
    for task, m in metrics["tasks"].items():
        table.add_row(
            task,
            f"{m['n']} ({m['n_positive']})",
            _fmt(m["auc"]),
            _ci(m["auc_ci95"]),
            _fmt(m["sensitivity"]),
            _fmt(m["specificity"]),
            f"{m['tp']}/{m['fp']}/{m['tn']}/{m['fn']}",
        )
    table.add_row(
        "challenge score",
        "",
        _fmt(metrics["challenge_score"]),
        _ci(metrics["challenge_score_ci95"]),
        "",
        "",
        "",
        style="bold",
    )
    return table


def _fmt(value: float) -> str:
    return "undefined" if value is None or math.isnan(value) else f"{value:.3f}"


def _ci(bounds) -> str:
    low, high = bounds
    return "" if math.isnan(low) else f"{low:.3f}-{high:.3f}"


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], metrics: dict[str, Any], path: Path) -> None:
    """One figure, three tasks, AUC and CI in the legend."""
    from mtl_meniscus.evaluation.plots import plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for task, (fpr, tpr) in curves.items():
        m = metrics["tasks"][task]
        ax.plot(fpr, tpr, label=f"{task}: AUC {_fmt(m['auc'])} (95% CI {_ci(m['auc_ci95'])}, n={m['n']})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC, {metrics['split']} split, score {_fmt(metrics['challenge_score'])}")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_evaluation(
    run_or_checkpoint: Path,
    data_dir: Path | None = None,
    split: str = "test",
    tta_copies: int | None = None,
    threshold: float | None = None,
    youden: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
    out_dir: Path | None = None,
    precision: str = "auto",
    console: Console | None = None,
    wandb_mode: str | None = None,
    cam_dir: Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The `evaluate` command: metrics.json, ROC PNG, a terminal table and the same in wandb."""
    console = console or Console(soft_wrap=True)
    if split not in ("test", "val", "train", "all"):
        raise MeniscusError(f"unknown split {split!r} (allowed: test, val, train, all)")
    runtime = resolve_runtime(precision, device)
    trained = load_trained(run_or_checkpoint, runtime)
    if cam_dir is not None and trained.config.model.exam_pooling is not None:
        raise MeniscusError(
            f"--cam: {trained.checkpoint} is a model of whole exams; saliency maps are for slice models"
        )
    tta = trained.tta(tta_copies)
    threshold = choose_threshold(trained, runtime, youden, threshold, console)
    cut = threshold.value
    data, note = evaluation_data(trained, data_dir, split)
    console.print(f"data {data.data_dir}: {data.exclusion_summary()}", highlight=False, markup=False)
    if note:
        console.print(note, highlight=False, markup=False)
    console.print(threshold.describe(tta.copies), highlight=False, markup=False)
    metrics, probs, plain, targets, indices = evaluate(
        trained, data, split, runtime, tta, cut, n_bootstrap, seed
    )
    metrics["fissure_threshold_source"] = threshold.source
    metrics["checkpoint"] = str(trained.checkpoint)
    metrics["data"] = str(data.data_dir)
    if note:
        metrics["data_note"] = note
    if cam_dir is not None:
        metrics["cam_peak_in_tear"] = write_cams_and_check_peaks(
            trained, data, indices, probs, cut, runtime, Path(cam_dir)
        )
        _print_cam_check(console, metrics["cam_peak_in_tear"], cam_dir)

    out_dir = Path(out_dir) if out_dir else (trained.run_dir or trained.checkpoint.parent) / f"eval-{split}"
    curves = _write_and_show(out_dir, metrics, data, indices, probs, plain, targets, cut, split, tta, console)
    _log_to_wandb(trained, out_dir, metrics, curves, wandb_mode, cam_dir)
    return metrics


def _write_and_show(out_dir, metrics, data, indices, probs, plain, targets, cut, split, tta, console):
    """metrics.json, predictions.csv and roc.png in out_dir, and the terminal summary; the ROC points."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "metrics.json", json_text(metrics))
    write_predictions(out_dir / "predictions.csv", data, indices, probs, plain, cut)
    curves = roc_points(targets, probs, data.tasks)
    plot_roc(curves, metrics, out_dir / "roc.png")
    console.print(
        metrics_table(
            metrics,
            f"{split} split, {metrics['sample']}, TTA {tta.copies} copies, fissure threshold {cut:.3f}",
        )
    )
    console.print(cascade_line(metrics["cascade"]), highlight=False)
    console.print(f"wrote {out_dir / 'metrics.json'}, predictions.csv and roc.png")
    return curves


def _per_task(targets, probs, aucs, cis, threshold: float, tasks) -> dict[str, dict[str, Any]]:
    """Each task's AUC and CI, its counts and its confusion at its threshold (the fissure threshold
    for the root task, 0.5 for the others)."""
    per_task = {}
    for task in (t for t in tasks.names if t in probs):
        rows = tasks.scored_rows(targets, task)
        cut = threshold if task == tasks.root.name else 0.5
        y = targets[rows, tasks.index(task)]
        per_task[task] = {
            "auc": aucs[task],
            "auc_ci95": list(cis.get(task, (math.nan, math.nan))),
            "n": int(rows.sum()),
            "n_positive": int(np.sum(y == 1)),
            "threshold": cut,
            **binary_counts(y, probs[task][rows], cut),
        }
    return per_task


def _print_cam_check(console: Console, hit: dict[str, Any], cam_dir: Path) -> None:
    if hit["n"]:
        console.print(
            f"saliency (LayerCAM): fissure peak inside the dilated tear mask on {hit['hits']}/{hit['n']} "
            f"true-positive images ({hit['rate']:.1%}); overlays in {cam_dir}"
        )


def cascade_line(view: dict[str, int]) -> str:
    """'cascade: 20/28 true tears detected; of those, orientation right 18, position right 19, both
    right 17' from metrics["cascade"]."""
    gated = [
        f"{key.removesuffix('_correct')} right {n}"
        for key, n in view.items()
        if key.endswith("_correct") and key != "all_correct"
    ]
    line = f"cascade: {view['detected']}/{view['true_tears']} true tears detected"
    if gated:  # each gated task's count, then all of them at once
        every = "both" if len(gated) == 2 else "all"
        line += "; of those, " + ", ".join(gated) + f", {every} right {view['all_correct']}"
    return line


def write_cams_and_check_peaks(
    trained: TrainedModel,
    data: PreparedData,
    indices: list[int],
    probs: dict[str, np.ndarray],
    threshold: float,
    runtime: Runtime,
    cam_dir: Path,
    dilation_px: int = 5,
) -> dict[str, Any]:
    """Saliency (LayerCAM) overlays of every evaluated image; on true positives with a tear mask, how often the
    fissure map's peak falls inside the tear mask dilated by `dilation_px` pixels."""
    import cv2

    from mtl_meniscus.networks.cam import peak_in_mask, unique_names, write_overlays

    hits = checked = 0
    names = unique_names([data.records[i].image for i in indices], lambda p: Path(p).stem)  # no overwrites
    for k, index in enumerate(indices):
        record, image = data.records[index], data.images[index]
        cams = trained.saliency(image, runtime)
        write_overlays(cam_dir, names[k], image, cams)
        true_positive = data.targets[index, 0] == 1 and probs["fissure"][k] >= threshold
        if true_positive and record.mask:
            mask = cv2.imread(str(data.data_dir / record.mask), cv2.IMREAD_UNCHANGED)
            if mask is not None and mask.shape == image.shape:
                checked += 1
                hits += peak_in_mask(cams["fissure"], mask == 2, dilation_px)
    return {
        "n": checked,
        "hits": hits,
        "rate": hits / checked if checked else float("nan"),
        "dilation_px": dilation_px,
    }


def _log_to_wandb(
    trained: TrainedModel,
    out_dir: Path,
    metrics: dict,
    curves,
    wandb_mode: str | None,
    cam_dir: str | Path | None,
) -> None:
    """One 'evaluate' run: summary AUCs, ROC, the per-image table, and which model it scored."""

    from mtl_meniscus.engine.tracking import RunLogger
    from mtl_meniscus.networks.cam import unique_names

    config = trained.config
    wandb_config = config.wandb.model_copy(
        update={"job_type": "evaluate", **({"mode": wandb_mode} if wandb_mode else {})}
    )
    logger = RunLogger(wandb_config, out_dir, f"eval-{out_dir.parent.name}-{metrics['split']}", metrics)
    try:
        logger.record_model(trained.checkpoint, trained.run_dir)
        summary = {f"{t}/auc": m["auc"] for t, m in metrics["tasks"].items()}
        summary["challenge_score"] = metrics["challenge_score"]
        logger.summary(summary)
        logger.log_roc(curves)
        logger.log_image("roc", out_dir / "roc.png")
        # One row per evaluated image, as in predictions.csv, plus the fissure saliency overlay.
        with (out_dir / "predictions.csv").open(newline="") as handle:
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
    finally:
        logger.finish()


def run_exam_evaluation(
    run_or_checkpoint: Path,
    mrnet_dir: Path,
    split: str = "valid",
    tta_copies: int | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
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
    out_dir = (
        Path(out_dir) if out_dir else (trained.run_dir or trained.checkpoint.parent) / f"eval-mrnet-{split}"
    )
    tasks = trained.tasks
    root = tasks.root.name
    probs, tops, sizes = _predict_exams(trained, exams, runtime, tta, seed)
    # exam rows with only the tear known: the same AUC and per-class bootstrap as for slices
    targets = np.full((len(exams), len(tasks)), np.nan)
    targets[:, tasks.index(root)] = [e.tear for e in exams]
    scores = {root: np.array(probs)}
    ci = bootstrap_cis(targets, scores, n_resamples=n_bootstrap, seed=seed, tasks=tasks)[root]
    metrics = {
        "data": str(mrnet_dir),
        "split": split,
        "n_exams": len(exams),
        "n_tears": sum(e.tear for e in exams),
        "pooling": trained.exam_rule,
        "tta_copies": tta.copies,
        "auc": task_aucs(targets, scores, tasks)[root],
        "auc_ci95": list(ci),
        "bootstrap_resamples": n_bootstrap,
        "checkpoint": str(trained.checkpoint),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "metrics.json", json_text(metrics))
    _write_exam_predictions(out_dir / "predictions.csv", exams, probs, tops, sizes)
    low, high = metrics["auc_ci95"]
    console.print(
        f"MRNet {split}: {len(exams)} exams ({metrics['n_tears']} tears), exam-level tear AUC "
        f"{_fmt(metrics['auc'])} (95% CI {_fmt(low)}-{_fmt(high)}), TTA {tta.copies} copies -> {out_dir}",
        highlight=False,
    )
    return metrics


def _predict_exams(trained, exams, runtime, tta, seed) -> tuple[list[float], list[int], list[int]]:
    """(tear probability, most suspicious slice, number of slices) of each MRNet exam."""
    from mtl_meniscus.io.exams import read_exam

    root = trained.tasks.root.name
    probs, tops, sizes = [], [], []
    for k, exam in enumerate(exams):
        data = trained.config.data
        volume = read_exam(exam.path, data.max_pixels, data.image_size, data.plane)
        found = trained.predict_exam(volume, runtime, tta=tta, seed=seed + k)
        probs.append(found.exam[root])
        tops.append(found.top_slice)
        sizes.append(len(found.slices[root]))
    return probs, tops, sizes


def _write_exam_predictions(path: Path, exams, probs, tops, sizes) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "tear", "p_fissure", "top_slice", "slices"])
    writer.writerows([e.case, e.tear, repr(p), t, s] for e, p, t, s in zip(exams, probs, tops, sizes))
    write_text_atomic(path, buffer.getvalue())
