"""Progress bars (engine/progress.py): drawn on a terminal only, never when quiet (--quiet, or a
quiet Console), and with the same columns everywhere."""

import io

import pytest
from rich.console import Console
from rich.progress import TextColumn

from mtl_meniscus.engine.progress import counted_progress, progress_bar, set_quiet, shows_progress


@pytest.fixture(autouse=True)
def not_quiet():
    set_quiet(False)
    yield
    set_quiet(False)


def _drawn(console: Console) -> str:
    """What a counted bar of 5 steps leaves on `console`."""
    with counted_progress(console, "writing images") as on_count:
        for done in range(1, 6):
            on_count(done, 5)
    return console.file.getvalue()


def _terminal(**options) -> Console:
    return Console(force_terminal=True, file=io.StringIO(), width=100, **options)


def test_a_bar_is_drawn_on_a_terminal():
    console = _terminal()
    assert shows_progress(console)
    shown = _drawn(console)
    assert "writing images" in shown and "5/5" in shown


def test_no_bar_outside_a_terminal_or_when_quiet():
    assert _drawn(Console(file=io.StringIO(), width=100)) == ""  # a log file or a pipe
    assert not shows_progress(_terminal(quiet=True))  # a quiet console (a torchrun rank but 0)
    set_quiet(True)  # --quiet
    console = _terminal()
    assert not shows_progress(console) and _drawn(console) == ""
    console.print("a message")
    assert "a message" in console.file.getvalue()  # --quiet silences the bars, not the messages
    set_quiet(False)
    assert shows_progress(_terminal())


def test_every_bar_has_the_standard_columns_and_extras_before_the_time():
    progress = progress_bar(_terminal(), TextColumn("loss {task.fields[loss]:.4f}"))
    names = [type(column).__name__ for column in progress.columns]
    assert names == [
        "TextColumn",
        "BarColumn",
        "MofNCompleteColumn",
        "TextColumn",
        "TimeRemainingColumn",
    ]
    assert [type(c).__name__ for c in progress_bar(_terminal()).columns] == [
        "TextColumn",
        "BarColumn",
        "MofNCompleteColumn",
        "TimeRemainingColumn",
    ]
