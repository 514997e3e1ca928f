"""Command-line interface: `python cli.py --help`. Each command parses options and makes one call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mtl_meniscus.errors import MeniscusError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Meniscus tear classification on sagittal knee MRI: shared trunk vs three-CNN cascade.",
)
console = Console()


@app.callback()
def main() -> None:
    """Meniscus tear classification on sagittal knee MRI: shared trunk vs three-CNN cascade."""


def fail(err: Exception) -> None:
    """Print a domain error as a clear message and exit 1 (no traceback)."""
    console.print(f"[bold red]error:[/] {err}", highlight=False)
    raise typer.Exit(code=1)


@app.command("make-phantom")
def make_phantom(
    out: Annotated[Path, typer.Argument(help="Folder to write images/, masks/ and labels.csv into.")],
    n: Annotated[
        int, typer.Option(help="Number of images, wrong-size and double-tear ones included.")
    ] = 1128,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same bytes.")] = 0,
) -> None:
    """Write the synthetic knee MRI phantom in the folder format."""
    from mtl_meniscus.phantom import summarize_cases, write_phantom

    try:
        cases = write_phantom(out, n=n, seed=seed)
    except (MeniscusError, ValueError) as err:
        fail(err)
    summary = summarize_cases(cases)
    console.print(f"wrote {len(cases)} images to {out}")
    console.print(", ".join(f"{k}: {v}" for k, v in summary.items()), highlight=False)


if __name__ == "__main__":
    app()
