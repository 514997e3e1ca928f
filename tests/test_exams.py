"""Whole exams: volumes and DICOM series read in anatomical order, and predict on exams."""

import csv
import shutil
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mtl_meniscus.cli import app
from mtl_meniscus.config import load_config
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import load_trained
from mtl_meniscus.errors import ImageReadError
from mtl_meniscus.io.exams import read_exam
from mtl_meniscus.phantom.slices import write_phantom

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SAGITTAL = [0, 1, 0, 0, 0, -1]  # rows along y, columns along -z: the slice normal is -x


def write_series(
    folder: Path, source: Path, n: int, uid: str = "1.2.3.4", geometry: bool = True
) -> np.ndarray:
    """n slices of MR_small.dcm, slice k brightened by 100 k, written in shuffled file order with
    positions along the normal (or only InstanceNumber); returns the expected (n, 64, 64) stack."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(source)
    raw = base.pixel_array.astype(np.int32)
    names = np.random.default_rng(1).permutation(n)  # file k gets a name unrelated to its place
    for k in range(n):
        ds = pydicom.dcmread(source)
        ds.PixelData = (raw + 100 * k).astype(base.pixel_array.dtype).tobytes()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, f"{uid}.{k}"
        ds.InstanceNumber = k + 1
        if geometry:
            ds.ImageOrientationPatient = SAGITTAL
            ds.ImagePositionPatient = [10.0 - 2.5 * k, 0.0, 0.0]  # along -x: k increases along the normal
        else:
            for tag in ("ImageOrientationPatient", "ImagePositionPatient"):
                if tag in ds:
                    delattr(ds, tag)
        ds.save_as(folder / f"IM{names[k]:04d}.dcm")
    return np.stack([(raw + 100 * k).astype(np.float32) for k in range(n)])


def test_a_dicom_series_is_read_in_slice_order_not_file_order(pydicom_files, tmp_path):
    expected = write_series(tmp_path / "exam", pydicom_files / "MR_small.dcm", 5)
    np.testing.assert_array_equal(read_exam(tmp_path / "exam"), expected)
    # without the geometry tags, InstanceNumber orders it
    expected = write_series(tmp_path / "numbered", pydicom_files / "MR_small.dcm", 4, geometry=False)
    np.testing.assert_array_equal(read_exam(tmp_path / "numbered"), expected)


def test_two_series_in_one_folder_are_named(pydicom_files, tmp_path):
    write_series(tmp_path / "exam", pydicom_files / "MR_small.dcm", 3, uid="1.2.3.4")
    write_series(tmp_path / "other", pydicom_files / "MR_small.dcm", 2, uid="9.8.7")
    for file in (tmp_path / "other").iterdir():
        shutil.copy(file, tmp_path / "exam" / f"other_{file.name}")
    with pytest.raises(
        ImageReadError, match=r"2 series in one exam folder: 1\.2\.3\.4 .*3 files.*9\.8\.7 .*2 files"
    ):
        read_exam(tmp_path / "exam")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="no DICOM files"):
        read_exam(tmp_path / "empty")


def by_slice(folder: Path) -> dict[int, Path]:
    """write_series' files by their slice k (InstanceNumber k + 1, as written)."""
    return {int(pydicom.dcmread(p).InstanceNumber) - 1: p for p in folder.iterdir() if p.suffix == ".dcm"}


def _drop_slice_3(folder: Path) -> None:
    by_slice(folder)[3].unlink()


def _move_slices_3_on_30_mm(folder: Path) -> None:
    for k, file in by_slice(folder).items():
        if k >= 3:
            ds = pydicom.dcmread(file)
            ds.ImagePositionPatient = [10.0 - 2.5 * k - 30.0, 0.0, 0.0]  # 30 mm further along the normal
            ds.save_as(file)


def _number_by_ten_but_the_last(folder: Path) -> None:
    for k, file in by_slice(folder).items():
        ds = pydicom.dcmread(file)
        ds.InstanceNumber = 77 if k == 5 else 10 * (k + 1)  # 10, 20, ..., 50, 77
        ds.save_as(file)


