"""The comparison's report: the terminal table, results.md/.csv/.json, the figures and the wandb summary run."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from mtl_meniscus.commands.compare.statistics import (
    STILL_IMPROVING_SHARE,
    ScoredVariant,
    delong_rows,
    floor_findings,
    per_seed_rows,
    still_improving,
)
from mtl_meniscus.config import Config
from mtl_meniscus.io.outputs import atomic_csv_file, json_text, write_text_atomic
from mtl_meniscus.labels import DEFAULT_TASKS, TaskTable


def _task_names(row: dict[str, Any]) -> list[str]:
    """The tasks of a table row, from its auc_<task>_mean columns."""
    return [
        key[len("auc_") : -len("_mean")] for key in row if key.startswith("auc_") and key.endswith("_mean")
    ]


def display_cells(table: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the readable table, shared by the terminal and the markdown file."""
    baselines = list(dict.fromkeys(row["baseline"] for row in table))
    baseline = baselines[0] if len(baselines) == 1 else "the cascade on the same training share"
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
        "train TFLOPs",
        "train s",
        "train img/s",
        f"infer ms/img (TTA {copies})",
    ]
    rows = []
    for row in table:
        if row["variant"] == row["baseline"]:
            diffs = ["baseline", "baseline"]
        else:
            diffs = [
                f"{_num(row['diff_mean'], '+.3f')} [{_num(row[f'{ci}_low'], '+.3f')}, {_num(row[f'{ci}_high'], '+.3f')}]"
                for ci in ("diff_ci", "diff_ci_images")
            ]
        rows.append(
            [
                row["variant"],
                _seeds_cell(row),
                *(_mean_sd(row[f"auc_{t}_mean"], row[f"auc_{t}_sd"]) for t in _task_names(row)),
                _mean_sd(row["score_mean"], row["score_sd"]),
                f"{_num(row['score_ci_low'])}-{_num(row['score_ci_high'])}",
                f"{_num(row['score_ci_images_low'])}-{_num(row['score_ci_images_high'])}",
                *diffs,
                f"{row['params']:,}",
                f"{row['train_images_mean']:,.0f}",
                _num(row["train_flops_mean"] / 1e12, ".3g"),
                f"{row['train_seconds_mean']:.0f}",
                f"{row['train_images_per_s_mean']:.0f}",
                f"{row['infer_ms_per_image_median']:.2f}",
            ]
        )
    return header, rows


def _seeds_cell(row: dict[str, Any]) -> str:
    """'5', or '5 (1 did not learn: seed 3; 2 still improving: seeds 0, 4)'."""
    notes = []
    for key, what in (("not_learned_seeds", "did not learn"), ("still_improving_seeds", "still improving")):
        seeds = row.get(key, "").split()
        if seeds:
            notes.append(f"{len(seeds)} {what}: seed {', '.join(seeds)}")
    return str(row["n_seeds"]) + (f" ({'; '.join(notes)})" if notes else "")


