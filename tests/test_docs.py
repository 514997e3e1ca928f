"""The documentation's shape: a short README that links every docs page, a nav that matches docs/,
and the project files a reuser looks for (LICENSE, CITATION.cff, CHANGELOG.md). mkdocs itself runs
in `make test` (`mkdocs build --strict`); these checks need no mkdocs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def markdown_link_targets(text: str) -> set[str]:
    """Targets of [text](target) links, without #anchors."""
    return {target.split("#", 1)[0] for target in re.findall(r"\]\(([^)\s]+)\)", text)}


def nav_pages(nav: list) -> list[str]:
    """Every page file named in mkdocs.yml's nav, nested sections included."""
    pages = []
    for entry in nav:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def load_mkdocs() -> dict:
    """mkdocs.yml, which is plain YAML (no !!python tags), so safe_load reads it."""
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_links_every_docs_page():
    targets = markdown_link_targets((ROOT / "README.md").read_text())
    pages = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    missing = [page for page in pages if page not in targets]
    assert not missing, f"README.md does not link {missing}"


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    config = load_mkdocs()
    assert config.get("docs_dir", "docs") == "docs"
    nav = nav_pages(config["nav"])
    on_disk = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(set(nav)) == on_disk, f"nav {sorted(nav)} vs docs/ {on_disk}"
    assert len(nav) == len(set(nav)), "a page is in the nav twice"


def test_results_page_keeps_the_generated_table_markers():
    text = (DOCS / "results.md").read_text()
    for name in ("ablation-table", "floor-table", "start-table", "main-job", "segmentation-table", "bench"):
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        assert text.count(start) == 1 and text.count(end) == 1, name
        assert text.index(start) < text.index(end), name


def test_readme_keeps_the_generated_table_markers():
    text = (ROOT / "README.md").read_text()
    for name in (
        "walkthrough",
        "floor-summary",
        "calibration",
        "compare-summary",
    ):  # paper_figures.py, floor_table.py, compare_table.py
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        assert text.count(start) == 1 and text.count(end) == 1, name
        assert text.index(start) < text.index(end), name


def test_licence_citation_and_changelog_are_present():
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors", "version", "license"):
        assert citation.get(key), key
    assert citation["references"] and all(
        reference.get("title") and reference.get("authors") and reference.get("type")
        for reference in citation["references"]
    )
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
