"""Shared fixtures: small phantoms and pydicom's bundled MR test files (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

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
