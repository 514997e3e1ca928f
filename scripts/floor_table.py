"""The floor table of docs/results.md: the default shared preset beside the plain floor on data nobody tuned on.

    python scripts/floor_table.py run [--rows outside-a,realistic-0,easy] [--seeds 0,1,2,3,4]
                                      [--models preset,plain] [--out results/floor]
    python scripts/floor_table.py render [--out results/floor] [--page docs/results.md] [--readme README.md]

`run` trains every (row, model, seed) cell that has no result yet (rerun it to continue; a cell is
one `cli.py train` and, for the outside rows, one `cli.py evaluate` on the separate test folder) and
keeps each run's metrics.json, history.csv and evaluation in OUT/<row>/<model>-seed<k>/. `render`
reads only those files and writes the table between the floor-table markers of the page (--page,
default docs/results.md) and its short form between the floor-summary markers of the README
(--readme, default README.md). --page given without --readme writes the page only (the README's
summary is printed, not written), so that trying a page elsewhere leaves the repository's README
alone. An OUT without any result.json is refused (exit 1) and nothing is written.

Rows (data):
- outside-a/b/c: the outside phantom (../shared/outside-phantom/outside_phantom.py, written outside
  this package): training folder --n 1600 --seed 1/3/5, test folder --n 600 --seed 2/4/6 --odd 10,
  scored with `evaluate RUN --data TEST --split all` (TTA on).
- realistic-0/1/2: the package's phantom at `realistic`, data seeds 0/1/2; the run's own test split.
- easy: the package's phantom at `easy` (seed 0); the run's own test split.
Models: `preset` = `train --mode shared` as shipped; `plain` = the same with `--trunk plain --lr 0.001`
(the plain CNN floor with the learning rate it was defined with; budget, augmentation and stopping
are the preset's, without its restart rule, train.restart_if_at_chance_after: the floor leaves
chance later than the preset's restart epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_page import (  # scripts/results_page.py
    README,
    add_page_options,
    chosen_pages,
    print_unwritten_summary,
    read_json,
    result_files,
    write_table,
)

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = ROOT.parent / "shared" / "outside-phantom" / "outside_phantom.py"
OUTSIDE_SEEDS = {"outside-a": (1, 2), "outside-b": (3, 4), "outside-c": (5, 6)}
ROWS = ["outside-a", "outside-b", "outside-c", "realistic-0", "realistic-1", "realistic-2", "easy"]
# the floor as the issue that asked for it defined it: the plain CNN trained with Adam at 1e-3
# and without the shared preset's restart rule (train.restart_if_at_chance_after: its onsets are later)
MODELS = {
    "preset": [],
    "plain": ["--trunk", "plain", "--lr", "0.001", "--set", "train.restart_if_at_chance_after=0"],
}

# what render reads of a cell's result.json (restarts is optional: older cells have none)
RESULT_KEYS = (
    "row", "model", "seed", "test_score_tta", "onset_epoch", "learned",
    "machine.cpu", "machine.isa", "machine.amx", "machine.torch",
)  # fmt: skip


def cli(*args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], check=True)


def data_folders(row: str, out: Path) -> tuple[list[str], Path | None]:
    """(train's data options, the separate test folder or None) for a row, generating data once."""
    if row in OUTSIDE_SEEDS:
        train_seed, test_seed = OUTSIDE_SEEDS[row]
        train, test = out / "data" / f"{row}-train", out / "data" / f"{row}-test"
        for folder, extra in (
            (train, ["--n", "1600", "--seed", str(train_seed)]),
            (test, ["--n", "600", "--seed", str(test_seed), "--odd", "10"]),
        ):
            if not (folder / "labels.csv").is_file():
                subprocess.run([sys.executable, str(OUTSIDE), str(folder), *extra], check=True)
        return ["--data", str(train)], test
    if row == "easy":
        return ["--set", "data.phantom_difficulty=easy"], None
    seed = int(row.split("-")[1])
    if seed == 0:  # the built-in realistic phantom, generated into the cache on first use
        return ["--set", "data.phantom_difficulty=realistic"], None
    folder = out / "data" / row
    if not (folder / "labels.csv").is_file():
        cli("make-phantom", str(folder), "--seed", str(seed), "--difficulty", "realistic")
    return ["--data", str(folder)], None


def run(out: Path, rows: list[str], models: list[str], seeds: list[int]) -> None:
    from mtl_meniscus.commands.bench import machine_info

    machine = machine_info()  # cpu, isa, amx, torch, ...
    for seed in seeds:  # seed-major: after the first round every row has a value
        for row in rows:
            data_options, test = data_folders(row, out)
            for model in models:
                cell = out / row / f"{model}-seed{seed}"
                if (cell / "result.json").is_file():
                    continue
                run_dir = cell / "run"
                start = time.time()
                resume = ["--resume", str(run_dir)] if (run_dir / "last.pt").is_file() else []
                cli(
                    "train",
                    *(
                        resume
                        or [
                            "--mode",
                            "shared",
                            *data_options,
                            *MODELS[model],
                            "--seed",
                            str(seed),
                            "--wandb",
                            "disabled",
                            "--out",
                            str(run_dir),
                        ]
                    ),
                )
                metrics = json.loads((run_dir / "metrics.json").read_text())
                if test is not None:
                    cli(
                        "evaluate",
                        str(run_dir),
                        "--data",
                        str(test),
                        "--split",
                        "all",
                        "--out",
                        str(cell / "eval"),
                        "--wandb",
                        "disabled",
                    )
                    evaluated = json.loads((cell / "eval" / "metrics.json").read_text())
                    score = evaluated["challenge_score"]
                else:
                    score = metrics["test_tta"]["score"]
                best = metrics["members"]["shared"]
                result = {
                    "row": row,
                    "model": model,
                    "seed": seed,
                    "test_score_tta": score,
                    "left_chance_epoch": best["left_chance_epoch"],
                    "best_epoch": best["best_epoch"],
                    "epochs": best["epochs"],
                    "learned": metrics["learned"],
                    "restarts": best.get("restarts", []),  # epochs after which it started again
                    "onset_epoch": onset_epoch(run_dir / "history.csv"),
                    "wall_seconds": time.time() - start,
                    "machine": machine,
                    "environment": {k: v for k, v in os.environ.items() if k.startswith(("ONEDNN", "ATEN"))},
                }
                (cell / "result.json").write_text(json.dumps(result, indent=2))
                print(
                    f"{row} {model} seed {seed}: {score:.3f}, onset epoch {result['onset_epoch']}", flush=True
                )


def onset_epoch(history: Path, level: float = 0.7) -> int | None:
    """First epoch whose validation score is above `level` (the issue's onset), None if never."""
    import csv

    with history.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if float(row["val_score"]) > level:
                return int(row["epoch"])
    return None


def render(out: Path, page: Path, readme: Path | None = README) -> str:
    """The table from OUT's result.json files, written into `page` and its short form into
    `readme` (None: printed on stderr, not written). An OUT with none is refused before anything
    is written."""
    files = result_files(
        out,
        "*/*/result.json",
        "<row>/<model>-seed<k>/result.json files",
        "python scripts/floor_table.py run",
        f"{page} and {readme or 'the README'}",
    )
    results = [read_json(path, "python scripts/floor_table.py run", RESULT_KEYS) for path in files]
    verdicts = {}  # row -> (seeds both models have, preset - floor over them, preset's mean)
    lines = [
        "| data | model | seeds | onset epoch (val > 0.7), per seed | test score with TTA: mean ± sd (per seed) "
        "| preset − floor, seeds of both | learned | restarts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        by_model = {
            model: sorted(
                (r for r in results if r["row"] == row and r["model"] == model), key=lambda r: r["seed"]
            )
            for model in MODELS
        }
        verdicts[row] = paired(by_model)
        for model, cells in by_model.items():
            if not cells:
                continue
            scores = [r["test_score_tta"] for r in cells]
            onsets = ", ".join(str(r["onset_epoch"] or "never") for r in cells)
            lines.append(
                f"| {row} | {model} | {', '.join(str(r['seed']) for r in cells)} | {onsets} | "
                f"{_mean_sd(scores)} ({', '.join(f'{s:.3f}' for s in scores)}) | "
                f"{difference_cell(verdicts[row]) if model == 'preset' else ''} | "
                f"{sum(bool(r['learned']) for r in cells)} of {len(cells)} | {restarts(cells)} |"
            )
    machines = sorted(
        {
            f"{r['machine'].get('cpu')} (ISA {r['machine'].get('isa')}, AMX {r['machine'].get('amx')}, "
            f"torch {r['machine'].get('torch')})"
            for r in results
        }
    )
    source = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    table = (
        "\n".join(lines)
        + f"\n\n{summary(verdicts)}\n\nMachine: {'; '.join(machines)}. Generated by `python scripts/floor_table.py render` from "
        f"{source}.\n"
    )
    short = readme_summary(results, machines, source)
    write_table(page, "floor-table", table)
    if readme is None:
        print_unwritten_summary("floor-summary", short)
    else:
        write_table(readme, "floor-summary", short)
    return table


def readme_summary(results: list[dict], machines: list[str], source: Path | str = "results/floor") -> str:
    """The README's short form of the table: per row, each model's mean ± sd over its seeds, the
    paired difference and the onset epochs' range."""
    lines = [
        "| data | default shared preset | plain CNN floor | preset − floor | onset epoch, preset / floor |",
        "|---|---|---|---|---|",
    ]
    seeds = set()
    for row in ROWS:
        by_model = {
            model: [r for r in results if r["row"] == row and r["model"] == model] for model in MODELS
        }
        if not all(by_model.values()):
            continue
        seeds |= {len(cells) for cells in by_model.values()}
        means = [_mean_sd([r["test_score_tta"] for r in by_model[m]]) for m in MODELS]
        onsets = [_range([r["onset_epoch"] for r in by_model[m]]) for m in MODELS]
        _, difference, _ = paired(by_model)
        shown = f"{difference:+.3f}" if difference is not None else "no common seed"
        lines.append(f"| {row} | {means[0]} | {means[1]} | {shown} | {onsets[0]} / {onsets[1]} |")
    counts = " or ".join(str(n) for n in sorted(seeds))
    return (
        "\n".join(lines)
        + f"\n\nTest score with TTA, mean ± sd over {counts} training seeds per model (outside rows: the outside "
        f"generator's own test draw); {'; '.join(machines)}; `python scripts/floor_table.py render` "
        f"from {source} ([per seed](docs/results.md#what-makes-the-defaults-learn-the-outside-phantom)).\n"
    )


def _mean_sd(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread}"


def _range(onsets: list[int | None]) -> str:
    """'4-5', '7', or with 'never' where a seed never passed 0.7."""
    known = [o for o in onsets if o is not None]
    span = (f"{min(known)}-{max(known)}" if min(known) != max(known) else str(known[0])) if known else ""
    never = len(onsets) - len(known)
    return ", ".join(filter(None, [span, f"never ({never})" if never else ""]))


def restarts(cells: list[dict]) -> str:
    """How often the row's networks started again (train.restart_if_at_chance_after); '?' when a
    cell's result.json predates the count."""
    if any("restarts" not in r for r in cells):
        return "?"
    return str(sum(len(r["restarts"]) for r in cells))


def paired(by_model: dict[str, list[dict]]) -> tuple[int, float | None, float | None]:
    """(seeds both models have, mean preset - floor over them, the preset's mean over its seeds)."""
    floor = {r["seed"]: r["test_score_tta"] for r in by_model["plain"]}
    pairs = [(r["test_score_tta"], floor[r["seed"]]) for r in by_model["preset"] if r["seed"] in floor]
    difference = statistics.mean(p - f for p, f in pairs) if pairs else None
    preset = statistics.mean(r["test_score_tta"] for r in by_model["preset"]) if by_model["preset"] else None
    return len(pairs), difference, preset


def difference_cell(verdict: tuple[int, float | None, float | None]) -> str:
    seeds, difference, _ = verdict
    return f"{difference:+.3f} ({seeds})" if difference is not None else ""


def summary(verdicts: dict[str, tuple[int, float | None, float | None]]) -> str:
    """The issue's bar in words: 5 seeds of both models per row, the preset within 0.02 of the floor
    or above it, and at least 0.95 on the outside rows."""
    complete = [row for row, (seeds, _, _) in verdicts.items() if seeds >= 5]
    below = [f"{row} ({d:+.3f})" for row, (_, d, _) in verdicts.items() if d is not None and d < -0.02]
    low = [
        f"{row} ({m:.3f})"
        for row, (_, _, m) in verdicts.items()
        if row in OUTSIDE_SEEDS and m is not None and m < 0.95
    ]
    none = "none" if len(complete) == len(verdicts) else "none so far"
    return (
        f"Against the bar (5 training seeds of both models per row; the preset within 0.02 of the floor "
        f"or above it; at least 0.95 on the outside rows): rows with 5 seeds of both: {len(complete)} of "
        f"{len(verdicts)}; preset more than 0.02 below the floor: {', '.join(below) or none}; "
        f"outside rows below 0.95: {', '.join(low) or none}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "render"])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "floor")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    add_page_options(parser, "floor-table", "floor-summary")
    args = parser.parse_args()
    page, readme = chosen_pages(args)
    if args.action == "run":
        run(args.out, args.rows.split(","), args.models.split(","), [int(s) for s in args.seeds.split(",")])
    print(render(args.out, page, readme))


if __name__ == "__main__":
    main()
