"""The README's walk-through, evaluation figures and calibration table, from the main job on the
`realistic` phantom.

    python scripts/paper_figures.py run
    python scripts/paper_figures.py render [--page README.md]

`run` does what the README's walk-through shows, as a newcomer would, in a scratch folder: `train
--mode shared --out runs/shared` (the main job), `evaluate runs/shared` (the network's own
probabilities, for the before/after), `evaluate runs/shared --calibrate --youden` (temperature
scaling and the threshold fitted on the validation split, then the test split scored with them),
`predict` on three test slices and `export`. It keeps what each printed (results/figures/
walkthrough.json), copies the calibrated evaluation's figures, downscaled to small PNGs, to
docs/images/eval-*.png and writes results/figures/summary.json (per task: test AUC, ECE and Brier
before and after calibration, the temperature; the machine). `render` writes the walk-through and
the calibration table between the markers of the page (--page, default README.md); without
results/figures/summary.json and walkthrough.json it is refused (exit 1) and the page is left as
it was.
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

import cv2
import yaml
from results_page import has_markers, read_json, replace_between  # scripts/results_page.py

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "figures"
FIGURES = ROOT / "docs" / "images"
SHOWN = ("roc", "pr", "reliability", "confusion", "errors", "saliency")
WIDTH = 900  # pixels: readable in the README, small in the repository


def _cli(work: Path, *args: str) -> str:
    """What `python cli.py ARGS` prints, run in `work` as a user would, on a wide terminal."""
    # wandb as a newcomer has it (offline, the default), so the output is theirs line for line
    env = {key: value for key, value in os.environ.items() if key != "WANDB_MODE"}
    env |= {"PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    command = [sys.executable, str(ROOT / "cli.py"), *args]
    printed = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    return printed.replace(str(Path.home()), "~")


def _copy_test_slices(run_dir: Path, scans: Path, n: int = 3) -> None:
    """The run's first `n` test-split slices (splits.csv order, no choosing) copied into `scans`, the
    folder a user would point predict at."""
    with (run_dir / "splits.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "test"][:n]
    data = Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["path"])
    scans.mkdir()
    for row in rows:
        shutil.copy(data / row["image"], scans / Path(row["image"]).name)


def _train_summary(printed: str) -> str:
    """train's output as the README shows it: the lines before the first epoch, then the
    end-of-train summary from the test scores on."""
    lines = printed.rstrip("\n").splitlines()
    first_epoch = next(k for k, line in enumerate(lines) if line.startswith("["))
    summary = next(k for k, line in enumerate(lines) if line.startswith("test:"))
    return "\n".join([*lines[:first_epoch], "... (one line per epoch)", *lines[summary:]])


def run() -> dict:
    from mtl_meniscus.commands.bench import machine_info

    work = Path(tempfile.mkdtemp(prefix="paper-figures-"))
    steps = {"train": ["train", "--mode", "shared", "--out", "runs/shared"]}
    printed = {"train": _cli(work, *steps["train"])}
    steps["evaluate_before"] = ["evaluate", "runs/shared", "--out", "eval-before"]
    printed["evaluate_before"] = _cli(work, *steps["evaluate_before"])
    steps["evaluate"] = ["evaluate", "runs/shared", "--calibrate", "--youden"]
    printed["evaluate"] = _cli(work, *steps["evaluate"])
    _copy_test_slices(work / "runs" / "shared", work / "scans")
    steps["predict"] = ["predict", "runs/shared", "scans/", "--out", "predictions.csv"]
    printed["predict"] = _cli(work, *steps["predict"])
    printed["predict"] += "$ cat predictions.csv\n" + (work / "predictions.csv").read_text()
    steps["export"] = ["export", "runs/shared", "--out", "model.onnx"]
    printed["export"] = _cli(work, *steps["export"])
    run_dir = work / "runs" / "shared"
    before = json.loads((work / "eval-before" / "metrics.json").read_text())
    after = json.loads((run_dir / "eval-test" / "metrics.json").read_text())
    calibration = json.loads((run_dir / "calibration.json").read_text())
    FIGURES.mkdir(parents=True, exist_ok=True)
    for name in SHOWN:
        if not (run_dir / "eval-test" / f"{name}.png").is_file():  # e.g. no tear detected: no saliency
            (FIGURES / f"eval-{name}.png").unlink(missing_ok=True)
            continue
        image = cv2.imread(str(run_dir / "eval-test" / f"{name}.png"))
        scale = WIDTH / image.shape[1]
        small = cv2.resize(image, (WIDTH, round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(FIGURES / f"eval-{name}.png"), small, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    summary = {
        "machine": _machine(machine_info()),
        "date": time.strftime("%Y-%m-%d"),
        "sample": after["sample"],
        "fissure_threshold": after["fissure_threshold"],
        "challenge_score": after["challenge_score"],
        "tasks": {
            task: {
                "auc": m["auc"],
                "n": m["n"],
                "n_positive": m["n_positive"],
                "temperature": calibration["temperatures"].get(task, 1.0),
                "ece_before": before["tasks"][task]["calibration"]["ece"],
                "brier_before": before["tasks"][task]["calibration"]["brier"],
                "ece_after": m["calibration"]["ece"],
                "brier_after": m["calibration"]["brier"],
            }
            for task, m in after["tasks"].items()
        },
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    walkthrough = [
        {
            "command": "python cli.py " + " ".join(_shown(args, work)),
            "printed": printed[step].replace(f"{work}/", ""),
        }
        for step, args in steps.items()
        if step != "evaluate_before"
    ]
    (OUT / "walkthrough.json").write_text(
        json.dumps({"machine": summary["machine"], "date": summary["date"], "steps": walkthrough}, indent=2)
    )
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _machine(info: dict) -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores, AMX (bf16)': the CPU and what `auto` precision used."""
    precision = "AMX (bf16)" if info["bf16_pays_off"] else f"{info['isa']} (fp32)"
    return f"{info['cpu']}, {info['cores']} cores, {precision}, torch {info['torch']}"


