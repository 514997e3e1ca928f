"""Writes a generated table into docs/results.md between `<!-- NAME:start -->` and `<!-- NAME:end -->`.

    python scripts/results_page.py bench [results/bench/bench.md] [--page docs/results.md]

As a command it copies a file's text between a page's markers: `bench` copies the `bench.md` that
`python cli.py bench --out results/bench` writes (from its bench.json) into the Speed section. A
missing or empty file is refused (exit 1) and the page is left as it was.
The other result scripts import `replace_between`/`write_table`, and `result_files`/`read_json`/
`read_json_rows`/`read_csv`, which refuse a results folder with nothing in it (a render never
replaces a published table with an empty one) and name the file they cannot read, or the keys or
columns it lacks, instead of ending in a traceback. A page whose end marker comes only before its
start marker has no markers.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_PAGE = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
SOURCES = {"bench": ROOT / "results" / "bench" / "bench.md"}  # marker -> the file copied by default
MADE_BY = {"bench": "python cli.py bench --out results/bench"}  # marker -> what writes that file


def replace_between(page: Path, name: str, text: str) -> bool:
    """Put `text` between the page's markers for `name`; False (nothing written) without them, or
    with the end marker only before the start marker."""
    content = page.read_text() if page.is_file() else ""
    parts = _marked(content, name)
    if parts is None:
        return False
    head, tail = parts
    page.write_text(head + "\n" + text.rstrip("\n") + "\n" + tail)
    return True


def has_markers(page: Path, name: str) -> bool:
    """Whether the page exists and holds the start marker for `name` with an end marker after it
    (replace_between would write)."""
    return _marked(page.read_text() if page.is_file() else "", name) is not None


def _marked(content: str, name: str) -> tuple[str, str] | None:
    """(the text up to and with the start marker, the text from the end marker after it on), or
    None when either is missing: an end marker only before the start marker marks nothing."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    begin = content.find(start)
    stop = content.find(end, begin + len(start)) if begin >= 0 else -1
    if stop < 0:
        return None
    return content[: begin + len(start)], content[stop:]


def write_table(page: Path, name: str, table: str) -> None:
    """replace_between, saying on stderr when the page does not exist or has no markers for `name`
    (the table is then only printed by its script)."""
    if not replace_between(page, name, table):
        state = (
            "does not exist"
            if not page.is_file()
            else f"has no <!-- {name}:start --> marker followed by <!-- {name}:end -->"
        )
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


def read_json(path: Path, made_by: str = "", keys: tuple[str, ...] = ()):
    """A result file's JSON; a missing or unreadable file exits (status 1) naming it, and the
    command that writes it when `made_by` is given. With `keys` it must be a JSON object holding
    each of them (require_keys)."""
    if not path.is_file():
        raise SystemExit(f"{path} does not exist{_hint(made_by)}: nothing was written.")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SystemExit(
            f"{path} is not a readable JSON result file{_hint(made_by)}: {error}. Nothing was written."
        ) from None
    if keys:
        require_keys(value, keys, str(path), made_by)
    return value


def read_json_rows(path: Path, keys: tuple[str, ...], made_by: str = "") -> list[dict]:
    """A result file holding a table: a JSON list of objects, each with `keys`. An empty list is
    refused too: its table would silently be left out of the page."""
    rows = read_json(path, made_by)
    if not isinstance(rows, list) or not rows:
        what = "no result rows ([])" if rows == [] else f"{_shown(rows)}, not a list of result rows"
        raise SystemExit(f"{path} holds {what}{_hint(made_by)}: nothing was written.")
    for number, row in enumerate(rows, 1):
        require_keys(row, keys, f"{path} (row {number})", made_by)
    return rows


def require_keys(value, keys: tuple[str, ...], where: str, made_by: str = "") -> None:
    """Exits (status 1) naming `where` (the file) when `value` is not a JSON object or lacks one
    of `keys` ('a.b': key b of the object under a), so that an incomplete result file is a message,
    not a KeyError from deep inside a table."""
    if not isinstance(value, dict):
        raise SystemExit(
            f"{where} holds {_shown(value)}, not a JSON object with {', '.join(keys)}{_hint(made_by)}: "
            "nothing was written."
        )
    missing = [key for key in keys if not _has(value, key.split("."))]
    if missing:
        raise SystemExit(
            f"{where} lacks {', '.join(missing)}{_hint(made_by)}: an incomplete result file; "
            "nothing was written."
        )


def read_csv(path: Path, columns: dict[str, type], made_by: str = "") -> list[dict]:
    """A result CSV file's rows, `columns` (name -> int or float) converted. A missing or
    unreadable file, one without rows, without one of `columns` or with a value there that is not
    a number exits (status 1) naming the file: a table never shows a number it could not read."""
    if not path.is_file():
        raise SystemExit(f"{path} does not exist{_hint(made_by)}: nothing was written.")
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header, rows = reader.fieldnames or [], list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SystemExit(f"{path} cannot be read{_hint(made_by)}: {error}. Nothing was written.") from None
    missing = [name for name in columns if name not in header]
    if not rows or missing:
        what = "no rows" if not rows else f"no column {', '.join(missing)}"
        raise SystemExit(f"{path} has {what}{_hint(made_by)}: nothing was written.")
    for line, row in enumerate(rows, 2):  # line 1 is the header
        for name, kind in columns.items():
            try:
                row[name] = kind(row[name])
            except (TypeError, ValueError):
                raise SystemExit(
                    f"{path} line {line}: {name} is {row[name]!r}, not a number{_hint(made_by)}; "
                    "nothing was written."
                ) from None
    return rows


def _has(value, path: list[str]) -> bool:
    """Whether the nested objects in `value` hold the keys of `path`, one level each."""
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    return True


def _shown(value) -> str:
    """A JSON value as a message shows it: short, whatever its size."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _hint(made_by: str) -> str:
    return f" (written by `{made_by}`)" if made_by else ""


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
        sys.exit(
            f"{args.page} has no <!-- {args.name}:start --> marker followed by <!-- {args.name}:end -->; "
            "nothing written"
        )
    print(f"{source} -> {args.page} ({args.name})")


if __name__ == "__main__":
    main()