@pytest.mark.parametrize(
    "geometry, change, kept, gap, step, usual",
    [
        (True, _drop_slice_3, [0, 1, 2, 4, 5], (2, 4), "are 5.0 mm apart", "2.5 mm"),
        (True, _move_slices_3_on_30_mm, [0, 1, 2, 3, 4, 5], (2, 3), "are 32.5 mm apart", "2.5 mm"),
        (
            False,
            _number_by_ten_but_the_last,
            [0, 1, 2, 3, 4, 5],
            (4, 5),
            "are 27 apart in InstanceNumber",
            "10",
        ),
    ],
    ids=["slice removed", "30 mm jump", "InstanceNumber jump"],
)
def test_a_gap_in_a_series_is_noted_naming_its_slices(
    pydicom_files, tmp_path, geometry, change, kept, gap, step, usual
):
    expected = write_series(tmp_path / "exam", pydicom_files / "MR_small.dcm", 6, geometry=geometry)
    files = by_slice(tmp_path / "exam")
    change(tmp_path / "exam")
    notes: list[str] = []
    np.testing.assert_array_equal(read_exam(tmp_path / "exam", notes=notes), expected[kept])
    at = kept.index(gap[0])  # the gap's place in the exam as read (0-based, as predict numbers slices)
    said = f"slices {at}-{at + 1} ({files[gap[0]].name}, {files[gap[1]].name}) {step}, the others {usual}"
    assert notes[-1] == f"{said}: a slice missing?"


def test_an_evenly_spaced_series_gets_no_note(pydicom_files, tmp_path):
    write_series(tmp_path / "exam", pydicom_files / "MR_small.dcm", 6)
    notes: list[str] = []
    read_exam(tmp_path / "exam", notes=notes)
    assert notes == []
    # a narrower step is uneven too: slice 4 moved to 1 mm after slice 3
    ds = pydicom.dcmread(by_slice(tmp_path / "exam")[4])
    ds.ImagePositionPatient = [10.0 - 2.5 * 3 - 1.0, 0.0, 0.0]
    ds.save_as(by_slice(tmp_path / "exam")[4])
    read_exam(tmp_path / "exam", notes=notes)
    assert notes[0].startswith("slices 3-4 (") and "are 1.0 mm apart" in notes[0]
    assert notes[0].endswith("4.0 mm, the others 2.5 mm: uneven slice spacing")


def test_a_series_with_positions_missing_on_some_files_says_so(pydicom_files, tmp_path):
    expected = write_series(tmp_path / "exam", pydicom_files / "MR_small.dcm", 5)
    file = by_slice(tmp_path / "exam")[2]
    ds = pydicom.dcmread(file)
    del ds.ImagePositionPatient
    ds.save_as(file)
    notes: list[str] = []
    np.testing.assert_array_equal(read_exam(tmp_path / "exam", notes=notes), expected)  # InstanceNumber
    assert notes == [
        f"no usable ImagePositionPatient in 1 of 5 files (e.g. {file.name}): slices ordered by InstanceNumber"
    ]


def test_series_files_are_recognised_by_content_and_stray_files_ignored(pydicom_files, tmp_path):
    exam = tmp_path / "exam"
    expected = write_series(exam, pydicom_files / "MR_small.dcm", 5)
    files = by_slice(exam)
    files[1].rename(exam / "IM0001")  # exports without a suffix
    files[3].rename(exam / "1.2.840.113619.2.5")  # named by UID: '.5' is no image suffix
    (exam / "README.txt").write_text("exported by the scanner\n")
    (exam / "notes").write_bytes(b"no preamble here")
    shutil.copy(pydicom_files / "dicomdirtests" / "DICOMDIR", exam / "DICOMDIR")  # an index, no image
    shutil.copy(pydicom_files / "dicomdirtests" / "DICOMDIR", exam / "INDEX")  # the same, renamed
    notes: list[str] = []
    np.testing.assert_array_equal(read_exam(exam, notes=notes), expected)
    assert notes == []
    # a broken file with the preamble is named, not dropped (a slice may be lost in it)
    (exam / "IM0009").write_bytes(bytes(128) + b"DICM" + b"\x02\x00")
    with pytest.raises(ImageReadError, match=r"IM0009: a DICOM file without an image \(no Rows/Columns"):
        read_exam(exam)
    (exam / "IM0009").unlink()
    # a folder whose only DICOM files are indexes holds no series
    for file in exam.iterdir():
        if file.name not in ("DICOMDIR", "INDEX", "README.txt"):
            file.unlink()
    with pytest.raises(ImageReadError, match="no DICOM files"):
        read_exam(exam)


