"""The `compare` command: does one shared representation beat three separate networks?

Every variant (mode x trunk x seed) trains on the same data and splits with the same seeds, then
is scored on the same test split with the same test-time augmentation (same copies of the same
images). The table gives per-task AUC and challenge score as mean +- sd over seeds, a stratified
bootstrap CI of the seed-mean score, and the paired difference against the baseline (the
`separate` cascade, reference trunk when present) with its bootstrap CI.

Output folder:
    compare.yaml                          the comparison's settings
    variants/<mode>-<trunk>-seed<k>/      a normal run folder (`train --resume` works on it), plus
        test_predictions.csv, result.json   written when the variant is scored
    results.csv, results_per_seed.csv, results.md, results.json, score_bars.png, roc_overlay.png
    wandb/                                the summary run (each variant's run is in its own folder)

A variant with result.json is done and is not retrained when compare is rerun on the folder; a
variant that was interrupted resumes from its last finished epoch.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from .config import OWN_TRUNKS, CompareConfig, Config, load_config, read_config_file
from .data import PreparedData, prepare_data, resolve_data_dir
from .errors import ConfigError, MeniscusError
from .labels import DEFAULT_TASKS, TASKS, TaskTable
from .metrics import (
    challenge_score,
    delong_test,
    percentile_ci,
    resampled_aucs,
    task_aucs,
    task_resamples,
)
from .models import count_parameters, create_timm_backbone
from .outputs import write_text_atomic
from .runlock import RunLock
from .runtime import Runtime, resolve_runtime
from .train import train_run
from .trained import load_trained

RESULT_FILE = "result.json"
PREDICTIONS_FILE = "test_predictions.csv"
TTA_SEED = 0  # one seed for every variant: each sees the same augmented copies of each test image
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Variant:
    """One training run of the comparison."""

    mode: str
    trunk: str
    seed: int

    @property
    def group(self) -> str:
        """The variant without its seed: what the table has one row for."""
        return f"{self.mode}-{re.sub(r'[^A-Za-z0-9._]+', '_', self.trunk)}"

    @property
    def name(self) -> str:
        return f"{self.group}-seed{self.seed}"


@dataclass
class ScoredVariant:
    """A variant's test-split probabilities and its cost figures (from result.json)."""

    variant: Variant
    result: dict[str, Any]
    images: list[str]
    probs: dict[str, np.ndarray]  # {task: (N,)} in the order of `images`


def plan_variants(compare: CompareConfig) -> list[Variant]:
    """Every (mode, trunk, seed), seed-major: after the first round every row of the table has a value."""
    return [
        Variant(mode, trunk, seed)
        for seed in compare.seeds
        for trunk in compare.trunks
        for mode in compare.modes
    ]


def baseline_group(variants: Sequence[Variant]) -> str:
    """The `separate` cascade with the reference trunk; else the first separate group; else the first."""
    groups = list(dict.fromkeys(v.group for v in variants))
    for preferred in ("separate-reference", *(g for g in groups if g.startswith("separate-"))):
        if preferred in groups:
            return preferred
    return groups[0]


def variant_config(
    compare: CompareConfig,
    variant: Variant,
    preset: Path,
    data_path: str | None,
    wandb_mode: str | None,
    wandb_group: str,
) -> Config:
    """The training config of one variant: its mode's preset with the comparison's settings on top."""
    timm_trunk = variant.trunk not in OWN_TRUNKS
    overrides = {
        "model.name": variant.mode,
        "model.trunk": variant.trunk,
        "model.pretrained": compare.pretrained.get(variant.trunk) if timm_trunk else None,
        "train.seed": variant.seed,
        "train.max_epochs": compare.max_epochs,
        "train.steps_per_epoch": compare.steps_per_epoch,
        "data.path": data_path,
        "tta": compare.to_dict()["tta"],
        "wandb.mode": wandb_mode,
        "wandb.group": wandb_group,
        "wandb.job_type": "compare-variant",
    }
    if compare.phantom_difficulty:
        overrides["data.phantom_difficulty"] = compare.phantom_difficulty
    config = load_config(preset, overrides)
    if compare.budget == "total" and variant.mode == "separate":
        overrides["train.steps_per_epoch"] = steps_per_network(
            config.train.steps_per_epoch, len(config.model.tasks)
        )
        config = load_config(preset, overrides)
    return config


