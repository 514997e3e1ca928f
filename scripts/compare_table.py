"""The comparison tables of docs/results.md, from the folders `python cli.py compare` wrote.

    python scripts/compare_table.py keep LABEL COMPARE_DIR --command "python cli.py compare ..."
    python scripts/compare_table.py render [--page docs/results.md] [--readme README.md]

`keep` copies a finished comparison's result files (results.json, results.md, results_per_seed.csv,
compare.yaml, and each variant's config.yaml, result.json and test_predictions.csv) into
results/compare/LABEL/ with the command that made it and the machine it ran on (this one, or the
one in the folder's machine.json, with its wall time: scripts/gpu-compare.sh),
and its forest plot (and learning curves, if any) into docs/images/compare-LABEL-*.png. `render`
writes every kept comparison, its table and caption as compare wrote them, between the page's
`compare` markers (--page, default docs/results.md), and the README's summary (cascade against
shared per comparison) between its `compare-summary` markers (--readme, default README.md; --page
given without --readme writes the page only and prints the summary, so that trying a page
elsewhere leaves the repository's README alone). With no comparison kept in results/compare/
(no LABEL/about.json) `render` is refused (exit 1) and nothing is written.

A kept comparison's table can be rewritten without training: copy results/compare/LABEL to a new
folder and run `MTL_MENISCUS_CACHE=/tmp/mtlcache python cli.py compare --out FOLDER` with its options
(the cache path it ran with: the variants' config.yaml hold the phantom's path).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml
from results_page import (  # scripts/results_page.py
    README,
    RESULTS_PAGE,
    add_page_options,
    chosen_pages,
    has_markers,
    print_unwritten_summary,
    read_json,
    replace_between,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "compare"
FIGURES = ROOT / "docs" / "images"
KEPT = ("results.json", "results.md", "results_per_seed.csv", "compare.yaml")
MEANING = {  # what a kept comparison's label stands for, in the README's caption
    "per-network": "each of the cascade's networks as many steps as the shared model",
    "equal-flops": "the cascade's networks together the shared model's training FLOPs per epoch",
    "same-regularization": "per-network, both modes with the shared preset's dropout, optimiser, "
    "schedule, stopping and augmentation",
    "curves": "per-network, on nested, stratified, patient-grouped shares of the training split",
}
VARIANT_FILES = ("config.yaml", "result.json", "test_predictions.csv")
MACHINE_FILE = "machine.json"  # written beside them by scripts/gpu-compare.sh: the machine and the wall time


def keep(label: str, folder: Path, command: str) -> Path:
    if not folder.is_dir():
        raise SystemExit(
            f"{folder} does not exist (COMPARE_DIR: a `python cli.py compare --out` folder); nothing kept."
        )
    results = sorted(folder.glob("variants/*/result.json"))
    # everything checked before anything is copied: a half-kept comparison would replace a kept one
    missing = [folder / name for name in KEPT] + [r.parent / n for r in results for n in VARIANT_FILES]
    missing = [str(path) for path in missing if not path.is_file()]
    if missing:
        raise SystemExit(
            f"{folder} is not a finished `python cli.py compare` folder: missing {', '.join(missing)}; "
            f"nothing kept ({OUT / label} left as it was)."
        )
    sys.path.insert(0, str(ROOT))
    from mtl_meniscus.commands.bench import machine_info

    target = OUT / label
    target.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        shutil.copy(folder / name, target / name)
    # each scored variant's settings, scores and test predictions (no checkpoint): enough for
    # `compare --out` on a copy to rewrite the table, or to add variants, without retraining
    shutil.rmtree(target / "variants", ignore_errors=True)
    for result in results:
        kept = target / "variants" / result.parent.name
        kept.mkdir(parents=True)
        for name in VARIANT_FILES:
            shutil.copy(result.parent / name, kept / name)
    seconds = [json.loads(p.read_text())["train_wall_seconds"] for p in results]
    # a comparison run elsewhere (scripts/gpu-compare.sh) brings its machine and wall time along
    machine_file = folder / MACHINE_FILE
    info = json.loads(machine_file.read_text()) if machine_file.is_file() else machine_info()
    cpu = f"{info['cpu']}, {info['cores']} cores, ISA {info['isa']}, AMX {info['amx']}"
    about = {
        "label": label,
        "command": command,
        "machine": f"one {info['gpu']} GPU ({cpu}; torch {info['torch']})" if info.get("gpu") else cpu,
        "training_minutes": round(sum(seconds) / 60, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    if "wall_seconds" in info:
        about["wall_minutes"] = round(info["wall_seconds"] / 60, 1)
    if info.get("note"):  # e.g. a run finished on another machine than it started on
        about["note"] = info["note"]
    (target / "about.json").write_text(json.dumps(about, indent=2))
    for figure in ("forest", "learning_curves"):
        if (folder / f"{figure}.png").is_file():
            shutil.copy(folder / f"{figure}.png", FIGURES / f"compare-{label}-{figure}.png")
    return target


def render(page: Path = RESULTS_PAGE, readme: Path | None = README) -> str:
    """Every kept comparison into `page`, the README's summary into `readme` (None: printed on
    stderr, not written). Nothing kept: refused before anything is written."""
    kept = _kept_folders()
    if not kept:
        state = "does not exist" if not OUT.is_dir() else "holds no kept comparison (LABEL/about.json)"
        raise SystemExit(
            f"{OUT} {state}: nothing to render. It should hold the folders `python scripts/compare_table.py "
            f"keep LABEL COMPARE_DIR --command ...` writes; {page} and {readme or 'the README'} left unchanged."
        )
    for folder in kept:  # every file the page and the summary read, before either is written
        for name in ("results.md", "results.json", "compare.yaml"):
            if not (folder / name).is_file():
                raise SystemExit(
                    f"{folder / name} does not exist (a kept comparison has it): nothing written."
                )
    sections = []
    for folder in kept:
        about = read_json(folder / "about.json")
        text = (folder / "results.md").read_text().strip()
        wall = f"{about['wall_minutes']} min wall, " if "wall_minutes" in about else ""
        lines = [
            f"**{about['label']}**: `{about['command']}` on {about['machine']}, {about['date']}; "
            f"{wall}{about['training_minutes']} min of training in all (summed over networks)."
            + (f" Note: {about['note']}." if "note" in about else ""),
            "",
            text,
        ]
        for figure in ("forest", "learning_curves"):
            image = FIGURES / f"compare-{about['label']}-{figure}.png"
            if image.is_file():
                lines += ["", f"![{about['label']}: {figure.replace('_', ' ')}](images/{image.name})"]
        sections.append("\n".join(lines))
    content = "\n\n".join(sections)
    summary = readme_summary()
    # both pages' markers before either is written: a page must not change when the other cannot
    for target, name in ((page, "compare"), (readme, "compare-summary")):
        if target is not None and not has_markers(target, name):
            raise SystemExit(
                f"{target}: no <!-- {name}:start --> / <!-- {name}:end --> markers; nothing written"
            )
    replace_between(page, "compare", content)
    if readme is None:
        print_unwritten_summary("compare-summary", summary)
    else:
        replace_between(readme, "compare-summary", summary)
    return content


def readme_summary() -> str:
    """The README's table: per kept comparison, the reference cascade against the shared model
    (full training split, no ROI, no auxiliary segmentation), their difference and the flags; then
    the learning curves of a comparison over several training fractions, with their plot."""
    rows, notes, labels, curves = [], [], [], []
    for folder in _kept_folders():
        about = read_json(folder / "about.json")
        settings = yaml.safe_load((folder / "compare.yaml").read_text())
        pairs = _cascade_and_shared(read_json(folder / "results.json"))
        if len(pairs) > 1:  # learning curves: its full-split point is a comparison of its own
            curves += _curve_lines(about["label"], pairs)
        elif 1.0 in pairs:
            cascade, shared = pairs[1.0]
            rows.append(f"| {about['label']} | {_pair_cells(cascade, shared)} |")
        else:
            continue
        labels.append(about["label"])
        wall = f", {about['wall_minutes']} min wall for that command" if "wall_minutes" in about else ""
        notes.append(
            f"{about['label']}: `{about['command']}`, {settings['phantom_difficulty']} phantom, "
            f"seeds {', '.join(map(str, settings['seeds']))}, on {about['machine']}{wall}, {about['date']}"
        )
    if not rows:
        return "(no comparison kept yet)"
    return "\n".join(
        [
            "| comparison | cascade (separate) | shared | shared − cascade [95% CI] | training TFLOPs, cascade / shared "
            "| flagged seeds |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "Challenge score on the test split with TTA, mean ± sd over seeds; the difference is paired by "
            "seed on the same test images (a t-interval over seeds with the images' bootstrap error); "
            "flagged: still improving when the budget ended, or never left chance. "
            + "".join(f"{label}: {MEANING[label]}. " for label in labels if label in MEANING)
            + "; ".join(notes)
            + ". Written by `python scripts/compare_table.py render` from results/compare "
            "([full tables](docs/results.md#separate-vs-shared-compare)).",
            *curves,
        ]
    )


def _cascade_and_shared(results: list[dict]) -> dict[float, tuple[dict, dict]]:
    """{training fraction: (cascade row, shared row)} of a comparison's table: the reference trunk,
    no ROI, no auxiliary segmentation, the fractions where both modes are in it."""
    plain = [r for r in results if r["trunk"] == "reference" and r["roi"] == "none" and not r["segmentation"]]
    by_key = {(r["mode"], r["train_fraction"]): r for r in plain}
    fractions = sorted({r["train_fraction"] for r in plain})
    return {
        f: (by_key["separate", f], by_key["shared", f])
        for f in fractions
        if ("separate", f) in by_key and ("shared", f) in by_key
    }


def _pair_cells(cascade: dict, shared: dict) -> str:
    """'cascade | shared | difference [CI] | TFLOPs | flags': the cells both tables share."""
    flagged = [_flags(name, r) for name, r in (("cascade", cascade), ("shared", shared))]
    return (
        f"{_mean_sd(cascade)} | {_mean_sd(shared)} | "
        f"{shared['diff_mean']:+.3f} [{shared['diff_ci_low']:+.3f}, {shared['diff_ci_high']:+.3f}] | "
        f"{cascade['train_flops_mean'] / 1e12:.0f} / {shared['train_flops_mean'] / 1e12:.0f} | "
        f"{'; '.join(f for f in flagged if f) or 'none'}"
    )


def _curve_lines(label: str, pairs: dict[float, tuple[dict, dict]]) -> list[str]:
    """The learning curves' table (a row per training fraction) and their plot."""
    lines = [
        "",
        f"Learning curves ({label}): the same comparison on shares of the training split.",
        "",
        "| training images (share) | cascade (separate) | shared | shared − cascade [95% CI] "
        "| training TFLOPs, cascade / shared | flagged seeds |",
        "|---|---|---|---|---|---|",
    ]
    for fraction, (cascade, shared) in pairs.items():
        lines.append(f"| {shared['n_train']} ({fraction:g}) | {_pair_cells(cascade, shared)} |")
    image = FIGURES / f"compare-{label}-learning_curves.png"
    if image.is_file():
        lines += ["", f"![{label}: learning curves](docs/images/{image.name})"]
    return lines


