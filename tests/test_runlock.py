"""One process per run folder (io/runlock.py): a folder whose lock another live process holds is
refused by train and compare, and the lock goes with the process that held it."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import TINY, _quiet, app, runner

from mtl_meniscus.config import load_config
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.errors import MeniscusError

HOLD_LOCK = """
import fcntl, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def _locked_by_another_process(folder: Path):
    """Another live process holds `folder`'s lock inside the block; it is killed -9 on leaving."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the system drops its lock
        holder.wait()


def test_a_run_folder_held_by_a_live_process_is_refused_until_it_dies(data64, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = load_config(TINY, {"data.path": str(data64), "train.max_epochs": 1})
    with _locked_by_another_process(run):
        with pytest.raises(MeniscusError, match="is in use by another process"):
            train_run(config, run, console=_quiet())
        assert not (run / "config.yaml").exists()  # nothing written into the other process's folder
    train_run(config, run, console=_quiet())
    assert (run / "best.pt").is_file()
    assert runner.invoke(app, ["train", "--resume", str(run)]).exit_code == 0  # the lock was released


def test_a_compare_folder_held_by_a_live_process_is_refused(data64, tmp_path):
    from mtl_meniscus.commands.compare import run_compare
    from mtl_meniscus.commands.compare.settings import CompareConfig

    out = tmp_path / "cmp"
    out.mkdir()
    settings = CompareConfig(modes=("shared",), seeds=(0,), max_epochs=1, steps_per_epoch=1).validate()
    with _locked_by_another_process(out):
        with pytest.raises(MeniscusError, match="is in use by another process"):
            run_compare(settings, out, {"shared": TINY}, data_dir=data64, console=_quiet())
        assert not (out / "variants").exists()


def test_a_train_refused_for_bad_data_leaves_no_lock_and_no_folder_it_made(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "labels.csv").write_text("image,fissure,orientation,position\nmissing.png,1,0,0\n")
    made, kept = tmp_path / "new-run", tmp_path / "empty-run"
    kept.mkdir()
    for out in (made, kept):
        result = runner.invoke(app, ["train", "--data", str(bad), "--out", str(out), "--max-epochs", "1"])
        assert result.exit_code != 0 and "missing.png" in result.output
    assert not made.exists()  # the lock made it; nothing was written, so it went with the lock
    assert kept.is_dir() and not any(kept.iterdir())  # the user's folder stays, without a .lock


def test_a_lock_counts_only_on_the_file_still_at_the_path(tmp_path, monkeypatch):
    """Its last holder deletes the lock file on release; a process that opened the old file just
    before must not hold that deleted file while a third locks the new one."""
    from mtl_meniscus.io import runlock

    real_flock, calls = runlock.fcntl.flock, []

    def flock_after_the_holder_released(fd, operation):
        if not calls:  # between this open and this flock, the last holder deleted the file
            (tmp_path / "run" / ".lock").unlink()
        calls.append(fd)
        return real_flock(fd, operation)

    monkeypatch.setattr(runlock.fcntl, "flock", flock_after_the_holder_released)
    lock = runlock.RunLock(tmp_path / "run")
    held = os.fstat(lock._handle.fileno()).st_ino
    assert held == os.stat(tmp_path / "run" / ".lock").st_ino and len(calls) == 2
    lock.release()
    assert not (tmp_path / "run").exists()


def test_a_lock_in_a_folder_made_read_only_is_released_without_hiding_the_error(tmp_path, monkeypatch):
    """The run folder made read-only mid-run: deleting .lock on release failed, and that error
    (".lock: Read-only file system") replaced the one that stopped the run (best.pt's)."""
    import errno

    from mtl_meniscus.io.runlock import RunLock

    lock = RunLock(tmp_path / "run")
    real_unlink = Path.unlink

    def read_only(self, missing_ok=False):
        if self.name == ".lock":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only)
    lock.release()  # no error of its own
    monkeypatch.undo()
    RunLock(tmp_path / "run").release()  # and the folder is free again