def steps_per_network(steps_per_epoch: int, networks: int = len(TASKS)) -> int:
    """Budget 'total': the cascade's networks (one per task) share the shared model's steps.

    Each network keeps the epochs (so all validate and stop on the same schedule) and trains
    steps_per_epoch / networks steps of each, rounded to the nearest step, at least one.
    """
    return max(1, round(steps_per_epoch / networks))


def parse_list(text: str, option: str, kind: type = str) -> list:
    """'a,b,c' -> ['a', 'b', 'c'] (or ints), with a message naming the option on bad input."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = [kind(item) for item in items]
    except ValueError:
        raise ConfigError(
            f"{option}: {text!r} is not a comma-separated list of {kind.__name__} values"
        ) from None
    if not values:
        raise ConfigError(f"{option}: empty list")
    return values


def parse_pretrained(values: Sequence[str], trunks: Sequence[str]) -> dict[str, str]:
    """--pretrained options: 'TRUNK=WEIGHTS' for one timm trunk, or 'WEIGHTS' for every timm trunk.

    WEIGHTS is 'default' (timm's weights, from an existing offline cache), 'none' or a file.
    """
    timm_trunks = [t for t in trunks if t not in OWN_TRUNKS]
    out: dict[str, str] = {}
    for value in values:
        trunk, sep, weights = value.partition("=")
        if not sep:
            out.update({t: value for t in timm_trunks})
        elif trunk in timm_trunks:
            out[trunk] = weights
        else:
            raise ConfigError(
                f"--pretrained {value!r}: {trunk!r} is not a timm trunk of this comparison "
                f"(trunks: {', '.join(trunks)})"
            )
    return out


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, as 'key: saved -> wanted' (wandb settings do not count)."""
    a = {k: v for k, v in _flatten(saved).items() if not k.startswith("wandb.")}
    b = {k: v for k, v in _flatten(wanted).items() if not k.startswith("wandb.")}
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def variant_status(run_dir: Path, config: Config) -> str:
    """'scored', 'trained', 'started' or 'new'; a folder holding another config is an error."""
    if not (run_dir / "config.yaml").is_file():
        return "new"
    saved = read_config_file(run_dir / "config.yaml")
    differences = config_differences(saved, config.to_dict())
    if differences:
        raise MeniscusError(
            f"{run_dir} was trained with other settings ({'; '.join(differences[:4])}"
            f"{'; ...' if len(differences) > 4 else ''}); rerun with the same options or use another --out"
        )
    if (run_dir / RESULT_FILE).is_file():
        return "scored"
    return "trained" if (run_dir / "metrics.json").is_file() else "started"


def check_pretrained_weights(configs: Sequence[Config]) -> None:
    """Build each timm trunk once with its weights before any training: a missing weights file
    stops the comparison now, not after hours of other variants."""
    checked = set()
    for config in configs:
        model = config.model
        key = (model.trunk, model.pretrained, model.in_chans)
        if model.trunk not in OWN_TRUNKS and key not in checked:
            create_timm_backbone(model.trunk, model.in_chans, model.pretrained)
            checked.add(key)


# ---- scoring one variant ----------------------------------------------------------------------


def score_variant(
    variant: Variant, run_dir: Path, data: PreparedData, config: Config, runtime: Runtime
) -> ScoredVariant:
    """Predict the test split with the comparison's TTA; time it; write test_predictions.csv and result.json."""
    if not data.same_splits_as(run_dir / "splits.csv"):
        raise MeniscusError(f"{run_dir} was trained on other splits than this comparison's data")
    trained = load_trained(run_dir, runtime)
    test = data.indices("test")
    images = [data.images[i] for i in test]
    trained.predict(images[:8], runtime)  # warm-up: the first batch pays one-off kernel setup
    ms_per_input: list[float] = []  # per batch: preparation + forward, per network input
    last = time.perf_counter()

    def time_batch(n_inputs: int) -> None:
        nonlocal last
        now = time.perf_counter()
        ms_per_input.append(1000 * (now - last) / n_inputs)
        last = now

    probs = trained.predict(images, runtime, tta=config.tta, seed=TTA_SEED, on_batch=time_batch)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    aucs = task_aucs(data.targets[test], probs, data.tasks)
    result = {
        "variant": {"mode": variant.mode, "trunk": variant.trunk, "seed": variant.seed},
        "test_auc": aucs,
        "test_score": challenge_score(aucs, data.tasks),
        "n_test": len(test),
        "tta_copies": config.tta.copies,
        "params": count_parameters(trained.model),
        "train_seconds": metrics["train_seconds"],
        "train_wall_seconds": metrics["train_wall_seconds"],
        "train_images": metrics["train_images"],
        "train_images_per_s": metrics["train_images"] / max(metrics["train_seconds"], 1e-9),
        # An image is 1 + copies network inputs. The median over batches is robust to a moment of
        # other load on the machine, which the total time is not.
        "infer_ms_per_image": float(np.median(ms_per_input)) * (1 + config.tta.copies),
        "best": metrics["members"],
        "learned": metrics.get("learned", True),
        "warnings": metrics.get("warnings", []),
        "precision": runtime.precision,
    }
    names = [data.records[i].image for i in test]
    _write_predictions(run_dir / PREDICTIONS_FILE, names, data.targets[test], probs, data.tasks)
    write_text_atomic(
        run_dir / RESULT_FILE, json.dumps(result, indent=2)
    )  # complete or absent: marks it done
    return ScoredVariant(variant, result, names, probs)


def _write_predictions(
    path: Path, names: list[str], targets: np.ndarray, probs: dict[str, np.ndarray], tasks: TaskTable
) -> None:
    tasks_out = [t for t in tasks.names if t in probs]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", *tasks_out, *(f"p_{t}" for t in tasks_out)])
        for k, name in enumerate(names):
            labels = [
                "" if math.isnan(v) else int(v) for v in targets[k, [tasks.index(t) for t in tasks_out]]
            ]
            # Full precision: rounded probabilities would tie and change the AUCs recomputed from this file.
            writer.writerow([name, *labels, *(repr(float(probs[t][k])) for t in tasks_out)])


def load_scored(variant: Variant, run_dir: Path) -> ScoredVariant:
    """A scored variant read back from its folder."""
    result = json.loads((run_dir / RESULT_FILE).read_text())
    with (run_dir / PREDICTIONS_FILE).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    tasks = [column[2:] for column in (rows[0] if rows else {}) if column.startswith("p_")]
    probs = {t: np.array([float(r[f"p_{t}"]) for r in rows]) for t in tasks}
    return ScoredVariant(variant, result, [r["image"] for r in rows], probs)


# ---- the table -------------------------------------------------------------------------------


def summarize(
    scored: Sequence[ScoredVariant],
    targets: np.ndarray,
    n_bootstrap: int,
    budget: str = "per-network",
    tasks: TaskTable = DEFAULT_TASKS,
) -> list[dict[str, Any]]:
    """One row per group (mode, trunk): means and sds over seeds, bootstrap CIs, differences.

    Two-level bootstrap: each resample draws the test images (each task on its own rows,
    stratified on its own class: metrics.task_resamples) and, for every group independently,
    its seeds with replacement; the group's value is the mean over the drawn seeds of the AUCs on
    the drawn images. Its intervals therefore hold both the test-set and the seed-to-seed
    variance. The image-only intervals keep every seed once and resample the images alone. A
    difference to the baseline is taken resample by resample on the same drawn images (paired on
    images; the seeds of the two groups are drawn independently).
    """
    groups: dict[str, list[ScoredVariant]] = {}
    for item in scored:
        groups.setdefault(item.variant.group, []).append(item)
    baseline = baseline_group([s.variant for s in scored])
    names = list(scored[0].probs)  # the tasks of the comparison, in table order
    keys = [*names, "score"]
    weights = np.array([tasks.weight(t) for t in names])
    with_seeds = {g: {k: [] for k in keys} for g in groups}
    images_only = {g: {k: [] for k in keys} for g in groups}
    seed_rng = np.random.default_rng([BOOTSTRAP_SEED, 1])
    for rows_by_task in task_resamples(targets, n_bootstrap, BOOTSTRAP_SEED, tuple(names), tasks):
        for group, members in groups.items():
            aucs = [resampled_aucs(targets, m.probs, rows_by_task, tasks) for m in members]
            per_seed = np.array([[a[t] for t in names] for a in aucs])  # (seeds, tasks)
            per_seed = np.column_stack([per_seed, per_seed @ weights])  # (seeds, tasks + score)
            drawn = seed_rng.integers(0, len(members), size=len(members))
            for column, key in enumerate(keys):
                images_only[group][key].append(per_seed[:, column].mean())
                with_seeds[group][key].append(per_seed[drawn, column].mean())

    base_mean = float(np.mean([m.result["test_score"] for m in groups[baseline]]))
    table = []
    for group, members in groups.items():
        first = members[0]
        scores = np.array([m.result["test_score"] for m in members])
        row: dict[str, Any] = {
            "variant": group,
            "mode": first.variant.mode,
            "trunk": first.variant.trunk,
            "seeds": " ".join(str(m.variant.seed) for m in members),
            "n_seeds": len(members),
            # Runs whose validation never left chance are kept in the means (they are what the
            # mode gave) but counted and named, never averaged in silently.
            "not_learned_seeds": " ".join(
                str(m.variant.seed) for m in members if not m.result.get("learned", True)
            ),
        }
        for task in names:
            values = np.array([m.result["test_auc"][task] for m in members])
            low, high = percentile_ci(np.array(with_seeds[group][task]))
            row |= {f"auc_{task}_mean": values.mean(), f"auc_{task}_sd": _sd(values)}
            row |= {f"auc_{task}_ci_low": low, f"auc_{task}_ci_high": high}
        row |= {"score_mean": scores.mean(), "score_sd": _sd(scores)}
        row |= _ci_columns("score_ci", with_seeds[group]["score"])
        row |= _ci_columns("score_ci_images", images_only[group]["score"])
        row["baseline"] = baseline
        row["diff_mean"] = float(scores.mean()) - base_mean
        for prefix, samples in (("diff_ci", with_seeds), ("diff_ci_images", images_only)):
            row |= _ci_columns(
                prefix, np.array(samples[group]["score"]) - np.array(samples[baseline]["score"])
            )
        row |= {
            "params": first.result["params"],
            "budget": budget,
            "train_images_mean": float(np.mean([m.result["train_images"] for m in members])),
            "train_seconds_mean": float(np.mean([m.result["train_wall_seconds"] for m in members])),
            "train_images_per_s_mean": float(np.mean([m.result["train_images_per_s"] for m in members])),
            "infer_ms_per_image_median": float(np.median([m.result["infer_ms_per_image"] for m in members])),
            "tta_copies": first.result["tta_copies"],
            "n_test": first.result["n_test"],
            "bootstrap_resamples": n_bootstrap,
        }
        table.append(row)
    return table


def _ci_columns(prefix: str, samples) -> dict[str, float]:
    low, high = percentile_ci(np.asarray(samples, dtype=float))
    return {f"{prefix}_low": low, f"{prefix}_high": high}


def delong_rows(
    scored: Sequence[ScoredVariant], targets: np.ndarray, tasks: TaskTable = DEFAULT_TASKS
) -> list[dict[str, Any]]:
    """DeLong's paired test of each task's AUC: every variant against the baseline of the same seed."""
    baseline = baseline_group([s.variant for s in scored])
    base_by_seed = {s.variant.seed: s for s in scored if s.variant.group == baseline}
    rows = []
    for item in scored:
        base = base_by_seed.get(item.variant.seed)
        if item.variant.group == baseline or base is None:
            continue
        row: dict[str, Any] = {"variant": item.variant.name, "baseline": base.variant.name}
        for task in item.probs:
            scored_rows = tasks.scored_rows(targets, task)
            test = delong_test(
                targets[scored_rows, tasks.index(task)],
                item.probs[task][scored_rows],
                base.probs[task][scored_rows],
            )
            row |= {
                f"{task}_auc_diff": test["difference"],
                f"{task}_z": test["z"],
                f"{task}_p": test["p_value"],
            }
        rows.append(row)
    return rows


def _sd(values: np.ndarray) -> float:
    """Sample standard deviation; NaN for fewer than two values."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def _task_names(row: dict[str, Any]) -> list[str]:
    """The tasks of a table row, from its auc_<task>_mean columns."""
    return [
        key[len("auc_") : -len("_mean")] for key in row if key.startswith("auc_") and key.endswith("_mean")
    ]


def display_cells(table: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the readable table, shared by the terminal and the markdown file."""
    baseline = table[0]["baseline"]
    copies = table[0]["tta_copies"]
    header = [
        "variant",
        "seeds",
        *(f"{t} AUC" for t in _task_names(table[0])),
        "score",
        "score 95% CI (seeds + images)",
        "score 95% CI (images only)",
        f"Δ score vs {baseline} [95% CI seeds + images]",
        "Δ [95% CI images only]",
        "params",
        "train images",
        "train s",
        "train img/s",
        f"infer ms/img (TTA {copies})",
    ]
    rows = []
    for row in table:
        if row["variant"] == baseline:
            diffs = ["baseline", "baseline"]
        else:
            diffs = [
                f"{_num(row['diff_mean'], '+.3f')} [{_num(row[f'{ci}_low'], '+.3f')}, {_num(row[f'{ci}_high'], '+.3f')}]"
                for ci in ("diff_ci", "diff_ci_images")
            ]
        not_learned = row["not_learned_seeds"].split()
        rows.append(
            [
                row["variant"],
                str(row["n_seeds"])
                + (
                    f" ({len(not_learned)} did not learn: seed {', '.join(not_learned)})"
                    if not_learned
                    else ""
                ),
                *(_mean_sd(row[f"auc_{t}_mean"], row[f"auc_{t}_sd"]) for t in _task_names(row)),
                _mean_sd(row["score_mean"], row["score_sd"]),
                f"{_num(row['score_ci_low'])}-{_num(row['score_ci_high'])}",
                f"{_num(row['score_ci_images_low'])}-{_num(row['score_ci_images_high'])}",
                *diffs,
                f"{row['params']:,}",
                f"{row['train_images_mean']:,.0f}",
                f"{row['train_seconds_mean']:.0f}",
                f"{row['train_images_per_s_mean']:.0f}",
                f"{row['infer_ms_per_image_median']:.2f}",
            ]
        )
    return header, rows


BUDGET_NOTES = {
    "per-network": (
        "Budget per network: each of the cascade's networks trained the whole budget, so the cascade "
        "saw about three times the training images (column 'train images': images seen by all of a "
        "variant's networks, mean over seeds)."
    ),
    "total": (
        "Budget in total: the cascade's three networks shared the shared model's training steps, a "
        "third of each epoch's steps each (column 'train images': images seen by all of a variant's "
        "networks, mean over seeds)."
    ),
}

ACCURACY_COLUMNS = 10  # display_cells: variant .. differences; the rest are cost figures


def delong_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-seed DeLong table: AUC difference, z and p per task."""
    names = [key[: -len("_auc_diff")] for key in rows[0] if key.endswith("_auc_diff")] if rows else []
    header = ["variant", "vs", *(f"{t} ΔAUC (z, p)" for t in names)]
    cells = [
        [
            row["variant"],
            row["baseline"],
            *(
                f"{_num(row[f'{t}_auc_diff'], '+.3f')} ({_num(row[f'{t}_z'], '+.2f')}, p={_num(row[f'{t}_p'], '.3f')})"
                for t in names
            ),
        ]
        for row in rows
    ]
    return header, cells


def _num(value: float, spec: str = ".3f") -> str:
    """A number, or 'n/a' where it is undefined (e.g. an AUC on a one-class test split)."""
    return "n/a" if math.isnan(value) else format(value, spec)


def _mean_sd(mean: float, sd: float) -> str:
    return _num(mean) if math.isnan(sd) else f"{_num(mean)} ± {sd:.3f}"


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def per_seed_rows(scored: Sequence[ScoredVariant]) -> list[dict[str, Any]]:
    rows = []
    for item in scored:
        r = item.result
        rows.append(
            {
                "variant": item.variant.name,
                "group": item.variant.group,
                "mode": item.variant.mode,
                "trunk": item.variant.trunk,
                "seed": item.variant.seed,
                **{f"auc_{t}": auc for t, auc in r["test_auc"].items()},
                "score": r["test_score"],
                "params": r["params"],
                "train_seconds": r["train_wall_seconds"],
                "train_images_per_s": r["train_images_per_s"],
                "infer_ms_per_image": r["infer_ms_per_image"],
                "best_epochs": " ".join(f"{m}:{b['best_epoch']}/{b['epochs']}" for m, b in r["best"].items()),
                "learned": r.get("learned", True),
            }
        )
    return rows


# ---- the command -----------------------------------------------------------------------------


def run_compare(
    compare: CompareConfig,
    out_dir: Path,
    presets: dict[str, Path],
    data_dir: Path | None = None,
    wandb_mode: str | None = None,
    wandb_group: str | None = None,
    console: Console | None = None,
    jobs: int = 1,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Train and score every variant not yet done in `out_dir`, then write the tables and plots.

    `jobs` > 1 trains that many variants at once in worker processes with `threads` CPU threads
    each (default: this process's threads divided among them). `out_dir` is locked once the checks
    pass: a second comparison on the same folder is refused."""
    if jobs < 1:
        raise ConfigError(f"--jobs: bad value {jobs} (expected an integer >= 1)")
    locks: list[RunLock] = []
    try:
        return _compare_locked(
            compare, Path(out_dir), presets, data_dir, wandb_mode, wandb_group, console, locks, jobs, threads
        )
    finally:
        for lock in locks:
            lock.release()


def _compare_locked(
    compare: CompareConfig,
    out_dir: Path,
    presets: dict[str, Path],
    data_dir: Path | None,
    wandb_mode: str | None,
    wandb_group: str | None,
    console: Console | None,
    locks: list[RunLock],
    jobs: int,
    threads: int | None,
) -> list[dict[str, Any]]:
    console = console or Console(soft_wrap=True)
    group = wandb_group or out_dir.resolve().name
    variants = plan_variants(compare)
    data_path = str(Path(data_dir).resolve()) if data_dir else None
    configs = {v: variant_config(compare, v, presets[v.mode], data_path, wandb_mode, group) for v in variants}

    # Same data settings everywhere, or the variants would not share their splits.
    reference = next(iter(configs.values()))
    for variant, config in configs.items():
        if config.data != reference.data:
            raise MeniscusError(
                f"the presets of {variants[0].mode} and {variant.mode} disagree on the data section; "
                "a comparison needs one data setup (same images, same splits)"
            )
    data_dir = resolve_data_dir(reference.data)
    for config in configs.values():
        config.data.path = str(data_dir.resolve())
    statuses = {v: variant_status(out_dir / "variants" / v.name, configs[v]) for v in variants}
    check_pretrained_weights([configs[v] for v in variants if statuses[v] in ("new", "started")])

    data = prepare_data(data_dir, reference.data, report_dir=out_dir)
    if not len(data.indices("test")):
        raise MeniscusError(
            f"the test split of {data_dir} is empty ({data.split_summary()}): compare scores every "
            "variant on it"
        )
    locks.append(RunLock(out_dir, "--out"))  # creates out_dir; refuses one that another process holds
    (out_dir / "compare.yaml").write_text(yaml.safe_dump(compare.to_dict(), sort_keys=False))
    console.print(f"data {data_dir}: {data.exclusion_summary()}; splits: {data.split_summary()}")
    console.print(
        f"comparison: {len(variants)} variants ({', '.join(compare.modes)} x {', '.join(compare.trunks)} "
        f"x seeds {', '.join(map(str, compare.seeds))}); "
        f"{sum(s == 'scored' for s in statuses.values())} already done -> {out_dir}"
    )

    runtime = resolve_runtime(reference.train.precision, reference.train.device)
    test_names = [data.records[i].image for i in data.indices("test")]
    pending = [v for v in variants if statuses[v] != "scored"]
    if jobs > 1 and len(pending) > 1:
        _run_in_parallel(pending, statuses, configs, out_dir, jobs, threads, console)
        statuses = {v: "scored" for v in variants}  # every pending variant now has its result.json
    scored = []
    seconds_by_mode: dict[str, list[float]] = {}
    for k, variant in enumerate(variants, 1):
        run_dir = out_dir / "variants" / variant.name
        status = statuses[variant]
        if status == "scored":
            if variant not in pending:
                console.print(f"variant {k}/{len(variants)}: {variant.name} scored earlier; kept")
            scored.append(load_scored(variant, run_dir))
            if scored[-1].images != test_names:
                raise MeniscusError(f"{run_dir} was scored on another test split than this comparison's data")
            continue
        to_go = [v for v in variants[k - 1 :] if statuses[v] != "scored"]
        console.print(
            f"[bold]── variant {k}/{len(variants)}: {variant.name}[/] ({status}; {_to_go(to_go, seconds_by_mode)})",
            highlight=False,
            markup=True,  # the variant's name is letters, digits, '-', '_' and '.' only
        )
        start = time.perf_counter()
        try:
            scored.append(
                _train_and_score(variant, status, configs[variant], run_dir, data, runtime, console)
            )
        except MeniscusError as err:
            raise MeniscusError(f"variant {variant.name}: {err}") from None
        if status == "new":  # resumed or score-only variants would skew the estimate of what is left
            seconds_by_mode.setdefault(variant.mode, []).append(time.perf_counter() - start)

    test = data.indices("test")
    table = summarize(scored, data.targets[test], compare.bootstrap, compare.budget, data.tasks)
    write_report(out_dir, table, scored, data.targets[test], console, data.tasks)
    _log_summary(reference, group, out_dir, table, compare)
    return table


def _train_and_score(
    variant: Variant,
    status: str,
    config: Config,
    run_dir: Path,
    data: PreparedData,
    runtime: Runtime,
    console: Console,
) -> ScoredVariant:
    """Train a new variant (or resume a started one), then score it."""
    if status == "new":
        train_run(config, run_dir, console=console)
    elif status == "started":
        train_run(None, run_dir, resume=True, console=console)
    return score_variant(variant, run_dir, data, config, runtime)


def _run_in_parallel(
    pending: list[Variant],
    statuses: dict[Variant, str],
    configs: dict[Variant, Config],
    out_dir: Path,
    jobs: int,
    threads: int | None,
    console: Console,
) -> None:
    """`compare --jobs N`: train and score the pending variants in N worker processes.

    Each worker gets `threads` CPU threads (default: this process's threads divided by N) and, when
    GPUs are visible, one GPU of its own (round robin). A variant's output goes to
    variants/<name>.log; results land in the variant folders exactly as in a sequential run.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    import torch

    threads = threads or max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked OpenMP/CUDA state
    gpus = torch.cuda.device_count()
    slots = context.Queue()
    for slot in range(jobs):
        slots.put(slot % gpus if gpus else None)
    console.print(
        f"training {len(pending)} variants in {jobs} processes, {threads} CPU thread(s) each"
        + (f", one of {gpus} GPUs each" if gpus else "")
        + f"; their output: {out_dir / 'variants'}/<variant>.log"
    )
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(threads, slots)
    ) as pool:
        futures = {
            pool.submit(_variant_worker, v, statuses[v], configs[v], out_dir / "variants" / v.name): v
            for v in pending
        }
        try:
            for done, future in enumerate(as_completed(futures), 1):
                variant = futures[future]
                try:
                    seconds = future.result()
                except MeniscusError as err:
                    raise MeniscusError(
                        f"variant {variant.name}: {err} (log: {out_dir / 'variants' / variant.name}.log)"
                    ) from None
                except BrokenProcessPool:
                    raise MeniscusError(
                        f"a worker process died while training {variant.name} (out of memory?); rerun the "
                        "same command to continue, with fewer --jobs"
                    ) from None
                console.print(f"variant {variant.name} done in {seconds:.0f} s ({done}/{len(pending)})")
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _init_worker(threads: int, slots) -> None:
    import os

    import torch

    torch.set_num_threads(threads)
    gpu = slots.get()
    if gpu is not None:  # before CUDA starts in this process: it then sees only its own GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


def _variant_worker(variant: Variant, status: str, config: Config, run_dir: Path) -> float:
    """One variant in a worker process: its own copy of the data, its own log; seconds taken."""
    start = time.perf_counter()
    log = run_dir.parent / f"{variant.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        console = Console(file=handle, soft_wrap=True)
        data = prepare_data(Path(config.data.path), config.data)
        runtime = resolve_runtime(config.train.precision, config.train.device)
        _train_and_score(variant, status, config, run_dir, data, runtime, console)
    return time.perf_counter() - start


def _to_go(to_go: list[Variant], seconds_by_mode: dict[str, list[float]]) -> str:
    """'4 to go with this one, about 27 min', from the mean time of each mode's variants so far."""
    text = f"{len(to_go)} to go with this one" if len(to_go) > 1 else "the last one"
    if all(v.mode in seconds_by_mode for v in to_go):
        seconds = sum(float(np.mean(seconds_by_mode[v.mode])) for v in to_go)
        text += f", about {seconds / 60:.0f} min" if seconds >= 90 else f", about {seconds:.0f} s"
    return text


FLOOR_MARGIN = 0.02  # a variant this far below the plain floor of its mode loses to it


def floor_findings(table: list[dict[str, Any]]) -> list[str]:
    """For every variant with a plain-floor variant of the same mode in the table: a sentence
    saying whether it beat the floor (mean test score), so a user sees at once when a preset
    loses to the simple baseline on their data."""
    floors = {row["mode"]: row for row in table if row["trunk"] == "plain"}
    findings = []
    for row in table:
        floor = floors.get(row["mode"])
        if floor is None or row is floor:
            continue
        gap = row["score_mean"] - floor["score_mean"]
        verdict = (
            f"LOSES to the plain floor {floor['variant']} by {-gap:.3f}: on this data the preset is worse "
            "than a plain CNN"
            if gap < -FLOOR_MARGIN
            else f"is within {FLOOR_MARGIN} of the plain floor {floor['variant']} or above it ({gap:+.3f})"
        )
        findings.append(f"Floor check: {row['variant']} {verdict}.")
    return findings


def write_report(
    out_dir: Path,
    table: list[dict[str, Any]],
    scored: Sequence[ScoredVariant],
    targets: np.ndarray,
    console: Console,
    tasks: TaskTable = DEFAULT_TASKS,
) -> None:
    """results*.csv / results.md / results.json, the plots, and the terminal tables."""
    from .plots import plot_roc_overlay, plot_score_bars

    _write_csv(out_dir / "results.csv", table)
    per_seed = per_seed_rows(scored)
    _write_csv(out_dir / "results_per_seed.csv", per_seed)
    delong = delong_rows(scored, targets, tasks)
    if delong:
        _write_csv(out_dir / "results_delong.csv", delong)
    header, rows = display_cells(table)
    n_test, resamples = table[0]["n_test"], table[0]["bootstrap_resamples"]
    caption = (
        f"Test split: {n_test} images. AUC and score: mean ± sd over seeds. CIs: 95% percentile "
        f"bootstrap ({resamples} resamples); 'seeds + images' resamples the seeds of each variant and the "
        "test images (each task on its own rows, stratified on its own class), 'images only' keeps every "
        "seed and resamples the images. Δ: difference of seed means, paired on the resampled images. "
        + BUDGET_NOTES[table[0]["budget"]]
    )
    not_learned = [item.variant.name for item in scored if not item.result.get("learned", True)]
    if not_learned:
        caption += (
            f" Did not learn (validation never left chance; kept in the means): {', '.join(not_learned)}."
        )
    floor = floor_findings(table)
    if floor:
        caption += " " + " ".join(floor)
    markdown = to_markdown(header, rows) + "\n" + caption + "\n"
    if delong:
        delong_header, delong_table = delong_cells(delong)
        markdown += (
            "\nDeLong's paired test of each task's AUC, each variant against the baseline trained with "
            "the same seed, on the same test images (two-sided p):\n\n"
            + to_markdown(delong_header, delong_table)
        )
    (out_dir / "results.md").write_text(markdown)
    (out_dir / "results.json").write_text(json.dumps(table, indent=2))
    plot_score_bars(table, per_seed, out_dir / "score_bars.png")
    plot_roc_overlay(scored, targets, out_dir / "roc_overlay.png", tasks)

    # Narrower tables fit a terminal where the markdown table's fourteen columns would not.
    accuracy = (header[:ACCURACY_COLUMNS], [cells[:ACCURACY_COLUMNS] for cells in rows])
    cost = (
        [header[0], *header[ACCURACY_COLUMNS:]],
        [[cells[0], *cells[ACCURACY_COLUMNS:]] for cells in rows],
    )
    tables = [("comparison on the test split", accuracy, caption), ("cost", cost, None)]
    if delong:
        tables.append(("DeLong's paired test per seed", delong_cells(delong), None))
    for title, (columns, cells_rows), note in tables:
        terminal = Table(title=title, caption=note)
        for column in columns:
            terminal.add_column(
                column, justify="left" if column == "variant" else "right", no_wrap=column == "variant"
            )
        for cells in cells_rows:
            terminal.add_row(*cells)
        console.print(terminal)
    for finding in floor:
        console.print(
            finding, style="bold red" if "LOSES" in finding else None, markup=False, highlight=False
        )
    console.print(f"wrote {out_dir / 'results.md'}, results.csv, results_per_seed.csv and plots")


def _log_summary(config: Config, group: str, out_dir: Path, table: list[dict[str, Any]], compare) -> None:
    """One summary run in the comparison's wandb group: the table and both plots."""
    from .tracking import RunLogger

    wandb_config = config.wandb.model_copy(update={"group": group, "job_type": "compare-summary"})
    logger = RunLogger(wandb_config, out_dir, f"{group}-summary", compare.to_dict())
    try:
        columns = list(table[0])
        logger.log_table("results", columns, [[row[c] for c in columns] for row in table])
        logger.summary({f"{row['variant']}/score_mean": row["score_mean"] for row in table})
        logger.log_image("score_bars", out_dir / "score_bars.png")
        logger.log_image("roc_overlay", out_dir / "roc_overlay.png")
    finally:
        logger.finish()
