"""Untrusted input through the CLI, one test per class of hostile or careless input: paths that
leave their folder, sizes declared in headers, YAML expansion, secrets in messages, parse errors,
duplicates and conflicts, worker counts, refused imports. Each asserts the exit code, a message
that names the file, row or key, and what was (not) written; the bombs run in a subprocess whose
address space is limited, so that a decoded bomb would fail there instead of passing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel
import numpy as np
import pytest
from typer.testing import CliRunner

from mtl_meniscus.cli import app
from mtl_meniscus.phantom.exams import write_phantom_exams
from mtl_meniscus.phantom.slices import write_phantom

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
KNEE_HEADER = "file,slice,study_level,x,y,width,height,label\n"
ADDRESS_SPACE = 5 << 30  # bytes: torch and a model fit; the bombs below would need 16 GB or more


def invoke(*args, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def limited(*args, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter with its address space limited to ADDRESS_SPACE."""
    program = (
        f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE}, {ADDRESS_SPACE})); "
        "from mtl_meniscus.cli import app; sys.argv = ['mtl-meniscus', *sys.argv[1:]]; app()"
    )
    return subprocess.run(
        [sys.executable, "-c", program, *map(str, args)],
        cwd=cwd,
        env=os.environ | {"WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)} | (env or {}),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def volumes(tmp_path) -> Path:
    """A fastMRI-style volumes folder with one 4-slice 32x32 reconstruction, file1000001.h5."""
    folder = tmp_path / "h5"
    folder.mkdir()
    with h5py.File(folder / "file1000001.h5", "w") as handle:
        handle["reconstruction_rss"] = np.random.default_rng(0).random((4, 32, 32)).astype(np.float32)
    return folder


def import_fastmri(knee_rows: str, volumes: Path, out: Path):
    knee = volumes.parent / "knee.csv"
    knee.write_text(KNEE_HEADER + knee_rows)
    return invoke("import-fastmri", knee, volumes, out)


def written_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def test_paths_named_in_a_file_never_leave_its_folder(volumes, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(volumes / "file1000001.h5", outside / "secret_knee.h5")
    rows = (
        "../outside/secret_knee,1,No,1,1,4,4,Meniscus Tear\n"
        f"{outside / 'secret_knee'},1,No,1,1,4,4,Meniscus Tear\n"
        "file1000001,1,No,1,1,4,4,Meniscus Tear\n"
    )
    result = import_fastmri(rows, volumes, tmp_path / "out")
    assert result.exit_code == 1
    assert "knee.csv" in result.output and "row 2, column 'file'" in result.output
    assert "row 3, column 'file'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # nothing linked, nothing written

    # the same rule for labels.csv (image and mask columns)
    data = tmp_path / "data"
    write_phantom(data, n=40, seed=1, size=64)
    labels = (data / "labels.csv").read_text().splitlines()
    labels[1] = "../outside/secret.png" + labels[1][labels[1].index(",") :]
    (data / "labels.csv").write_text("\n".join(labels) + "\n")
    result = invoke("train", "--config", TINY, "--data", data, "--out", tmp_path / "run")
    assert result.exit_code == 1 and "row 2, column 'image'" in result.output
    assert not (tmp_path / "run" / "best.pt").exists()


def test_declared_sizes_are_held_to_one_pixel_budget_before_decoding(run64, volumes, tmp_path):
    # a tiny .h5 that declares 3,000,000 slices, or 40 slices of 20000x20000
    for name, shape in (("file1000002", (3_000_000, 320, 320)), ("file1000003", (40, 20_000, 20_000))):
        with h5py.File(volumes / f"{name}.h5", "w") as handle:
            handle.create_dataset("reconstruction_rss", shape=shape, dtype=np.float32, chunks=(1, 64, 64))
        assert (volumes / f"{name}.h5").stat().st_size < 100_000
        result = import_fastmri(f"{name},1,No,1,1,4,4,Meniscus Tear\n", volumes, tmp_path / name)
        assert result.exit_code == 1 and f"{name}.h5" in result.output, result.output
        assert ("slices" in result.output) if shape[0] > 1000 else ("above the limit" in result.output)
        assert not (tmp_path / name).exists()

    # whole exams: 250,000 slices of 1x1 pixel (1 MB) are 16 GB once resized to the model's 64x64
    bomb = tmp_path / "exams"
    bomb.mkdir()
    nibabel.save(nibabel.Nifti2Image(np.zeros((1, 1, 250_000), np.float32), np.eye(4)), bomb / "tall.nii.gz")
    np.save(bomb / "tall.npy", np.zeros((250_000, 1, 1), np.float32))
    result = limited(
        "predict", run64, bomb / "tall.nii.gz", "--exams", "--out", tmp_path / "p.csv", cwd=tmp_path
    )
    assert result.returncode == 1 and "1 failed, see the error column" in result.stdout, result.stderr
    row = (tmp_path / "p.csv").read_text().splitlines()[1]  # the exam's error row
    assert "tall.nii.gz" in row and "each slice counted at its own size or at 64x64" in row
    mrnet = tmp_path / "mrnet"
    (mrnet / "valid" / "sagittal").mkdir(parents=True)
    shutil.copy(bomb / "tall.npy", mrnet / "valid" / "sagittal" / "0000.npy")
    (mrnet / "valid-meniscus.csv").write_text("0,1\n")
    result = limited("evaluate", run64, "--mrnet", mrnet, "--out", tmp_path / "eval", cwd=tmp_path)
    assert result.returncode == 1 and "0000.npy" in result.stdout and "above the limit" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr

    # a DICOM series counts all its slices: each of 6 files is within the limit, the series is not
    series = tmp_path / "series"
    write_phantom_exams(series, n=20, n_slices=6, seed=0, size=64, fmt="dicom-series")
    exam = sorted(p for p in series.iterdir() if p.is_dir())[0]
    limit = {"MTL_MENISCUS_MAX_PIXELS": "20000"}
    result = invoke("predict", run64, exam, "--exams", "--out", tmp_path / "s.csv", env=limit)
    assert result.exit_code == 1 and "a series of 6 DICOM files" in (tmp_path / "s.csv").read_text()
    result = invoke("predict", run64, exam / "IM0000.dcm", "--out", tmp_path / "one.csv", env=limit)
    assert result.exit_code == 0, result.output


def test_yaml_aliases_are_refused_in_set_values_and_config_files(tmp_path):
    laughs = (
        "{a: &a [x,x,x,x,x,x,x,x,x], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]}"
    )
    for value in (laughs, "&a [*a]"):
        start = time.perf_counter()
        result = invoke(
            "train", "--config", TINY, "--set", f"augment.rotation_deg={value}", "--out", tmp_path / "r"
        )
        assert result.exit_code == 1 and "--set augment.rotation_deg" in result.output
        assert "aliases" in result.output and time.perf_counter() - start < 10
    preset = tmp_path / "preset.yaml"
    preset.write_text("train: &t {lr: 0.001}\naugment: *t\n")
    result = invoke("train", "--config", preset, "--out", tmp_path / "r")
    assert result.exit_code == 1 and str(preset) in result.output and "aliases" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        ("postgresql//user:s3cret-pw@host/db", ["s3cret-pw"]),  # malformed: no ':' after the scheme
        ("postgresql://user:p@ss-w0rd@host/db", ["p@ss-w0rd", "ss-w0rd"]),  # '@' in the password
        ("postgresql://user@host/db?password=qu3ry-pw&sslmode=require", ["qu3ry-pw"]),
    ],
)
def test_secrets_in_a_storage_url_are_never_printed(url, secrets, tmp_path):
    pytest.importorskip("optuna")
    result = invoke("tune", "--config", TINY, "--out", tmp_path / "study", "--storage", url)
    assert result.exit_code == 1 and "--storage" in result.output and "***" in result.output
    for secret in secrets:
        assert secret not in result.output


def test_parse_errors_name_the_file_and_cost_no_other_work(run64, volumes, tmp_path):
    # a series with a non-numeric InstanceNumber: its own error row, the other exam predicted
    series = tmp_path / "series"
    write_phantom_exams(series, n=20, n_slices=6, seed=0, size=64, fmt="dicom-series")
    bad, good = sorted(p for p in series.iterdir() if p.is_dir())[:2]
    _break_instance_numbers(bad)  # no geometry tags: the series is ordered by InstanceNumber
    result = invoke("predict", run64, bad, good, "--exams", "--out", tmp_path / "p.csv")
    assert result.exit_code == 1 and "Traceback" not in result.output
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 3 and "is not a number" in rows[1] and bad.name in rows[1]
    assert good.name in rows[2] and "not a number" not in rows[2]

    # CSVs that are not UTF-8, and numbers that are not finite
    mrnet = tmp_path / "mrnet"
    (mrnet / "valid" / "sagittal").mkdir(parents=True)
    (mrnet / "valid-meniscus.csv").write_bytes("0,1\n1,0 \xe9\n".encode("latin-1"))
    result = invoke("evaluate", run64, "--mrnet", mrnet)
    assert result.exit_code == 1 and "valid-meniscus.csv: not UTF-8" in result.output
    result = import_fastmri("file1000001,1,No,inf,1,4,4,Meniscus Tear\n", volumes, tmp_path / "out")
    assert result.exit_code == 1 and "row 2, column 'x': bad value 'inf'" in result.output

    # an .h5 of 4 axes, and one cut short
    with h5py.File(volumes / "file1000002.h5", "w") as handle:
        handle["reconstruction_rss"] = np.zeros((2, 3, 32, 32), np.float32)
    result = import_fastmri("file1000002,1,No,1,1,4,4,Meniscus Tear\n", volumes, tmp_path / "out")
    assert (
        result.exit_code == 1
        and "file1000002.h5: the reconstruction has shape (2, 3, 32, 32)" in result.output
    )
    truncated = volumes / "file1000003.h5"
    truncated.write_bytes((volumes / "file1000001.h5").read_bytes()[:1000])
    result = import_fastmri("file1000003,1,No,1,1,4,4,Meniscus Tear\n", volumes, tmp_path / "out")
    assert result.exit_code == 1 and "file1000003.h5: not a readable HDF5 file" in result.output

    # torchrun's environment, half set
    result = invoke("train", "--config", TINY, "--out", tmp_path / "r", env={"WORLD_SIZE": "2", "RANK": ""})
    assert result.exit_code == 1 and "RANK is not" in result.output and "Traceback" not in result.output


def _break_instance_numbers(folder: Path) -> None:
    """Remove the geometry tags of every slice and give one a non-numeric InstanceNumber."""
    import pydicom

    for k, file in enumerate(sorted(folder.glob("*.dcm"))):
        dataset = pydicom.dcmread(file)
        del dataset.ImagePositionPatient
        del dataset.ImageOrientationPatient
        dataset.save_as(file)
        if k == 2:  # pydicom would not write a bad IS value: patch the bytes (same length)
            number = str(dataset.InstanceNumber).encode()
            raw = file.read_bytes()
            tag = raw.index(b"\x20\x00\x13\x00")  # (0020,0013) InstanceNumber, explicit VR little endian
            value = raw.index(number, tag)
            file.write_bytes(raw[:value] + b"x" * len(number) + raw[value + len(number) :])


def test_duplicates_and_conflicts_are_named_by_row_or_file(run64, volumes, tmp_path):
    # a slice exported twice in a series
    series = tmp_path / "series"
    write_phantom_exams(series, n=20, n_slices=6, seed=0, size=64, fmt="dicom-series")
    exam = sorted(p for p in series.iterdir() if p.is_dir())[0]
    shutil.copy(exam / "IM0002.dcm", exam / "copy_of_2.dcm")
    invoke("predict", run64, exam, "--exams", "--out", tmp_path / "p.csv")
    row = (tmp_path / "p.csv").read_text().splitlines()[1]
    assert "IM0002.dcm" in row and "copy_of_2.dcm" in row and "exported twice" in row

    # an MRNet case listed three times, once with another label
    mrnet = tmp_path / "mrnet"
    write_phantom_exams(mrnet, n=20, n_slices=4, seed=0, size=64, fmt="mrnet")
    labels = mrnet / "valid-meniscus.csv"
    first = labels.read_text().splitlines()[0]
    case, label = first.split(",")
    labels.write_text(labels.read_text() + f"{first}\n{case},{1 - int(label)}\n")
    result = invoke("evaluate", run64, "--mrnet", mrnet)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"case {case} listed again (first at row 1)" in result.output
    assert f"with label {1 - int(label)}, but row 1 says {label}" in result.output

    # a fastMRI+ box off its image, and a data folder without a single tear
    result = import_fastmri("file1000001,1,No,40,1,4,4,Meniscus Tear\n", volumes, tmp_path / "out")
    assert result.exit_code == 1 and "row 2: a Meniscus Tear box of file1000001.h5 at x=40" in result.output
    data = tmp_path / "data"
    write_phantom(data, n=40, seed=1, size=64)
    lines = (data / "labels.csv").read_text().splitlines()
    header = lines[0].split(",")
    cleared = []
    for line in lines[1:]:
        cells = line.split(",")
        (
            cells[header.index("fissure")],
            cells[header.index("orientation")],
            cells[header.index("position")],
        ) = "0", "", ""
        cleared.append(",".join(cells))
    (data / "labels.csv").write_text("\n".join([lines[0], *cleared]) + "\n")
    for mode, message in (
        ("shared", "the train split has no tears"),
        ("separate", "the orientation network has no training image"),
    ):
        result = invoke("train", "--mode", mode, "--config", TINY, "--data", data, "--out", tmp_path / mode)
        assert result.exit_code == 1 and message in result.output, result.output


def test_worker_counts_are_bounded(tmp_path):
    start = time.perf_counter()
    result = invoke("compare", "--jobs", "100000", "--out", tmp_path / "cmp")
    assert result.exit_code == 1 and "--jobs: bad value 100000" in result.output
    assert time.perf_counter() - start < 30 and not (tmp_path / "cmp").exists()


def test_a_refused_import_leaves_out_as_it_was(volumes, tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new"):
        result = import_fastmri("file1000001,9,No,1,1,4,4,Meniscus Tear\n", volumes, out)
        assert result.exit_code == 1 and "on slice 9, but the volume has 4 slices" in result.output
    assert written_files(tmp_path / "empty") == [] and not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if "-import-" in p.name]  # no staging folder left
    result = import_fastmri("file1000001,2,No,1,1,4,4,Meniscus Tear\n", volumes, tmp_path / "empty")
    assert result.exit_code == 0, result.output  # the same command, fixed, then runs
    assert (tmp_path / "empty" / "labels.csv").is_file()


def test_mrnet_without_a_readable_training_exam_says_so(tmp_path):
    mrnet = tmp_path / "mrnet"
    write_phantom_exams(mrnet, n=20, n_slices=4, seed=0, size=64, fmt="mrnet")
    for file in (mrnet / "train" / "sagittal").glob("*.npy"):
        file.write_bytes(b"not an array")
    result = invoke("train", "--config", TINY, "--mrnet", mrnet, "--out", tmp_path / "run")
    assert result.exit_code == 1 and "MRNet's train folder" in result.output
    assert "'split' column" not in result.output
