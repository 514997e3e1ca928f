"""Helpers shared by the test modules (fixtures are in conftest.py): the CLI app and a runner for
it, tiny data folders, the check that a command ended as documented, and `serve` in a subprocess.

Test modules import them as `from support import ...`: pytest puts tests/ on sys.path.
"""

import csv
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import app  # noqa: E402

runner = CliRunner()
TINY = ROOT / "configs" / "tiny.yaml"


def _quiet():
    return Console(quiet=True)


class Killed(Exception):
    """A kill of the training process, as kill_after raises it between two epochs."""


def kill_after(epoch: int, member: str | None = None):
    """An on_epoch_end for train_run that raises Killed once `epoch` of `member` (of any network
    when None) has finished: the run folder is then as a kill between two epochs leaves it."""

    def on_epoch_end(name: str, done: int) -> None:
        if done == epoch and member in (None, name):
            raise Killed

    return on_epoch_end


def _png(path: Path, size=(64, 64), value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    cv2.imwrite(str(path), rng.integers(0, 4000, size).astype(np.uint16))
    return path


def _labels(folder: Path, rows, header=("image", "fissure", "orientation", "position")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return folder


def _split_folder(folder: Path, splits: list[str], tears: bool = True) -> Path:
    """A data folder of one image per entry of `splits`, its labels.csv with that split column."""
    rows = []
    for k, split in enumerate(splits):
        _png(folder / "img" / f"{k}.png", value=k)
        tear = tears and k % 2 == 1
        rows.append(
            (f"img/{k}.png", int(tear), "vertical" if tear else "", "posterior" if tear else "", split)
        )
    return _labels(folder, rows, header=("image", "fissure", "orientation", "position", "split"))


def _clean(result) -> None:
    """A command ended as documented: no traceback, no exception other than its exit."""
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def _copy_run(run64: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run64, copy)
    return copy


def _predict(run, *inputs, out, extra=()):
    args = ["predict", str(run), *map(str, inputs), "--out", str(out), "--tta", "0", *extra]
    return runner.invoke(app, args)


SAGITTAL_ORIENTATION = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # the canonical view's (io/orientation.py)


def sagittal_copy(source: Path, target: Path) -> Path:
    """A copy of a DICOM file (e.g. pydicom's axial MR_small.dcm) that says it is a sagittal slice
    in the canonical view, for the models here, which read sagittal images only."""
    import pydicom

    dataset = pydicom.dcmread(source)
    dataset.ImageOrientationPatient = SAGITTAL_ORIENTATION
    target.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(target)
    return target


SERVING = re.compile(r"^serving .* on (http://\S+)/ \(page\)")  # run_serve's line, once it listens


@contextmanager
def serve_process(run: Path, *options: str, wait_s: float = 120) -> Iterator[str]:
    """`serve RUN --port 0 OPTIONS` in a subprocess: its base URL as its line says (the port it
    chose; no other process can have taken it), then stopped. A thread reads its output to the end
    (a full pipe would block the server) and keeps it for the failure message."""
    command = [sys.executable, "cli.py", "serve", str(run), "--port", "0", *options]
    env = os.environ | {"WANDB_MODE": "disabled"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def read() -> None:
        for line in process.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)  # the output ended: serve stopped

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline, url = time.monotonic() + wait_s, None
        while url is None:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(
                    f"serve printed no address within {wait_s:g} s: {''.join(output)}"
                ) from None
            if line is None:
                raise AssertionError(f"serve stopped: {''.join(output)}")
            url = (match := SERVING.match(line)) and match[1]
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
        reader.join(10)  # at the end of the output, now that serve has stopped
        process.stdout.close()