def test_predict_takes_every_exam_of_a_folder_whatever_the_series_files_are_named(pydicom_files, tmp_path):
    """A folder is a series when the series reader would find a slice in it (by suffix or by
    content); its volume files are exams too, so a suffix-less series beside them is not lost."""
    from mtl_meniscus.commands.predict import collect_exams, skipped_note

    mixed = tmp_path / "mixed"
    write_series(mixed, pydicom_files / "MR_small.dcm", 3)
    for k, file in by_slice(mixed).items():
        file.rename(mixed / f"IM{k}")  # an export without suffixes
    np.save(mixed / "b.npy", np.zeros((2, 8, 8), np.float32))
    np.save(mixed / "a.npy", np.zeros((2, 8, 8), np.float32))
    (mixed / "README.txt").write_text("not an exam\n")
    volumes = tmp_path / "mrnet"  # MRNet's valid/sagittal/: one exam per volume
    volumes.mkdir()
    np.save(volumes / "0001.npy", np.zeros((2, 8, 8), np.float32))
    empty = tmp_path / "empty"
    empty.mkdir()
    single = volumes / "0001.npy"
    # a folder of exams (docs/data.md): series subfolders and volume files; volume files deeper
    # down are not searched (MRNet's valid/ holds axial/ and coronal/ .npy without a plane)
    folder = tmp_path / "exams"
    write_series(folder / "knee_001", pydicom_files / "MR_small.dcm", 3)
    np.save(folder / "knee_002.npy", np.zeros((2, 8, 8), np.float32))
    (folder / "axial").mkdir()
    np.save(folder / "axial" / "0001.npy", np.zeros((2, 8, 8), np.float32))
    skipped = []
    assert collect_exams([mixed, volumes, empty, single, folder], skipped) == [
        mixed,
        mixed / "a.npy",
        mixed / "b.npy",
        volumes / "0001.npy",
        empty,  # nothing to read: the folder gets its error row
        single,
        folder / "knee_002.npy",
        folder / "knee_001",
    ]
    assert skipped == [folder / "axial"]  # not read, and predict says so (skipped_note)
    note = skipped_note(skipped)
    assert f"not read: 1 subfolder(s) holding no DICOM series ({folder / 'axial'})" in note


def test_volumes_are_read_slices_first(tmp_path):
    volume = np.random.default_rng(0).normal(size=(6, 32, 40)).astype(np.float32)
    np.save(tmp_path / "exam.npy", volume)
    np.testing.assert_array_equal(read_exam(tmp_path / "exam.npy"), volume)
    # NIfTI keeps slices along its last axis
    nib.save(nib.Nifti1Image(np.moveaxis(volume, 0, -1), np.eye(4)), tmp_path / "exam.nii.gz")
    np.testing.assert_allclose(read_exam(tmp_path / "exam.nii.gz"), volume, rtol=1e-6)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exam_run")
    write_phantom(folder / "data", n=80, seed=21, size=64)
    config = load_config(TINY, {"data.path": str(folder / "data"), "train.max_epochs": 1})
    train_run(config, folder / "run", console=Console(quiet=True))
    return folder