def _flags(name: str, row: dict) -> str:
    """'cascade: 5 still improving, 1 did not learn' (seeds), or '' for a mode with none."""
    counts = [
        f"{len(row[key].split())} {what}"
        for key, what in (
            ("still_improving_seeds", "still improving"),
            ("not_learned_seeds", "did not learn"),
        )
        if row[key]
    ]
    return f"{name}: {', '.join(counts)}" if counts else ""


def _kept_folders() -> list[Path]:
    """The kept comparisons, the budgets in the order a reader compares them, then the others."""
    order = ["per-network", "equal-images", "equal-flops"]
    kept = [p for p in OUT.iterdir() if (p / "about.json").is_file()] if OUT.is_dir() else []
    return sorted(kept, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))


def _mean_sd(row: dict) -> str:
    return f"{row['score_mean']:.3f} ± {row['score_sd']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["keep", "render"])
    parser.add_argument("label", nargs="?")
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--command", default="")
    add_page_options(parser, "compare", "compare-summary")
    args = parser.parse_args()
    page, readme = chosen_pages(args)
    if args.action == "keep":
        if not (args.label and args.folder and args.command):
            parser.error("keep needs LABEL, COMPARE_DIR and --command")
        keep(args.label, args.folder, args.command)
    print(render(page, readme))


if __name__ == "__main__":
    main()
