"""The registered models and task weightings, as the table in docs/method.md ("Registered plug-ins").

    python scripts/plugins_table.py          # write the table between the page's `plugins` markers
    python scripts/plugins_table.py --check  # exit 1 when the page's table is not the registries'

The names, the one-network-per-task fact and the descriptions (each plug-in's docstring's first
line) come from the registries (mtl_meniscus.registry), so a new registration shows here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from results_page import replace_between  # scripts/results_page.py

from mtl_meniscus.networks.losses import WEIGHTINGS
from mtl_meniscus.networks.models import MODELS, trains_per_task

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "method.md"


def render() -> str:
    lines = ["| kind | name (config key) | what it is |", "|---|---|---|"]
    for name in MODELS.names():
        networks = (
            "one network per task, trained one after another" if trains_per_task(name) else "one network"
        )
        lines.append(f"| model | `{name}` (`{MODELS.key}`) | {MODELS.describe(name)} ({networks}) |")
    for name in WEIGHTINGS.names():
        lines.append(f"| task weighting | `{name}` (`{WEIGHTINGS.key}`) | {WEIGHTINGS.describe(name)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args()
    table = render()
    if args.check:
        start, end = "<!-- plugins:start -->\n", "<!-- plugins:end -->"
        text = args.page.read_text()
        written = text.split(start, 1)[1].split(end, 1)[0] if start in text else None
        if written != table:
            sys.exit(f"{args.page}: the plug-in table is not the registries' (run scripts/plugins_table.py)")
        return
    if not replace_between(args.page, "plugins", table):
        sys.exit(f"{args.page} has no <!-- plugins:start --> / <!-- plugins:end --> markers")
    print(table)


if __name__ == "__main__":
    main()
