"""Progress bars: one look for every long step (description, bar, M/N, time remaining) and one rule
for when they are drawn: on a terminal only, and not when quiet (`--quiet`, or a quiet Console).

Rich's own `Console.quiet` silences every message, which is more than `--quiet` means, so the CLI's
choice is kept here instead (`set_quiet`) and the console's messages still print.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

_quiet = False  # --quiet of the command this process runs (set by cli.py for every command)


def set_quiet(quiet: bool) -> None:
    """`--quiet`: no progress bars in this process (messages still print); False draws them again."""
    global _quiet
    _quiet = quiet


def shows_progress(console: Console) -> bool:
    """Whether bars are drawn on `console`: only on a terminal (never into a log file or a pipe), and
    not when quiet (--quiet, or a Console(quiet=True) such as a torchrun rank other than 0's)."""
    return console.is_terminal and not console.quiet and not _quiet


def progress_bar(console: Console, *extra: ProgressColumn) -> Progress:
    """A rich Progress with the standard columns: the task's description, bar, M/N and time
    remaining, with `extra` columns (e.g. the loss) before the time. Transient: a finished bar
    leaves the screen to the summary lines. Drawn only where `shows_progress` says so."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not shows_progress(console),
    )


@contextlib.contextmanager
def counted_progress(console: Console, what: str) -> Iterator[Callable[[int, int], None]]:
    """A bar described by `what`, fed by the callback it yields: `on_count(done, total)`, as the
    readers and writers below the engine call it (rows read, images or exams written)."""
    with progress_bar(console) as progress:
        bar = progress.add_task(what, total=None)
        yield lambda done, total: progress.update(bar, completed=done, total=total)
