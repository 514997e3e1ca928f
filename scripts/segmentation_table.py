"""The segmentation table of docs/results.md: the shared model with and without the auxiliary
segmentation task, and the classical horn finder's hit rate, on a `realistic` data seed that no
other table uses.

    python scripts/segmentation_table.py run [--data-seed 7] [--seeds 0,1,2] [--out results/segmentation]
    python scripts/segmentation_table.py render [--out results/segmentation] [--page docs/results.md]

`run` writes the phantom once (`make-phantom OUT/data --seed 7 --difficulty realistic`: 1,128
images with meniscus/tear masks), then for every training seed and both variants (`seg`:
`train --mode shared --set model.segmentation=true`; `noseg`: the preset as shipped) one
`cli.py train` and one `cli.py evaluate RUN --split test` (TTA on). It keeps each cell's
result.json (test Dice/IoU per class with CIs, the ROI hit rates, the classification score, the
wall time, the machine) in OUT/<variant>-seed<k>/; rerun it to continue. `render` reads only those
files and writes the table between the segmentation-table markers of docs/results.md (--page). An
OUT without any result.json is refused (exit 1) and the page is left as it was.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from results_page import RESULTS_PAGE, read_json, result_files, write_table  # scripts/results_page.py

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"seg": ["--set", "model.segmentation=true"], "noseg": []}
# what render reads of a cell's result.json (segmentation and roi_hit_rate may be null)
RESULT_KEYS = (
    "variant", "seed", "data_seed", "test_score_tta", "segmentation", "roi_hit_rate", "best_epoch",
    "train_seconds", "machine.cpu", "machine.cores", "machine.isa", "machine.amx", "machine.torch",
)  # fmt: skip


def cli(*args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], check=True)


def run(out: Path, data_seed: int, seeds: list[int], variants: list[str]) -> None:
    from mtl_meniscus.commands.bench import machine_info

    data = out / "data"
    if not (data / "labels.csv").is_file():
        cli("make-phantom", str(data), "--seed", str(data_seed), "--difficulty", "realistic", "--quiet")
    machine = machine_info()
    for seed in seeds:
        for variant in variants:
            cell = out / f"{variant}-seed{seed}"
            if (cell / "result.json").is_file():
                continue
            run_dir, start = cell / "run", time.time()
            resume = ["--resume", str(run_dir)] if (run_dir / "last.pt").is_file() else []
            cli(
                "train",
                *(
                    resume
                    or ["--mode", "shared", "--data", str(data), *VARIANTS[variant], "--seed", str(seed)]
                    + ["--wandb", "disabled", "--out", str(run_dir), "--quiet"]
                ),
            )
            train_seconds = time.time() - start
            trained = json.loads((run_dir / "metrics.json").read_text())["members"]["shared"]
            cli(
                "evaluate",
                str(run_dir),
                "--split",
                "test",
                "--out",
                str(cell / "eval"),
                "--wandb",
                "disabled",
            )
            evaluated = json.loads((cell / "eval" / "metrics.json").read_text())
            result = {
                "variant": variant,
                "seed": seed,
                "data_seed": data_seed,
                "test_score_tta": evaluated["challenge_score"],
                "segmentation": evaluated.get("segmentation"),
                "roi_hit_rate": evaluated.get("roi_hit_rate"),
                "train_seconds": train_seconds,
                "left_chance_epoch": trained["left_chance_epoch"],
                "best_epoch": trained["best_epoch"],
                "machine": machine,
            }
            (cell / "result.json").write_text(json.dumps(result, indent=2))
            print(f"{variant} seed {seed}: score {result['test_score_tta']:.3f}", flush=True)


def _ci(values: list[float] | None) -> str:
    return f"{values[0]:.3f}-{values[1]:.3f}" if values and None not in values else "undefined"


def render(out: Path, page: Path = RESULTS_PAGE) -> str:
    """The table from OUT's result.json files (`page` is only named in the refusal: the caller
    writes it). An OUT with none is refused."""
    made_by = "python scripts/segmentation_table.py run"
    files = result_files(
        out, "*-seed*/result.json", "<variant>-seed<k>/result.json files", made_by, str(page)
    )
    cells = [read_json(p, made_by, RESULT_KEYS) for p in files]
    cells.sort(key=lambda r: (r["variant"], r["seed"]))
    source = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    machines = list(dict.fromkeys(_machine_text(r["machine"]) for r in cells))  # in the rows' order
    machine_names = {text: f"M{k + 1}" for k, text in enumerate(machines)}
    lines = [
        f"Data: the built-in phantom at `realistic`, data seed {cells[0]['data_seed']} (its own "
        "test split); the shared preset, one row per training seed, trained at `--precision auto` "
        "(bf16 on CUDA and on CPUs with AMX, else fp32). Machine"
        + (
            f": {machines[0]}."
            if len(machines) == 1
            else "s: " + "; ".join(f"{machine_names[m]} {m}" for m in machines) + "."
        )
        + f" Written by `python scripts/segmentation_table.py render` from `{source}/`.",
        "",
        "| variant | training seed | test score (TTA) | Dice meniscus [95% CI] | Dice tear [95% CI] "
        "| classical horns: tear inside both windows [95% CI] | predicted horns: same "
        f"| best epoch (of {_preset_epochs()}) | training s |" + (" machine |" if len(machines) > 1 else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if len(machines) > 1 else ""),
    ]
    for r in cells:
        classes = (r["segmentation"] or {}).get("classes", {})
        dice = {
            name: f"{entry['dice']:.3f} [{_ci(entry['dice_ci95'])}]" if entry.get("dice") is not None else "-"
            for name, entry in classes.items()
        }
        roi = r["roi_hit_rate"] or {}
        hits = {
            source: f"{roi[source]['hits']}/{roi['n_tears']} = {roi[source]['rate']:.3f} "
            f"[{_ci(roi[source]['rate_ci95'])}]"
            for source in ("classical", "predicted_mask")
            if source in roi
        }
        lines.append(
            f"| {LABELS.get(r['variant'], r['variant'])} "
            f"| {r['seed']} | {r['test_score_tta']:.3f} | {dice.get('meniscus', '-')} | {dice.get('tear', '-')} "
            f"| {hits.get('classical', '-')} | {hits.get('predicted_mask', '-')} | {r['best_epoch']} "
            f"| {r['train_seconds']:.0f} |"
            + (f" {machine_names[_machine_text(r['machine'])]} |" if len(machines) > 1 else "")
        )
    for variant in sorted({r["variant"] for r in cells}):
        scores = [r["test_score_tta"] for r in cells if r["variant"] == variant]
        spread = f" ± {statistics.stdev(scores):.3f} (sd)" if len(scores) > 1 else ""
        lines.append(
            f"\n{LABELS.get(variant, variant)}: test score {statistics.mean(scores):.3f}{spread} "
            f"over {len(scores)} seed(s)."
        )
    lines.append(_paired_difference(cells))
    return "\n".join(lines)


LABELS = {"seg": "auxiliary segmentation", "noseg": "preset (no segmentation)"}


def _preset_epochs() -> int:
    """The shared preset's epoch budget, which every run of the table trained with."""
    sys.path.insert(0, str(ROOT))
    from mtl_meniscus.config import load_config, preset_path

    return load_config(preset_path("shared")).train.max_epochs