BUDGET_NOTES = {
    "per-network": (
        "Budget per network: each of the cascade's networks trained the whole budget, so the cascade "
        "saw about three times the training images (column 'train images': images seen by all of a "
        "variant's networks, mean over seeds)."
    ),
    "equal-images": (
        "Budget of equal images: the cascade's three classifiers shared the shared model's training "
        "steps, a third of each epoch's steps each (with roi predicted its segmentation network trained "
        "as many as each classifier, on top: the shared model's decoder learns from its own images; "
        "column 'train images': images seen by all of a variant's networks, mean over seeds). Its "
        "networks cost more FLOPs per image than the shared model, so this is not equal compute: see "
        "'train TFLOPs'."
    ),
    "equal-flops": (
        "Budget of equal FLOPs: the cascade's networks together trained on the shared model's "
        "training FLOPs per epoch (FLOPs per image counted by torch.utils.flop_counter, forward and "
        "backward; column 'train TFLOPs': all of a variant's networks, mean over seeds)."
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
    with atomic_csv_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


STALE_OUTPUTS = tuple(
    f"{name}.{suffix}"
    for name in ("score_bars", "roc_overlay", "forest", "learning_curves")
    for suffix in ("png", "pdf")
) + ("results_delong.csv",)


def write_report(
    out_dir: Path,
    table: list[dict[str, Any]],
    scored: Sequence[ScoredVariant],
    targets: np.ndarray,
    console: Console,
    tasks: TaskTable = DEFAULT_TASKS,
    patients: list[str] | None = None,
) -> None:
    """results*.csv / results.md / results.json, the plots, and the terminal tables."""
    from mtl_meniscus.evaluation.plots import (
        plot_forest,
        plot_learning_curves,
        plot_roc_overlay,
        plot_score_bars,
    )

    # Some outputs are written only when there is something to show (DeLong needs a baseline, the
    # learning curves several training shares): an earlier run's must not stay beside this one's.
    for name in STALE_OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)
    _write_csv(out_dir / "results.csv", table)
    per_seed = per_seed_rows(scored, targets, tasks)
    _write_csv(out_dir / "results_per_seed.csv", per_seed)
    delong = delong_rows(scored, targets, tasks, patients)
    if delong:
        _write_csv(out_dir / "results_delong.csv", delong)
    header, rows = display_cells(table)
    caption, floor = _caption(table, scored)
    markdown = to_markdown(header, rows) + "\n" + caption + "\n"
    if delong:
        delong_header, delong_table = delong_cells(delong)
        markdown += (
            f"\n{delong[0]['test']} paired test of each task's AUC, each variant against the baseline "
            "trained with the same seed, on the same test images (two-sided p):\n\n"
            + to_markdown(delong_header, delong_table)
        )
    write_text_atomic(out_dir / "results.md", markdown)
    write_text_atomic(out_dir / "results.json", json_text(table))
    plot_score_bars(table, per_seed, out_dir / "score_bars.png")
    plot_roc_overlay(scored, targets, out_dir / "roc_overlay.png", tasks)
    plot_forest(table, per_seed, out_dir / "forest.png")
    curves = plot_learning_curves(table, out_dir / "learning_curves.png")  # with several training shares

    _print_tables(console, header, rows, caption, delong)
    for finding in floor:
        console.print(
            finding, style="bold red" if "LOSES" in finding else None, markup=False, highlight=False
        )
    tables = "results.json, results.csv, results_per_seed.csv" + (", results_delong.csv" if delong else "")
    figures = "score_bars, roc_overlay, forest" + (", learning_curves" if curves else "")
    console.print(f"wrote {out_dir / 'results.md'}, {tables} and the figures {figures} (.png and .pdf)")


def _caption(table: list[dict[str, Any]], scored: Sequence[ScoredVariant]) -> tuple[str, list[str]]:
    """The table's caption (what the numbers are, the budget, runs that did not learn, the floor
    check) and the floor check's findings alone."""
    n_test, resamples = table[0]["n_test"], table[0]["bootstrap_resamples"]
    caption = (
        f"Test split: {n_test} images{_of_patients(table[0])}. AUC and score: mean ± sd over seeds. 95% CIs: "
        f"'seeds + images': a t-interval over the seeds combined with the test images' bootstrap error "
        f"({resamples} resamples; each task on its own rows, stratified on its own class); 'images only': "
        "the percentile bootstrap with every seed kept. Δ: mean over seeds of (score - the baseline's score "
        "with the same seed), on the same images. " + BUDGET_NOTES[table[0]["budget"]]
    )
    improving = [item.variant.name for item in scored if still_improving(item.result)]
    if improving:
        caption += (
            f" Still improving when the budget ended (best epoch in its last {STILL_IMPROVING_SHARE:.0%}): "
            f"{', '.join(improving)}; a conclusion should rest on variants that are not."
        )
    not_learned = [item.variant.name for item in scored if item.result.get("learned") is False]
    if not_learned:
        caption += (
            f" Did not learn (validation never left chance; kept in the means): {', '.join(not_learned)}."
        )
    floor = floor_findings(table)
    if floor:
        caption += " " + " ".join(floor)
    return caption, floor


def _of_patients(row: dict[str, Any]) -> str:
    """' of 30 patients (the bootstrap resamples patients)' when images share patients, else ''."""
    patients = row.get("n_patients", row["n_test"])
    return f" of {patients} patients (the bootstrap resamples patients)" if patients < row["n_test"] else ""


def _print_tables(
    console: Console, header: list[str], rows: list[list[str]], caption: str, delong: list[dict[str, Any]]
) -> None:
    """Narrower tables fit a terminal where the markdown table's fourteen columns would not."""
    accuracy = (header[:ACCURACY_COLUMNS], [cells[:ACCURACY_COLUMNS] for cells in rows])
    cost = (
        [header[0], *header[ACCURACY_COLUMNS:]],
        [[cells[0], *cells[ACCURACY_COLUMNS:]] for cells in rows],
    )
    tables = [("comparison on the test split", accuracy, caption), ("cost", cost, None)]
    if delong:
        tables.append((f"{delong[0]['test']} paired test per seed", delong_cells(delong), None))
    for title, (columns, cells_rows), note in tables:
        terminal = Table(title=title, caption=note)
        for column in columns:
            terminal.add_column(
                column, justify="left" if column == "variant" else "right", no_wrap=column == "variant"
            )
        for cells in cells_rows:
            terminal.add_row(*cells)
        console.print(terminal)


def log_summary(config: Config, group: str, out_dir: Path, table: list[dict[str, Any]], compare) -> None:
    """One summary run in the comparison's wandb group: the table and both plots."""
    from mtl_meniscus.engine.tracking import RunLogger

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
