"""The comparison tables of docs/results.md, from the folders `python cli.py compare` wrote.

    python scripts/compare_table.py keep LABEL COMPARE_DIR --command "python cli.py compare ..."
    python scripts/compare_table.py render [--page docs/results.md] [--readme README.md]
    python scripts/compare_table.py pending SWEEP COMPARE_DIR --command "python cli.py compare ..."

`keep` copies a finished comparison's result files (results.json, results.md, results_per_seed.csv,
compare.yaml, and each variant's config.yaml, result.json and test_predictions.csv) into
results/compare/LABEL/ (LABEL: one plain name, of letters, digits, '-', '_' and '.') with the
command that made it and the machine it ran on (this one, or the one in the folder's machine.json,
with its wall time: scripts/gpu-compare.sh), and its forest plot (and learning curves, if any) into
docs/images/compare-LABEL-*.png. `render` writes every kept comparison, its table and caption as
compare wrote them, between the page's `compare` markers (--page, default docs/results.md), and the
README's summary (cascade against shared per comparison, captioned with the data it ran on: the
built-in phantom by its level, a `--data` folder by its name) between its `compare-summary` markers
(--readme, default README.md; --page given without --readme writes the page only and prints the
summary, so that trying a page elsewhere leaves the repository's README alone). With no comparison
kept in results/compare/ (no LABEL/about.json), or with a kept file that lacks what the pages show,
`render` is refused (exit 1, naming the file) and nothing is written.

`pending` keeps the scored variants of a sweep that is not finished (part of it run here, on a CPU,
while the rest waits for a GPU) in results/compare/pending/SWEEP/variants, with this machine and the
command in its machine.json: scripts/gpu-compare.sh adds them to that sweep's folder, and `keep
SWEEP` later names them and their machine in the kept comparison's note and empties the folder.

A kept comparison's table can be rewritten without training: copy results/compare/LABEL to a new
folder and run `MTL_MENISCUS_CACHE=/tmp/mtlcache python cli.py compare --out FOLDER` with its options
(the cache path it ran with: the variants' config.yaml hold the phantom's path).
"""

from __future__ import annotations

import argparse
import json
import math
import re
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
    read_json_rows,
    replace_between,
    require_keys,
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
PENDING = "pending"  # OUT/pending/SWEEP: scored variants of an unfinished sweep (`pending`)
# the sweeps of scripts/gpu-compare.sh (its options()), the names `pending` takes
SWEEPS = ("per-network", "equal-flops", "curves", "same-regularization", "roi", "segmentation")
# a label names a folder in results/compare and the figures' files in docs/images: one plain name
# (no '/', which would nest the folder where render does not look, nor '..', nor a space, which breaks
# the page's image link)
PLAIN_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# the built-in phantom's cache folder (ensure_phantom): phantom-v4-realistic-<settings>-n1128-seed0,
# the easy level without its name (phantom-v4-n1128-seed0); -<size>px at another size than 256
PHANTOM_FOLDER = re.compile(r"phantom-v\d+(?:-(?P<level>[a-z]+)-[0-9a-f]+)?-n\d+-seed\d+(?:-\d+px)?")
KEPT_BY = "python scripts/compare_table.py keep LABEL COMPARE_DIR"  # what writes a kept comparison
ABOUT_KEYS = ("label", "command", "machine", "date", "training_minutes")  # what keep writes, always
ROW_KEYS = (  # what the README's summary reads of each row of a results.json
    "variant", "mode", "trunk", "roi", "segmentation", "train_fraction", "n_train", "score_mean",
    "score_sd", "diff_mean", "diff_ci_low", "diff_ci_high", "train_flops_mean",
    "still_improving_seeds", "not_learned_seeds",
)  # fmt: skip


