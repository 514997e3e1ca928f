"""The main-job table of docs/results.md: `python cli.py train --mode shared` timed end to end.

    python scripts/main_job.py run LABEL [--avx2] [-- EXTRA TRAIN OPTIONS]
    python scripts/main_job.py render [--page docs/results.md]

`run` times the main job from an empty phantom cache (generation, training, evaluation with and
without TTA) and writes results/main-job/LABEL.json: wall time, training seconds, epochs, best
epoch, test scores, the summary's reading line, CPU model and ISA. --avx2 holds oneDNN and ATen
to AVX2 and fp32 (`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 ... --precision fp32`), the
emulation of a 2-core AVX2 machine on a newer CPU. `render` writes the table between the main-job
markers of docs/results.md from those files.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_page import RESULTS_PAGE, read_json, result_files, write_table  # scripts/results_page.py

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "main-job"
FIGURES = ROOT / "docs" / "images"


def run(label: str, avx2: bool, extra: list[str]) -> dict:
    from mtl_meniscus.commands.bench import machine_info

    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    cache = Path(tempfile.mkdtemp(prefix="main-job-cache-"))
    env["MTL_MENISCUS_CACHE"] = str(cache)  # empty: phantom generation is part of the time
    options = ["--precision", "fp32"] if avx2 else []
    if avx2:
        env |= {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    run_dir = Path(tempfile.mkdtemp(prefix="main-job-run-")) / "run"
    command = [sys.executable, "cli.py", "train", "--mode", "shared", *options, *extra, "--out", str(run_dir)]
    start = time.perf_counter()
    printed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    isa = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = metrics["members"]["shared"]
    shown = (
        "WANDB_MODE=disabled "
        + ("ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 " if avx2 else "")
        + " ".join(["python cli.py train --mode shared", *options, *extra])
    )
    result = {
        "label": label,
        "command": shown,
        "cpu": machine_info()["cpu"],
        "isa": isa,
        "precision": metrics["precision"],
        "wall_seconds": wall,
        "train_wall_seconds": metrics["train_wall_seconds"],
        "epochs": best["epochs"],
        "best_epoch": best["best_epoch"],
        "left_chance_epoch": best["left_chance_epoch"],
        "test_score": metrics["test"]["score"],
        "test_score_tta": metrics["test_tta"]["score"],
        "reading": next((line for line in printed.splitlines() if line.startswith("test score ")), ""),
        # epoch by epoch: a change that should not change training (a refactoring) is checked on these
        "val_scores": [round(float(row["val_score"]), 4) for row in _history(run_dir / "history.csv")],
        "date": time.strftime("%Y-%m-%d"),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    FIGURES.mkdir(parents=True, exist_ok=True)  # the run's training curves, shown in the README's tour
    shutil.copy(run_dir / "training_curves.png", FIGURES / f"main-job-{label}.png")
    (OUT / f"{label}.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(cache, ignore_errors=True)
    return result


def _history(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def render(page: Path = RESULTS_PAGE) -> str:
    files = result_files(
        OUT, "*.json", "a LABEL.json per timed main job", "python scripts/main_job.py run LABEL", str(page)
    )  # none: refused, nothing written
    rows = sorted((read_json(p) for p in files), key=lambda r: r["label"])
    lines = [
        "| machine | command | wall time (generation + training + evaluation) | training | test score (with TTA) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        minutes, seconds = divmod(round(r["wall_seconds"]), 60)
        lines.append(
            f"| {r['label']}: {r['cpu']}, ISA {r['isa']}, {r['precision']} | `{r['command']}` | "
            f"{minutes} min {seconds} s | {r['epochs']} epochs in {r['train_wall_seconds']:.0f} s, left chance "
            f"at {r['left_chance_epoch']}, best {r['best_epoch']} | {r['test_score']:.3f} ({r['test_score_tta']:.3f}) |"
        )
    table = "\n".join(lines)
    write_table(page, "main-job", table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "render"])
    parser.add_argument("label", nargs="?")
    parser.add_argument("--avx2", action="store_true")
    parser.add_argument("extra", nargs="*")
    parser.add_argument("--page", type=Path, default=RESULTS_PAGE)
    args = parser.parse_args()
    if args.action == "run":
        if not args.label:
            parser.error("run needs a LABEL")
        print(json.dumps(run(args.label, args.avx2, args.extra), indent=2))
    print(render(args.page))


if __name__ == "__main__":
    main()
