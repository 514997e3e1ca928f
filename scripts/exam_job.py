"""The results page's exam table: both modes trained on phantom exams in MRNet's layout.

    python scripts/exam_job.py run LABEL [--n-exams 600] [--slices-per-exam 24]
    python scripts/exam_job.py render

`run` writes the phantom exams (`python cli.py make-phantom DATA --n-exams 600 --slices-per-exam 24
--exam-format mrnet`: each slice with its own noise) into a temporary folder, trains `python cli.py
train --mode MODE --mrnet DATA` for both modes with configs/exams.yaml's budget, and writes
results/exams/LABEL.json: per mode the wall time, epochs, best epoch and its validation AUC, the
epoch that left chance, and the test split's exam-level tear AUC (MRNet's valid folder) with and
without TTA. `render` writes the table between the results page's exam-job markers.
"""

from __future__ import annotations

import argparse
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
OUT = ROOT / "results" / "exams"


def run(label: str, exams: int, slices: int) -> dict:
    from mtl_meniscus.commands.bench import machine_info

    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    work = Path(tempfile.mkdtemp(prefix="exam-job-"))
    data = work / "exams"
    make = ["make-phantom", str(data), "--n-exams", str(exams), "--slices-per-exam", str(slices)]
    make += ["--exam-format", "mrnet"]
    subprocess.run([sys.executable, "cli.py", *make], cwd=ROOT, env=env, check=True, capture_output=True)
    result = {"label": label, "cpu": machine_info()["cpu"], "isa": machine_info()["isa"], "modes": {}}
    for mode in ("shared", "separate"):
        command = ["train", "--mode", mode, "--mrnet", str(data), "--out", str(work / mode)]
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "cli.py", *command], cwd=ROOT, env=env, check=True, capture_output=True
        )
        wall = time.perf_counter() - start
        metrics = json.loads((work / mode / "metrics.json").read_text())
        networks = metrics["members"].values()
        result["modes"][mode] = {
            "command": f"python cli.py train --mode {mode} --mrnet DATA",
            "wall_seconds": wall,
            "precision": metrics["precision"],
            "epochs": max(m["epochs"] for m in networks),
            "best_epoch": max(m["best_epoch"] for m in networks),
            "best_val_score": min(m["val_score"] for m in networks),
            "left_chance_epoch": max((m["left_chance_epoch"] or 0) for m in networks) or None,
            "test_auc": metrics["test"]["auc"]["fissure"],
            "test_auc_tta": metrics["test_tta"]["auc"]["fissure"],
            "test_exams": metrics["test"]["n_images"],
        }
    shutil.rmtree(work, ignore_errors=True)
    result["data"] = (
        f"python cli.py make-phantom DATA --n-exams {exams} --slices-per-exam {slices} --exam-format mrnet"
    )
    result["date"] = time.strftime("%Y-%m-%d")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{label}.json").write_text(json.dumps(result, indent=2))
    return result


def render(page: Path = RESULTS_PAGE) -> str:
    files = result_files(
        OUT, "*.json", "a LABEL.json per exam job", "python scripts/exam_job.py run LABEL", str(page)
    )  # none: refused, nothing written
    lines = [
        "| machine | mode | command | wall time | epochs run, best (val AUC) | left chance | test exam-level AUC | with TTA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in files:
        r = read_json(path)
        for mode, m in r["modes"].items():
            minutes, seconds = divmod(round(m["wall_seconds"]), 60)
            lines.append(
                f"| {r['label']}: {r['cpu']}, ISA {r['isa']}, {m['precision']} | {mode} | `{m['command']}` | "
                f"{minutes} min {seconds} s | {m['epochs']}, best {m['best_epoch']} ({m['best_val_score']:.3f}) | "
                f"{m['left_chance_epoch'] or 'never'} | {m['test_auc']:.3f} | {m['test_auc_tta']:.3f} |"
            )
    table = "\n".join(lines)
    write_table(page, "exam-job", table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "render"])
    parser.add_argument("label", nargs="?")
    parser.add_argument("--n-exams", type=int, default=600)  # make-phantom's option names
    parser.add_argument("--slices-per-exam", type=int, default=24)
    parser.add_argument("--page", type=Path, default=RESULTS_PAGE)
    args = parser.parse_args()
    if args.action == "run":
        if not args.label:
            parser.error("run needs a LABEL")
        print(json.dumps(run(args.label, args.n_exams, args.slices_per_exam), indent=2))
    print(render(args.page))


if __name__ == "__main__":
    main()