def test_predict_names_the_subfolders_it_does_not_read(run, tmp_path):
    """One folder per patient with its volume inside: nothing was read and the folder's error row
    spoke of DICOM files alone; such subfolders are now named, with what to give instead."""
    folder = tmp_path / "patients"
    (folder / "p1").mkdir(parents=True)
    np.save(folder / "p1" / "knee.npy", np.zeros((3, 64, 64), np.float32))
    np.save(folder / "knee_002.npy", np.zeros((3, 64, 64), np.float32))
    args = [
        "predict",
        str(run / "run"),
        str(folder),
        "--exams",
        "--tta",
        "0",
        "--out",
        str(tmp_path / "e.csv"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert f"not read: 1 subfolder(s) holding no DICOM series ({folder / 'p1'})" in output
    assert "predicted 1 of 1 exams" in output


def test_predict_on_exams_takes_the_most_suspicious_slice(run, pydicom_files, tmp_path):
    images = sorted((run / "data" / "images").glob("*.png"))[:5]
    slices = np.stack([cv2.imread(str(p), cv2.IMREAD_UNCHANGED).astype(np.float32) for p in images])
    np.save(tmp_path / "knee.npy", slices)
    write_series(tmp_path / "series", pydicom_files / "MR_small.dcm", 3)  # 64x64 like the model
    out = tmp_path / "exams.csv"
    inputs = [tmp_path / "knee.npy", tmp_path / "series", tmp_path / "missing.npy"]
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(run / "run"),
            *map(str, inputs),
            "--exams",
            "--slices",
            "--tta",
            "0",
            "--precision",
            "fp32",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 1, result.output  # the missing exam fails; the others are predicted
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    exams = [r for r in rows if r["slice"] == ""]
    assert [r["exam"] for r in exams] == list(map(str, inputs))
    assert "not found" in exams[2]["error"] and exams[0]["error"] == exams[1]["error"] == ""
    # the exam's fissure probability is its slices' maximum, its top slice where that is
    trained = load_trained(run / "run", resolve_runtime("fp32"))
    probs = trained.predict(list(slices), resolve_runtime("fp32"))
    top = int(np.argmax(probs["fissure"]))
    assert int(exams[0]["slices"]) == 5 and int(exams[0]["top_slice"]) == top
    assert float(exams[0]["p_fissure"]) == pytest.approx(float(probs["fissure"].max()), abs=1e-5)
    per_slice = [r for r in rows if r["exam"] == str(inputs[0]) and r["slice"] != ""]
    assert [int(r["slice"]) for r in per_slice] == [0, 1, 2, 3, 4]
    for row, p in zip(per_slice, probs["fissure"]):
        assert float(row["p_fissure"]) == pytest.approx(float(p), abs=1e-5)
    assert len([r for r in rows if r["exam"] == str(inputs[1]) and r["slice"] != ""]) == 3


def test_a_gap_in_a_series_is_said_in_the_exams_row(run, pydicom_files, tmp_path):
    write_series(tmp_path / "gap", pydicom_files / "MR_small.dcm", 5)
    write_series(tmp_path / "even", pydicom_files / "MR_small.dcm", 5)
    missing = by_slice(tmp_path / "gap")[2]
    missing.unlink()
    out = tmp_path / "exams.csv"
    args = ["predict", str(run / "run"), str(tmp_path / "gap"), str(tmp_path / "even"), "--exams"]
    result = CliRunner().invoke(app, [*args, "--tta", "0", "--precision", "fp32", "--out", str(out)])
    assert result.exit_code == 0, result.output  # a note, not an error
    with out.open(newline="") as handle:
        rows = {Path(r["exam"]).name: r for r in csv.DictReader(handle)}
    assert rows["gap"]["slices"] == "4" and rows["gap"]["error"] == ""
    assert (
        "slices 1-2 (" in rows["gap"]["note"]
        and "are 5.0 mm apart, the others 2.5 mm: a slice missing?" in rows["gap"]["note"]
    )
    assert rows["even"]["note"] == ""


@pytest.mark.parametrize(
    "options, message",
    [
        (["--slices"], "--slices: only with --exams"),
        (["--exams", "--strict-size"], "--strict-size: not available"),
    ],
)
def test_exam_options_that_do_not_fit_are_named(run, tmp_path, options, message):
    np.save(tmp_path / "knee.npy", np.zeros((2, 64, 64), np.float32))
    result = CliRunner().invoke(app, ["predict", str(run / "run"), str(tmp_path / "knee.npy"), *options])
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output


# ---- phantom exams ------------------------------------------------------------------------------


def _digest(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_phantom_exams_in_the_mrnet_layout(tmp_path):
    from mtl_meniscus.phantom.exams import write_phantom_exams

    seen = []  # on_exam(done, total), as a progress display is fed
    exams = write_phantom_exams(
        tmp_path / "a", n=20, n_slices=6, seed=3, size=64, fmt="mrnet", on_exam=lambda *d: seen.append(d)
    )
    assert seen == [(k, 20) for k in range(1, 21)]
    write_phantom_exams(tmp_path / "b", n=20, n_slices=6, seed=3, size=64, fmt="mrnet")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # same seed, same bytes
    train = sorted((tmp_path / "a" / "train" / "sagittal").glob("*.npy"))
    valid = sorted((tmp_path / "a" / "valid" / "sagittal").glob("*.npy"))
    assert (len(train), len(valid)) == (18, 2)
    volume = np.load(train[0])
    assert volume.dtype == np.uint8 and volume.shape == (6, 64, 64)
    with (tmp_path / "a" / "valid-meniscus.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))  # no header: case,label
    assert rows == [[p.stem, str(e.case.fissure)] for p, e in zip(valid, exams[18:])]
    assert sum(e.case.fissure for e in exams) == 6  # the phantom's label mix: a quarter with a tear


def test_phantom_exam_formats_hold_the_same_volume_and_the_tear_spans_adjacent_slices(tmp_path):
    from mtl_meniscus.phantom.exams import render_exam, write_phantom_exams
    from mtl_meniscus.phantom.slices import PhantomSettings

    exams = write_phantom_exams(tmp_path / "dicom", n=20, n_slices=8, seed=5, size=64, fmt="dicom-series")
    write_phantom_exams(tmp_path / "nifti", n=20, n_slices=8, seed=5, size=64, fmt="nifti")
    exam = next(e for e in exams if e.case.fissure)
    from_dicom = read_exam(tmp_path / "dicom" / f"exam_{exam.name}")  # files in shuffled order
    np.testing.assert_array_equal(from_dicom, read_exam(tmp_path / "nifti" / f"exam_{exam.name}.nii.gz"))
    # the same exam without its tear differs exactly on the tear's slices, which are adjacent
    import dataclasses

    healthy = render_exam(dataclasses.replace(exam, tear_slices=None), 8, 5, PhantomSettings())
    differs = [s for s in range(8) if not np.array_equal(healthy[s], from_dicom[s])]
    first, last = exam.tear_slices
    assert differs == list(range(first, last + 1)) and 3 <= len(differs) <= 5
    # and there only around the tear: the exam's anatomy and intensity are the same on every slice,
    # and a slice's noise is its own whether the tear shows or not
    for s in differs:
        assert 0 < np.mean(healthy[s] != from_dicom[s]) < 0.03


def test_evaluate_on_mrnet_exams_gives_the_exam_level_auc(run, tmp_path):
    from sklearn.metrics import roc_auc_score

    from mtl_meniscus.phantom.exams import write_phantom_exams

    write_phantom_exams(tmp_path / "mrnet", n=40, n_slices=5, seed=2, size=64, fmt="mrnet")
    out = tmp_path / "eval"
    args = ["evaluate", str(run / "run"), "--mrnet", str(tmp_path / "mrnet"), "--split", "train"]
    result = CliRunner().invoke(
        app, [*args, "--tta", "0", "--precision", "fp32", "--bootstrap", "50", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "exam-level tear AUC" in result.output
    assert "training exams" not in result.output  # the run trained on slices of other knees
    with (out / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 36  # the train split: all but the last tenth
    metrics = __import__("json").loads((out / "metrics.json").read_text())
    truth = roc_auc_score([int(r["tear"]) for r in rows], [float(r["p_fissure"]) for r in rows])
    assert metrics["auc"] == pytest.approx(truth) and metrics["n_exams"] == 36
    assert "data_note" not in metrics
    low, high = metrics["auc_ci95"]
    assert low <= metrics["auc"] <= high
    # an exam's probability is the highest of its slices'
    volume = np.load(tmp_path / "mrnet" / "train" / "sagittal" / f"{rows[0]['case']}.npy").astype(np.float32)
    fp32 = resolve_runtime("fp32")
    slices = load_trained(run / "run", fp32).predict(list(volume), fp32)["fissure"]
    assert float(rows[0]["p_fissure"]) == pytest.approx(float(slices.max()), abs=1e-6)
    assert int(rows[0]["top_slice"]) == int(np.argmax(slices))


def test_evaluate_on_mrnet_exams_gives_each_exam_predicts_tta_answer(run, tmp_path):
    """With TTA, an exam's probability does not depend on its place in the folder: evaluate --mrnet
    draws the copies as predict --exams does (it drew exam k's with seed + k)."""
    from mtl_meniscus.phantom.exams import write_phantom_exams

    write_phantom_exams(tmp_path / "mrnet", n=20, n_slices=4, seed=3, size=64, fmt="mrnet")
    common = ["--tta", "2", "--precision", "fp32"]
    args = ["evaluate", str(run / "run"), "--mrnet", str(tmp_path / "mrnet"), "--split", "train"]
    result = CliRunner().invoke(app, [*args, *common, "--bootstrap", "0", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    with (tmp_path / "eval" / "predictions.csv").open(newline="") as handle:
        last = list(csv.DictReader(handle))[-1]
    exam = tmp_path / "mrnet" / "train" / "sagittal" / f"{last['case']}.npy"
    out = tmp_path / "predicted.csv"
    result = CliRunner().invoke(
        app, ["predict", str(run / "run"), str(exam), "--exams", *common, "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    with out.open(newline="") as handle:
        predicted = next(csv.DictReader(handle))
    assert float(last["p_fissure"]) == pytest.approx(float(predicted["p_fissure"]), abs=1e-6)


def test_a_bad_mrnet_folder_is_named(tmp_path):
    from mtl_meniscus.data.mrnet import read_mrnet
    from mtl_meniscus.errors import DataError

    (tmp_path / "valid" / "sagittal").mkdir(parents=True)
    np.save(tmp_path / "valid" / "sagittal" / "1130.npy", np.zeros((3, 8, 8), np.uint8))
    (tmp_path / "valid-meniscus.csv").write_text("1130,1\n1131,0\n1132,yes\n")
    with pytest.raises(DataError) as err:
        read_mrnet(tmp_path, "valid")
    assert "row 2: case '1131' has no file" in str(err.value) and "row 3: '1132,yes'" in str(err.value)
    with pytest.raises(DataError, match="train-meniscus.csv: not found"):
        read_mrnet(tmp_path, "train")


@pytest.mark.parametrize(
    "options, message",
    [
        (["--n-exams", "20", "--seed", "-1"], "--seed: bad value -1"),
        (["--n-exams", "5"], "--n-exams: bad value 5"),
        (["--n-exams", "20", "--slices-per-exam", "2"], "--slices-per-exam: bad value 2"),
    ],
)
def test_bad_phantom_exam_options_are_named(tmp_path, options, message):
    result = CliRunner().invoke(app, ["make-phantom", str(tmp_path / "out"), *options])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_slices_of_a_phantom_exam_have_independent_noise():
    from mtl_meniscus.phantom.exams import plan_exams, render_exam
    from mtl_meniscus.phantom.slices import PhantomSettings

    exam = next(e for e in plan_exams(20, 8, seed=1, size=64) if not e.case.fissure)
    volume = render_exam(exam, 8, 1, PhantomSettings()).astype(np.float64)
    # slices 0 and 7 lie symmetric about the middle: the same anatomy (the same meniscus size),
    # so all that may set them apart is their noise (with one shared noise field: nothing)
    difference = volume[0] - volume[7]
    assert np.std(difference) > 0.02 * np.mean(volume[0])
    # and the difference is noise, not structure: neighbouring pixels of it are nearly uncorrelated
    assert abs(np.corrcoef(difference[:, :-1].ravel(), difference[:, 1:].ravel())[0, 1]) < 0.3


def test_exam_augmentation_moves_slices_alike_with_noise_of_their_own():
    from mtl_meniscus.config import AugmentConfig
    from mtl_meniscus.data.torch_dataset import ExamDataset

    pattern = np.random.default_rng(0).random((32, 32)).astype(np.float32) * 100
    exam = np.stack([pattern, pattern])  # two identical slices
    config = AugmentConfig(rotation_deg=10, translate_frac=0.1, noise_prob=1.0, noise_std=0.5)
    dataset = ExamDataset([exam], np.zeros((1, 3), np.float32), "none", config)
    x, _ = dataset[(0, 123)]  # (S, C, H, W)
    assert not np.allclose(x[0, 0].numpy(), x[1, 0].numpy())  # different noise
    dataset.augment = config.model_copy(update={"noise_prob": 0.0})
    x, _ = dataset[(0, 123)]
    np.testing.assert_array_equal(x[0, 0].numpy(), x[1, 0].numpy())  # the same movement
