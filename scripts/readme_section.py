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
