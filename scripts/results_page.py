"""Writes a generated table into docs/results.md between `<!-- NAME:start -->` and `<!-- NAME:end -->`.

    python scripts/results_page.py bench [results/bench/bench.md] [--page docs/results.md]

As a command it copies a file's text between a page's markers: `bench` copies the `bench.md` that
`python cli.py bench --out results/bench` writes (from its bench.json) into the Speed section. A
missing or empty file is refused (exit 1) and the page is left as it was.
The other result scripts import `replace_between`/`write_table`, and `result_files`/`read_json`,
which refuse a results folder with nothing in it (a render never replaces a published table with
an empty one) and name the file they cannot read instead of ending in a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_PAGE = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
SOURCES = {"bench": ROOT / "results" / "bench" / "bench.md"}  # marker -> the file copied by default
MADE_BY = {"bench": "python cli.py bench --out results/bench"}  # marker -> what writes that file


def replace_between(page: Path, name: str, text: str) -> bool:
    """Put `text` between the page's markers for `name`; False (nothing written) without them."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = page.read_text() if page.is_file() else ""
    if start not in content or end not in content:
        return False
    head, rest = content.split(start, 1)
    page.write_text(head + start + "\n" + text.rstrip("\n") + "\n" + end + rest.split(end, 1)[1])
    return True


def has_markers(page: Path, name: str) -> bool:
    """Whether the page exists and holds both markers for `name` (replace_between would write)."""
    content = page.read_text() if page.is_file() else ""
    return f"<!-- {name}:start -->" in content and f"<!-- {name}:end -->" in content


def write_table(page: Path, name: str, table: str) -> None:
    """replace_between, saying on stderr when the page does not exist or has no markers for `name`
    (the table is then only printed by its script)."""
    if not replace_between(page, name, table):
        state = "does not exist" if not page.is_file() else f"has no <!-- {name}:start/end --> markers"
        print(f"{page} {state}, so {name} was not written there; the table:", file=sys.stderr)


def add_page_options(parser: argparse.ArgumentParser, page_markers: str, readme_markers: str) -> None:
    """--page and --readme of a script that writes a table into the results page and its summary
    into the README; chosen_pages() reads them."""
    parser.add_argument(
        "--page", type=Path, help=f"the page with the {page_markers} markers (default docs/results.md)"
    )
    parser.add_argument(
        "--readme",
        type=Path,
        help=f"the page with the {readme_markers} markers (default README.md; with --page and without "
        "--readme the summary is printed, not written)",
    )


def chosen_pages(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(page, readme) of add_page_options' options: --page given without --readme writes the page
    only (readme None), so that trying a page elsewhere leaves the repository's README alone."""
    return args.page or RESULTS_PAGE, args.readme or (README if args.page is None else None)


def print_unwritten_summary(name: str, summary: str) -> None:
    """The README summary that chosen_pages left unwritten (readme None), on stderr."""
    print(
        f"--page without --readme: README.md's {name} left as it was (pass --readme PATH to write it); "
        f"the summary:\n{summary}",
        file=sys.stderr,
    )


def result_files(folder: Path, pattern: str, what: str, made_by: str, targets: str) -> list[Path]:
    """The files matching `pattern` in the results folder `folder`, sorted. None there (or no such
    folder): exits (status 1) with a message naming the folder, what it should hold (`what`), the
    command that writes it (`made_by`) and the pages left unchanged (`targets`), before anything
    is written, so that a render never replaces a published table with an empty one."""
    files = sorted(folder.glob(pattern)) if folder.is_dir() else []
    if not files:
        state = (
            "does not exist"
            if not folder.exists()
            else "is not a folder"
            if not folder.is_dir()
            else f"holds no results ({pattern})"
        )
        raise SystemExit(
            f"{folder} {state}: nothing to render. It should hold {what}, written by `{made_by}`; "
            f"{targets} left unchanged."
        )
    return files


def read_json(path: Path, made_by: str = ""):
    """A result file's JSON; a missing or unreadable file exits (status 1) naming it, and the
    command that writes it when `made_by` is given."""
    hint = f" (written by `{made_by}`)" if made_by else ""
    if not path.is_file():
        raise SystemExit(f"{path} does not exist{hint}: nothing was written.")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SystemExit(
            f"{path} is not a readable JSON result file{hint}: {error}. Nothing was written."
        ) from None


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
    if not source.is_file():
        made_by = f" (`{MADE_BY[args.name]}` writes it)" if args.name in MADE_BY else ""
        sys.exit(f"{source} does not exist{made_by}: nothing to copy; {args.page} left unchanged.")
    try:
        text = source.read_text()
    except (OSError, UnicodeDecodeError) as error:
        sys.exit(f"{source} cannot be read ({error}); {args.page} left unchanged.")
    if not text.strip():
        sys.exit(f"{source} is empty: nothing to copy; {args.page} left unchanged.")
    if not args.page.is_file():
        sys.exit(f"{args.page} does not exist (--page names the page with the {args.name} markers).")
    if not replace_between(args.page, args.name, text):
        sys.exit(f"{args.page} has no <!-- {args.name}:start --> / <!-- {args.name}:end --> markers")
    print(f"{source} -> {args.page} ({args.name})")


if __name__ == "__main__":
    main()
