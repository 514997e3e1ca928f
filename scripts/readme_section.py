"""Writes a generated table into README.md between `<!-- NAME:start -->` and `<!-- NAME:end -->`."""

from __future__ import annotations

from pathlib import Path


def replace_between(readme: Path, name: str, text: str) -> bool:
    """Put `text` between the README's markers for `name`; False (nothing written) without them."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = readme.read_text() if readme.is_file() else ""
    if start not in content or end not in content:
        return False
    head, rest = content.split(start, 1)
    readme.write_text(head + start + "\n" + text.rstrip("\n") + "\n" + end + rest.split(end, 1)[1])
    return True


if __name__ == "__main__":
    # python scripts/readme_section.py NAME FILE: FILE's text (e.g. bench's bench.md) into README.md
    import sys

    name, source = sys.argv[1], Path(sys.argv[2])
    readme = Path(__file__).resolve().parent.parent / "README.md"
    if not replace_between(readme, name, source.read_text()):
        sys.exit(f"README.md has no <!-- {name}:start --> / <!-- {name}:end --> markers")
