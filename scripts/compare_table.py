"""The comparison tables of docs/results.md, from the folders `python cli.py compare` wrote.

    python scripts/compare_table.py keep LABEL COMPARE_DIR --command "python cli.py compare ..."
    python scripts/compare_table.py render [--page docs/results.md]

`keep` copies a finished comparison's result files (results.json, results.md, results_per_seed.csv,
compare.yaml) into results/compare/LABEL/ with the command that made it and the machine it ran on,
and its forest plot (and learning curves, if any) into docs/images/compare-LABEL-*.png. `render`
writes every kept comparison, its table and caption as compare wrote them, between the page's
`compare` markers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from results_page import RESULTS_PAGE, replace_between  # scripts/results_page.py

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "compare"
FIGURES = ROOT / "docs" / "images"
KEPT = ("results.json", "results.md", "results_per_seed.csv", "compare.yaml")


def keep(label: str, folder: Path, command: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from mtl_meniscus.commands.bench import machine_info

    target = OUT / label
    target.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        shutil.copy(folder / name, target / name)
    seconds = [json.loads(p.read_text())["train_wall_seconds"] for p in folder.glob("variants/*/result.json")]
    info = machine_info()
    about = {
        "label": label,
        "command": command,
        "machine": f"{info['cpu']}, {info['cores']} cores, ISA {info['isa']}, AMX {info['amx']}",
        "training_minutes": round(sum(seconds) / 60, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    (target / "about.json").write_text(json.dumps(about, indent=2))
    for figure in ("forest", "learning_curves"):
        if (folder / f"{figure}.png").is_file():
            shutil.copy(folder / f"{figure}.png", FIGURES / f"compare-{label}-{figure}.png")
    return target


def render(page: Path = RESULTS_PAGE) -> str:
    sections = []
    for folder in sorted(p for p in OUT.iterdir() if (p / "about.json").is_file()):
        about = json.loads((folder / "about.json").read_text())
        text = (folder / "results.md").read_text().strip()
        lines = [
            f"**{about['label']}**: `{about['command']}` on {about['machine']}, {about['date']}; "
            f"{about['training_minutes']} min of training in all.",
            "",
            text,
        ]
        for figure in ("forest", "learning_curves"):
            image = FIGURES / f"compare-{about['label']}-{figure}.png"
            if image.is_file():
                lines += ["", f"![{about['label']}: {figure.replace('_', ' ')}](images/{image.name})"]
        sections.append("\n".join(lines))
    content = "\n\n".join(sections) if sections else "(no comparison kept yet)"
    if not replace_between(page, "compare", content):
        raise SystemExit(f"{page}: no <!-- compare:start --> / <!-- compare:end --> markers")
    return content


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["keep", "render"])
    parser.add_argument("label", nargs="?")
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--command", default="")
    parser.add_argument("--page", type=Path, default=RESULTS_PAGE)
    args = parser.parse_args()
    if args.action == "keep":
        if not (args.label and args.folder and args.command):
            parser.error("keep needs LABEL, COMPARE_DIR and --command")
        keep(args.label, args.folder, args.command)
    print(render(args.page))


if __name__ == "__main__":
    main()