def _machine_text(machine: dict) -> str:
    return (
        f"{machine['cpu']}, {machine['cores']} cores, ISA {machine['isa']}, AMX {machine['amx']}, "
        f"torch {machine['torch']}"
    )


def _paired_difference(cells: list[dict]) -> str:
    """The auxiliary task's effect on the test score, seed by seed (both variants of a seed on the
    same test images), with the seeds' t-interval (result.json keeps no per-image predictions, so
    the test images' own error is not in it, unlike compare's interval)."""
    from mtl_meniscus.evaluation.metrics import seeds_and_images_interval

    cell = {(r["variant"], r["seed"]): r for r in cells}
    # a seed's two runs on one machine: across machines the difference would hold the machine's too
    seeds = sorted(
        seed
        for variant, seed in cell
        if variant == "seg"
        and ("noseg", seed) in cell
        and _machine_text(cell["seg", seed]["machine"]) == _machine_text(cell["noseg", seed]["machine"])
    )
    if not seeds:
        return ""
    deltas = [cell["seg", seed]["test_score_tta"] - cell["noseg", seed]["test_score_tta"] for seed in seeds]
    text = "\nAuxiliary segmentation − preset, seed by seed (both runs on one machine): " + ", ".join(
        f"seed {seed} {d:+.3f}" for seed, d in zip(seeds, deltas)
    )
    if len(deltas) < 2:
        return text + " (one seed: no interval)."
    low, high = seeds_and_images_interval(np.array(deltas), np.array([]))
    return (
        text + f"; mean {statistics.mean(deltas):+.3f}, 95% t-interval over the {len(deltas)} seeds "
        f"[{low:+.3f}, {high:+.3f}] (the test images' error not included)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "render"])
    parser.add_argument("--data-seed", type=int, default=7)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="seg,noseg")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "segmentation")
    parser.add_argument(
        "--page", type=Path, default=RESULTS_PAGE, help="the page with the segmentation-table markers"
    )
    args = parser.parse_args()
    if args.action == "run":
        run(args.out, args.data_seed, [int(s) for s in args.seeds.split(",")], args.variants.split(","))
    table = render(args.out, args.page)
    write_table(args.page, "segmentation-table", table)
    print(table)


if __name__ == "__main__":
    main()
