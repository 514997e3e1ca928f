"""Data larger than memory: with data.load lazy, a labels.csv data set is read from its files when
a batch needs it, so peak memory does not grow with the number of images; the images a model sees
are the same either way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mtl_meniscus.config import DataConfig
from mtl_meniscus.data.folder import LazySlices
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.phantom.slices import write_phantom

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def volumes_folder(folder: Path, n_volumes: int, slices: int = 100, size: int = 256) -> Path:
    """A labels.csv folder of fastMRI-like .h5 volumes, one row per slice, random labels."""
    rng = np.random.default_rng(n_volumes)
    rows = ["image,slice,fissure,orientation,position,patient_id"]
    (folder / "volumes").mkdir(parents=True)
    for v in range(n_volumes):
        with h5py.File(folder / "volumes" / f"v{v:03d}.h5", "w") as handle:
            data = rng.random((slices, size, size), dtype=np.float32)
            handle.create_dataset("reconstruction_rss", data=data, chunks=(1, size, size))
        for s in range(slices):
            tear = rng.random() < 0.3
            subtype = f"{rng.choice(['horizontal', 'vertical'])},{rng.choice(['anterior', 'posterior'])}"
            rows.append(f"volumes/v{v:03d}.h5,{s},{int(tear)},{subtype if tear else ','},v{v}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def peak_rss_mib(data: Path, out: Path, load: str) -> float:
    """Train the tiny preset for one epoch on `data` in a fresh interpreter; its peak RSS (MiB)."""
    program = (
        "import atexit, resource, sys; "
        "atexit.register(lambda: print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); "
        "from mtl_meniscus.cli import app; sys.argv = ['mtl-meniscus', *sys.argv[1:]]; app()"
    )
    args = ["train", "--config", TINY, "--data", data, "--out", out, "--max-epochs", "1"]
    args += ["--set", "data.image_size=256", "--set", f"data.load={load}"]
    result = subprocess.run(
        [sys.executable, "-c", program, *map(str, args)],
        capture_output=True,
        text=True,
        env=os.environ | {"WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return int(result.stdout.split("PEAK_RSS_KIB")[1].split()[0]) / 1024


@pytest.mark.slow  # two trainings in fresh interpreters, ~40 s
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    small = volumes_folder(tmp_path / "small", n_volumes=2)  # 200 slices of 256 x 256
    large = volumes_folder(tmp_path / "large", n_volumes=20)  # 2000 slices: 500 MiB as float32
    baseline = peak_rss_mib(small, tmp_path / "run-small", "memory")
    lazily = peak_rss_mib(large, tmp_path / "run-large", "lazy")
    assert lazily <= 1.3 * baseline, (baseline, lazily)


def test_lazy_and_in_memory_give_the_same_images(tmp_path):
    write_phantom(tmp_path / "data", n=40, seed=3, size=64)
    held = prepare_data(tmp_path / "data", DataConfig(image_size=64, load="memory"))
    lazy = prepare_data(tmp_path / "data", DataConfig(image_size=64, load="lazy"))
    assert isinstance(lazy.images, LazySlices) and not isinstance(held.images, LazySlices)
    assert lazy.splits == held.splits and len(lazy.images) == len(held.images)
    for k in range(len(held.images)):
        np.testing.assert_array_equal(lazy.images[k], held.images[k])
    resized = prepare_data(tmp_path / "data", DataConfig(image_size=32, size_policy="resize", load="lazy"))
    assert resized.images[0].shape == (32, 32) and resized.resized == len(resized.records)
