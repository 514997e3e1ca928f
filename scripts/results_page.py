"""Writes a generated table into docs/results.md between `<!-- NAME:start -->` and `<!-- NAME:end -->`.

    python scripts/results_page.py bench [results/bench/bench.md] [--page docs/results.md]

As a command it copies a file's text between a page's markers: `bench` copies the `bench.md` that
`python cli.py bench --out results/bench` writes (from its bench.json) into the Speed section.
scripts/ablation.py, scripts/floor_table.py and scripts/main_job.py import `replace_between`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_PAGE = ROOT / "docs" / "results.md"
SOURCES = {"bench": ROOT / "results" / "bench" / "bench.md"}  # marker -> the file copied by default


def replace_between(page: Path, name: str, text: str) -> bool:
    """Put `text` between the page's markers for `name`; False (nothing written) without them."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = page.read_text() if page.is_file() else ""
    if start not in content or end not in content:
        return False
    head, rest = content.split(start, 1)
    page.write_text(head + start + "\n" + text.rstrip("\n") + "\n" + end + rest.split(end, 1)[1])
    return True


def write_table(page: Path, name: str, table: str) -> None:
    """replace_between, saying on stderr when the page has no markers for `name` (the table is
    then only printed by its script)."""
    if not replace_between(page, name, table):
        print(f"{page} has no {name} markers; the table:", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the markers' name, e.g. bench")
    parser.add_argument(
        "source", type=Path, nargs="?", help="the file to copy (bench: results/bench/bench.md)"
    )
    parser.add_argument("--page", type=Path, default=RESULTS_PAGE)
    args = parser.parse_args()
    source = args.source or SOURCES.get(args.name)
    if source is None:
        parser.error(f"name the file to copy between the {args.name} markers")
    if not replace_between(args.page, args.name, source.read_text()):
        sys.exit(f"{args.page} has no <!-- {args.name}:start --> / <!-- {args.name}:end --> markers")
    print(f"{source} -> {args.page} ({args.name})")


if __name__ == "__main__":
    main()