def _shown(args: list[str], work: Path) -> list[str]:
    """The command as the README shows it: paths relative to the scratch folder it ran in."""
    return [arg.replace(f"{work}/", "") for arg in args]


def render(page: Path, out: Path = OUT) -> str:
    """The calibration table and the walk-through from `out`'s summary.json and walkthrough.json,
    into `page`; a missing file is refused before anything is written."""
    for name in ("summary.json", "walkthrough.json"):
        if not (out / name).is_file():
            raise SystemExit(
                f"{out / name} does not exist: nothing to render (`python scripts/paper_figures.py run` "
                f"writes {out}/summary.json and walkthrough.json); {page} left unchanged."
            )
    summary = read_json(out / "summary.json", "python scripts/paper_figures.py run")
    lines = [
        "| task | test n (positive) | AUC | temperature | ECE before → after | Brier before → after |",
        "|---|---|---|---|---|---|",
    ]
    for task, t in summary["tasks"].items():
        lines.append(
            f"| {task} | {t['n']} ({t['n_positive']}) | {t['auc']:.3f} | {t['temperature']:.2f} | "
            f"{t['ece_before']:.3f} → {t['ece_after']:.3f} | {t['brier_before']:.3f} → {t['brier_after']:.3f} |"
        )
    lines.append("")
    lines.append(
        f"Test split of the `realistic` phantom ({summary['sample']}), {summary['machine']}, "
        f"{summary['date']}: the walk-through's run, `evaluate runs/shared` before and "
        "`evaluate runs/shared --calibrate --youden` after; temperatures fitted on the validation split; "
        "written by `scripts/paper_figures.py`."
    )
    table = "\n".join(lines)
    walk = read_json(out / "walkthrough.json", "python scripts/paper_figures.py run")
    blocks = []
    for step in walk["steps"]:
        printed = step["printed"].rstrip("\n")
        if step["command"].startswith("python cli.py train"):  # the end-of-train summary, not every epoch
            printed = _train_summary(printed)
        blocks.append(f"$ {step['command']}\n{printed}")
    text = (
        "```\n"
        + "\n\n".join(blocks)
        + "\n```\n\n"
        + f"({walk['machine']}, {walk['date']}; written by `scripts/paper_figures.py`.)"
    )
    for name in ("calibration", "walkthrough"):  # both checked before either is written
        if not has_markers(page, name):
            state = (
                "does not exist"
                if not page.is_file()
                else f"has no <!-- {name}:start --> / <!-- {name}:end --> markers"
            )
            raise SystemExit(f"{page} {state}: nothing written.")
    for name, content in (("calibration", table), ("walkthrough", text)):
        replace_between(page, name, content)
    return table + "\n\n" + text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "render"])
    parser.add_argument(
        "--page",
        type=Path,
        default=ROOT / "README.md",
        help="the page with the calibration and walkthrough markers",
    )
    args = parser.parse_args()
    if args.action == "run":
        print(json.dumps(run(), indent=2))
    print(render(args.page))


if __name__ == "__main__":
    main()
