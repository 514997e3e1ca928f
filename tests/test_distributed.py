"""torchrun: two CPU processes (gloo) train one model as one process would, rank 0 alone writes,
and a run resumes under torchrun. Each torchrun call starts two fresh interpreters (~10 s)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from mtl_meniscus.config import load_config
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.phantom.slices import write_phantom

pytestmark = pytest.mark.slow  # each test starts torchrun with two training processes

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# The tiny preset with a global batch of 16: 8 images per process.
SETTINGS = ["--set", "train.batch_size=16", "--max-epochs", "3"]
LOSS_TOLERANCE = 0.05  # relative, per epoch: on the CPU each process's BatchNorm sees its half batch


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, str(ROOT / "cli.py"), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp_data")
    write_phantom(folder, n=120, seed=4, size=64)
    return folder


def _one_process(data: Path, run: Path, **overrides) -> dict:
    config = load_config(
        TINY, {"data.path": str(data), "train.batch_size": 16, "train.max_epochs": 3} | overrides
    )
    return train_run(config, run, console=Console(quiet=True))


def test_two_processes_train_like_one_with_the_same_global_batch(data, tmp_path):
    _one_process(data, tmp_path / "one", **{"wandb.mode": "offline"})
    result = torchrun(
        "train", "--config", str(TINY), "--data", str(data), "--out", str(tmp_path / "two"),
        "--wandb", "offline", *SETTINGS,
    )  # fmt: skip
    assert "2 processes, torchrun" in result.stdout
    assert result.stdout.count("test + TTA") == 1  # rank 0 alone prints
    one, two = history(tmp_path / "one"), history(tmp_path / "two")
    assert [r["epoch"] for r in two] == [r["epoch"] for r in one] == ["1", "2", "3"]
    for a, b in zip(one, two):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) <= LOSS_TOLERANCE * float(a["train_loss"])
    # rank 0 alone wrote: the same files as one process, one wandb run
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    assert len(list((tmp_path / "two" / "wandb").glob("offline-run-*"))) == 1


def test_a_killed_run_resumes_under_torchrun(data, tmp_path):
    run = tmp_path / "run"

    def killed(member: str, epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    config = load_config(TINY, {"data.path": str(data), "train.batch_size": 16, "train.max_epochs": 3})
    with pytest.raises(KeyboardInterrupt):
        train_run(config, run, console=Console(quiet=True), on_epoch_end=killed)
    assert not (run / "metrics.json").exists()
    result = torchrun("train", "--resume", str(run))
    assert "resumed after epoch 1" in result.stdout
    assert [r["epoch"] for r in history(run)] == ["1", "2", "3"]
    assert (run / "metrics.json").is_file() and not list(run.glob("*.tmp*"))


def test_the_batch_must_split_evenly_and_the_folder_be_named(data, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "cli.py"),
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    odd = subprocess.run(
        [*command, "train", "--config", str(TINY), "--data", str(data), "--out", str(tmp_path / "odd"),
         "--set", "train.batch_size=7"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert odd.returncode != 0 and "a multiple of the 2 processes" in odd.stdout
    assert "Traceback" not in odd.stdout
    unnamed = subprocess.run(
        [*command, "train", "--config", str(TINY), "--data", str(data)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert unnamed.returncode != 0 and "give --out" in unnamed.stdout