def keep(label: str, folder: Path, command: str) -> Path:
    if not PLAIN_LABEL.fullmatch(label):
        raise SystemExit(
            f"LABEL {label!r} is not a plain name: use letters, digits, '-', '_' and '.', beginning with a "
            f"letter or digit (it names {OUT}/LABEL and {FIGURES}/compare-LABEL-*.png); nothing kept."
        )
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
    target = OUT / label
    target.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        shutil.copy(folder / name, target / name)
    _copy_variants(results, target / "variants", replace=True)
    seconds = [json.loads(p.read_text())["train_wall_seconds"] for p in results]
    # a comparison run elsewhere (scripts/gpu-compare.sh) brings its machine and wall time along
    machine_file = folder / MACHINE_FILE
    info = json.loads(machine_file.read_text()) if machine_file.is_file() else _this_machine()
    about = {
        "label": label,
        "command": command,
        "machine": _machine_words(info),
        "training_minutes": round(sum(seconds) / 60, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    if "wall_seconds" in info:
        about["wall_minutes"] = round(info["wall_seconds"] / 60, 1)
    # e.g. a run finished on another machine than it started on; variants run before it elsewhere
    notes = [info.get("note", ""), _pending_note(label, {r.parent.name for r in results})]
    if any(notes):
        about["note"] = "; ".join(filter(None, notes))
    (target / "about.json").write_text(json.dumps(about, indent=2))
    _drop_pending(label, {r.parent.name for r in results})
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
        about = read_json(folder / "about.json", KEPT_BY, ABOUT_KEYS)
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
                f"{target}: no <!-- {name}:start --> marker followed by <!-- {name}:end -->; nothing written"
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
    the shared model without and with the auxiliary segmentation decoder, a sentence; then the
    learning curves of a comparison over several training fractions, with their plot."""
    rows, notes, labels, curves, auxiliary = [], [], [], [], []
    for folder in _kept_folders():
        about = read_json(folder / "about.json", KEPT_BY, ABOUT_KEYS)
        results = read_json_rows(folder / "results.json", ROW_KEYS, KEPT_BY)
        pairs = _cascade_and_shared(results)
        segmentation = _without_and_with_segmentation(results)
        if len(pairs) > 1:  # learning curves: its full-split point is a comparison of its own
            curves += _curve_lines(about["label"], pairs)
        elif 1.0 in pairs:
            cascade, shared = pairs[1.0]
            rows.append(f"| {about['label']} | {_pair_cells(cascade, shared)} |")
        elif segmentation:
            auxiliary += ["", _segmentation_line(about["label"], *segmentation, _how_run(folder, about))]
            continue
        else:  # e.g. a comparison of trunks in one mode: its table is on the page, it has no row here
            print(
                f"{folder / 'results.json'} has no cascade and shared rows of the reference trunk on "
                "the full training split (no ROI, no auxiliary segmentation), nor the shared model's "
                f"with and without it: {about['label']} is on the results page, not in the README's summary.",
                file=sys.stderr,
            )
            continue
        labels.append(about["label"])
        notes.append(f"{about['label']}: {_how_run(folder, about)}")
    if not rows and not curves and not auxiliary:
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
            *auxiliary,
            *curves,
        ]
    )


def _how_run(folder: Path, about: dict) -> str:
    """How a kept comparison ran, for the README: its command, data, seeds, machine, wall time, date
    and note."""
    settings = _read_yaml(folder / "compare.yaml", ("seeds",))
    return (
        f"`{about['command']}`, {_data_name(folder)}, seeds {', '.join(map(str, settings['seeds']))}, "
        f"on {about['machine']}"
        + (f", {about['wall_minutes']} min wall for that command" if "wall_minutes" in about else "")
        + f", {about['date']}"
        + (f" ({about['note']})" if "note" in about else "")
    )


def _without_and_with_segmentation(results: list[dict]) -> tuple[dict, dict] | None:
    """(without, with): the shared model's rows of the reference trunk on the full training split,
    no ROI, without and with the auxiliary segmentation decoder; None where the table has not both,
    or where its difference is not to the one without (another baseline)."""
    by_segmentation = {
        r["segmentation"]: r
        for r in results
        if (r["mode"], r["trunk"], r["roi"], r["train_fraction"]) == ("shared", "reference", "none", 1.0)
    }
    without, with_decoder = by_segmentation.get(False), by_segmentation.get(True)
    if without is None or with_decoder is None or with_decoder.get("baseline") != without["variant"]:
        return None
    return without, with_decoder


def _segmentation_line(label: str, without: dict, with_decoder: dict, run: str) -> str:
    """A sentence: the shared model without and with the auxiliary segmentation decoder."""
    return (
        f"Auxiliary segmentation ({label}): the shared model scored {_mean_sd(without)} without the "
        f"segmentation decoder and {_mean_sd(with_decoder)} with it, with − without "
        f"{_difference(with_decoder)}; training TFLOPs {_tflops(without)} / {_tflops(with_decoder)}; "
        f"flagged seeds: {_flagged([('without', without), ('with', with_decoder)])}. {run}."
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
    return (
        f"{_mean_sd(cascade)} | {_mean_sd(shared)} | {_difference(shared)} | "
        f"{_tflops(cascade)} / {_tflops(shared)} | {_flagged([('cascade', cascade), ('shared', shared)])}"
    )


def _difference(row: dict) -> str:
    """'+0.071 [+0.023, +0.119]': a row's paired difference to its baseline and its interval."""
    return f"{_num(row['diff_mean'], '+.3f')} [{_num(row['diff_ci_low'], '+.3f')}, {_num(row['diff_ci_high'], '+.3f')}]"


def _flagged(named_rows: list[tuple[str, dict]]) -> str:
    """'cascade: 5 still improving; shared: 1 did not learn' over the (name, row) pairs, or 'none'."""
    flags = [_flags(name, row) for name, row in named_rows]
    return "; ".join(f for f in flags if f) or "none"


def _curve_lines(label: str, pairs: dict[float, tuple[dict, dict]]) -> list[str]:
    """The learning curves' table (a row per training fraction) and their plot."""
    lines = [
        "",
        "| training images (share) | cascade (separate) | shared | shared − cascade [95% CI] "
        "| training TFLOPs, cascade / shared | flagged seeds |",
        "|---|---|---|---|---|---|",
    ]
    for fraction, (cascade, shared) in pairs.items():
        lines.append(f"| {_num(shared['n_train'], '.0f')} ({fraction:g}) | {_pair_cells(cascade, shared)} |")
    caption = f"Learning curves ({label}): the same comparison on shares of the training split."
    image = FIGURES / f"compare-{label}-learning_curves.png"
    if image.is_file():
        caption += f" ![{label}: learning curves](docs/images/{image.name})"
    return [*lines, "", caption]


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


def pending(sweep: str, folder: Path, command: str) -> Path:
    """Keep the scored variants of `folder` (a part of SWEEP run here) in OUT/pending/SWEEP, beside
    those kept there before, with this machine, the command and the variants it scored."""
    if sweep not in SWEEPS:  # a typo would park the variants where gpu-compare.sh never looks
        raise SystemExit(
            f"SWEEP {sweep!r}: one of scripts/gpu-compare.sh's, {', '.join(SWEEPS)}; nothing kept."
        )
    results = sorted(folder.glob("variants/*/result.json"))
    missing = [str(r.parent / n) for r in results for n in VARIANT_FILES if not (r.parent / n).is_file()]
    if not results or missing:
        raise SystemExit(
            f"{folder}: no scored variant (variants/<variant>/result.json)"
            + (f", or one without {', '.join(missing)}" if missing else "")
            + "; nothing kept."
        )
    target = OUT / PENDING / sweep
    _copy_variants(results, target / "variants", replace=False)
    machine_file = target / MACHINE_FILE
    runs = json.loads(machine_file.read_text()) if machine_file.is_file() else []
    runs.append(
        {
            "machine": _machine_words(_this_machine()),
            "command": command,
            "date": time.strftime("%Y-%m-%d"),
            "variants": [r.parent.name for r in results],
        }
    )
    machine_file.write_text(json.dumps(runs, indent=2))
    return target


def _pending_note(sweep: str, kept: set[str]) -> str:
    """Which of the kept variants were scored before the comparison's own run, where (`pending`)."""
    machine_file = OUT / PENDING / sweep / MACHINE_FILE
    runs = json.loads(machine_file.read_text()) if machine_file.is_file() else []
    notes = []
    for run in runs:
        variants = sorted(set(run["variants"]) & kept)
        seeds: dict[str, list[str]] = {}  # group: its seeds, so that ten variants read as two groups
        for variant in variants:
            group, _, seed = variant.rpartition("-seed")
            seeds.setdefault(group, []).append(seed)
        if variants:
            groups = "; ".join(f"{group} seeds {', '.join(found)}" for group, found in seeds.items())
            notes.append(
                f"{len(variants)} of its variants ({groups}) were trained and scored before it, "
                f"on {run['machine']}, by `{run['command']}`, {run['date']}"
            )
    return "; ".join(notes)


def _drop_pending(sweep: str, kept: set[str]) -> None:
    """Remove the pending variants that the kept comparison holds now; any other stays, said so (a
    variant compare retrained or left out is not lost unsaid)."""
    folder = OUT / PENDING / sweep
    if not folder.is_dir():
        return
    for variant in (folder / "variants").iterdir():
        if variant.name in kept:
            shutil.rmtree(variant)
    left = sorted(p.name for p in (folder / "variants").iterdir())
    if left:
        print(f"{folder}: {len(left)} variant(s) not in the kept comparison stay there: {', '.join(left)}")
    else:
        shutil.rmtree(folder)


def _copy_variants(results: list[Path], target: Path, replace: bool) -> None:
    """Each scored variant's settings, scores and test predictions (no checkpoint): enough for
    `compare --out` on a copy to rewrite the table, or to add variants, without retraining. With
    `replace` the target's variants go first (a kept comparison is the new one alone)."""
    if replace:
        shutil.rmtree(target, ignore_errors=True)
    for result in results:
        kept = target / result.parent.name
        kept.mkdir(parents=True, exist_ok=True)
        for name in VARIANT_FILES:
            shutil.copy(result.parent / name, kept / name)


def _this_machine() -> dict:
    sys.path.insert(0, str(ROOT))
    from mtl_meniscus.commands.bench import machine_info

    return machine_info()


def _machine_words(info: dict) -> str:
    cpu = f"{info['cpu']}, {info['cores']} cores, ISA {info['isa']}, AMX {info['amx']}"
    return f"one {info['gpu']} GPU ({cpu}; torch {info['torch']})" if info.get("gpu") else cpu


def _kept_folders() -> list[Path]:
    """The kept comparisons, the budgets in the order a reader compares them, then the others."""
    order = ["per-network", "equal-images", "equal-flops"]
    kept = [p for p in OUT.iterdir() if (p / "about.json").is_file()] if OUT.is_dir() else []
    return sorted(kept, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))


def _mean_sd(row: dict) -> str:
    """'mean ± sd', or the mean alone where the sd is undefined (one seed), as compare's table has it."""
    if _undefined(row["score_sd"]):
        return _num(row["score_mean"])
    return f"{_num(row['score_mean'])} ± {row['score_sd']:.3f}"


def _tflops(row: dict) -> str:
    """The training FLOPs in TFLOPs, or 'n/a'."""
    flops = row["train_flops_mean"]
    return "n/a" if _undefined(flops) else f"{flops / 1e12:.0f}"


def _num(value: float | None, spec: str = ".3f") -> str:
    """A number, or 'n/a' where it is undefined, as compare's own table shows it: results.json has
    null there (a one-seed comparison's sd and intervals, FLOPs of results scored before they were
    counted; older files NaN)."""
    return "n/a" if _undefined(value) else format(value, spec)


def _undefined(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _read_yaml(path: Path, keys: tuple[str, ...]) -> dict:
    """A kept YAML file holding `keys`; an unreadable or incomplete one exits naming it."""
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SystemExit(
            f"{path} is not a readable YAML file (written by `{KEPT_BY}`): {error}. Nothing was written."
        ) from None
    require_keys(value, keys, str(path), KEPT_BY)
    return value


def _data_name(folder: Path) -> str:
    """What a kept comparison ran on, in the README's caption: the built-in phantom by its level, a
    user's folder (`compare --data DIR`) by its name. compare.yaml only holds the level the phantom
    would have had; the variants' config.yaml hold the folder they were trained on (for the
    phantom, its cache folder)."""
    configs = sorted(folder.glob("variants/*/config.yaml"))
    if not configs:
        raise SystemExit(
            f"{folder / 'variants'} holds no <variant>/config.yaml (`{KEPT_BY}` copies them): "
            "the data the comparison ran on is unknown; nothing written."
        )
    names = set()
    for config in configs:
        path = _read_yaml(config, ("data.path",))["data"]["path"]
        if not isinstance(path, str):
            raise SystemExit(f"{config}: data.path is {path!r}, not the data folder; nothing written.")
        phantom = PHANTOM_FOLDER.fullmatch(Path(path).name)
        names.add(f"{phantom['level'] or 'easy'} phantom" if phantom else f"data folder `{Path(path).name}`")
    if len(names) > 1:  # compare gives every variant the same data: one caption cannot name two
        raise SystemExit(
            f"{folder / 'variants'}: its variants ran on different data ({', '.join(sorted(names))}); "
            "nothing written."
        )
    return names.pop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["keep", "render", "pending"])
    parser.add_argument("label", nargs="?")
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--command", default="")
    add_page_options(parser, "compare", "compare-summary")
    args = parser.parse_args()
    if args.action == "pending":
        if not (args.label and args.folder and args.command):
            parser.error("pending needs SWEEP, COMPARE_DIR and --command")
        print(f"kept in {pending(args.label, args.folder, args.command)}")
        return
    page, readme = chosen_pages(args)
    if args.action == "keep":
        if not (args.label and args.folder and args.command):
            parser.error("keep needs LABEL, COMPARE_DIR and --command")
        keep(args.label, args.folder, args.command)
    print(render(page, readme))


if __name__ == "__main__":
    main()
