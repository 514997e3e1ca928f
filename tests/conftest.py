"""Shared fixtures: small phantoms, finished tiny runs, and pydicom's bundled MR test files (no
downloads). The runs are trained once per session: a test that changes one copies it first."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from support import TINY, _quiet, app, runner

from mtl_meniscus.config import load_config
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.phantom.slices import write_phantom

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(scope="session")
def pydicom_files() -> Path:
    """Folder of the MR test files shipped inside pydicom (MR_small.dcm, MR_truncated.dcm, ...)."""
    assert (PYDICOM_TEST_FILES / "MR_small.dcm").is_file()
    return PYDICOM_TEST_FILES


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory) -> Path:
    """A 60-image phantom (seed 3) shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("phantom60")
    write_phantom(folder, n=60, seed=3)
    return folder


@pytest.fixture(scope="session")
def data64(tmp_path_factory) -> Path:
    """A 40-image 64-pixel phantom (seed 5) shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("data64")
    write_phantom(folder, n=40, seed=5, size=64)
    return folder


@pytest.fixture(scope="session")
def run64(data64, tmp_path_factory) -> Path:
    """A finished one-epoch tiny run (shared mode) on data64, trained through the CLI."""
    out = tmp_path_factory.mktemp("run64") / "run"
    result = runner.invoke(
        app,
        ["train", "--config", str(TINY), "--data", str(data64), "--out", str(out), "--max-epochs", "1"],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A folder holding `data` (an 80-image 64-pixel phantom) and `run`, one epoch of the tiny preset."""
    folder = tmp_path_factory.mktemp("infer")
    write_phantom(folder / "data", n=80, seed=21, size=64)
    config = load_config(TINY, {"data.path": str(folder / "data"), "train.max_epochs": 1})
    train_run(config, folder / "run", console=_quiet())
    return folder
