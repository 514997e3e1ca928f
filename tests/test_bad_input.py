"""A corpus of hostile inputs through the CLI, as the README's "Bad input" section documents them.

For every case: no traceback, the documented exit code (0 done, 1 refused or an input failed,
2 the command line itself is malformed), and no file outside the data folder is opened. predict
answers every input with exactly one row.
"""

import csv
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from support import sagittal_copy
from typer.testing import CliRunner

from mtl_meniscus.phantom.slices import write_phantom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import app  # noqa: E402

runner = CliRunner()
TINY = str(ROOT / "configs" / "tiny.yaml")

# Files opened while a case runs (Python's audit hook sees open() of every reader: numpy, Pillow,
# nibabel, pydicom). The hook cannot be removed, so it records only while a list is installed.
_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def _invoke(args: list[str]):
    global _opened
    _opened = []
    try:
        result = runner.invoke(app, args)
    finally:
        opened, _opened = _opened, None
    return result, opened


def _png(path: Path, size=(64, 64), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 4000, size).astype(np.uint16))
    return path


def _labels(folder: Path, header: str, *rows: str, base: Path | None = None) -> Path:
    """A data folder: the phantom's images (when `base`), and a labels.csv of the given lines."""
    if base is not None:
        shutil.copytree(base / "images", folder / "images")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    secret = _png(root / "outside" / "secret.png")  # what hostile rows point at
    good = root / "good"
    write_phantom(good, n=40, seed=8, size=64)
    run = root / "run"
    result = runner.invoke(
        app, ["train", "--config", TINY, "--data", str(good), "--out", str(run), "--max-epochs", "1"]
    )
    assert result.exit_code == 0, result.output
    first = (good / "labels.csv").read_text().splitlines()[1:]
    folders = {}
    head4 = "image,fissure,orientation,position"

    # labels.csv that are refused (exit 1), each with what the message must say
    folders["absolute path"] = (
        _labels(root / "abs", head4, f"{secret},0,,", base=good),
        "inside the data folder",
    )
    folders["dot-dot path"] = (
        _labels(root / "dotdot", head4, "../outside/secret.png,0,,", base=good),
        "inside",
    )
    folders["dot-dot inside a path"] = (
        _labels(root / "dotdot2", head4, "images/../../outside/secret.png,1,vertical,posterior", base=good),
        "inside the data folder",
    )
    folders["system file"] = (
        _labels(root / "passwd", head4, "/etc/passwd,0,,", base=good),
        "inside the data folder",
    )
    folders["mask outside"] = (
        _labels(
            root / "mask", f"{head4},mask", first[0].rsplit(",", 1)[0] + ",../outside/secret.png", base=good
        ),
        "column 'mask'",
    )
    name = first[0].split(",")[0]
    folders["path variants"] = (
        _labels(
            root / "variants",
            head4,
            f"{name},0,,",
            f"./{name},0,,",
            name.replace("/", "//") + ",0,,",
            base=good,
        ),
        "listed twice",
    )
    folders["duplicated header"] = (
        _labels(root / "dup", f"{head4},fissure", f"{name},0,,,1", base=good),
        "more than once",
    )
    folders["no data rows"] = (_labels(root / "empty", head4), "no data rows")
    folders["missing columns"] = (
        _labels(root / "cols", "image,label", f"{name},1", base=good),
        "missing column",
    )
    folders["many bad rows"] = (
        _labels(root / "many", head4, *[f"images/none{k}.png,0,," for k in range(60)]),
        "all 60 are listed in",
    )
    folders["all rows split=test"] = (
        _labels(
            root / "alltest",
            f"{head4},split",
            *[f"{r.split(',')[0]},{','.join(r.split(',')[1:4])},test" for r in first],
            base=good,
        ),
        "the train split is empty",
    )
    folders["all the wrong size"] = (
        _labels(root / "size128", head4, *[",".join(r.split(",")[:4]) for r in first[:10]], base=good),
        "data.image_size",
    )
    # rows named by their line in the file: the blank line 3 counts (csv.DictReader skipped it uncounted)
    folders["blank line before a bad row"] = (
        _labels(root / "blank", head4, f"{name},0,,", "", first[1].split(",")[0] + ",7,,", base=good),
        "row 4, column 'fissure': bad value '7'",
    )
    folders["more values than the header"] = (
        _labels(root / "overlong", head4, f"{name},0,,,posterior", base=good),
        "row 2: 5 values, but the header has 4 columns",
    )
    folders["a column named like a known one"] = (
        _labels(
            root / "nearname",
            f"{head4},Split",
            *[
                ",".join(r.split(",")[:4]) + "," + ("train", "val", "test")[k % 3]
                for k, r in enumerate(first)
            ],
            base=good,
        ),
        "column 'Split' differs from the column 'split' only in case, spaces or punctuation",
    )
    # patient P0's first row in train, its second in test: all others their own patient
    placed = [(f"P{max(k - 1, 0)}", ("train", "test", "val")[min(k, 2)]) for k in range(len(first))]
    folders["a patient in two splits"] = (
        _labels(
            root / "leak",
            f"{head4},patient_id,split",
            *[",".join(r.split(",")[:4]) + f",{p},{s}" for r, (p, s) in zip(first, placed)],
            base=good,
        ),
        "patient_id 'P0' is in more than one split: train (row 2), test (row 3)",
    )
    binary = root / "binary"
    binary.mkdir()
    (binary / "labels.csv").write_bytes(bytes(range(256)) * 8)
    folders["binary labels.csv"] = (
        binary,
        "labels.csv: not UTF-8 text (line 2, byte 128: invalid start byte)",
    )
    nul = _labels(root / "nul", head4, f"{name},0,,", base=good)
    (nul / "labels.csv").write_bytes((nul / "labels.csv").read_bytes().replace(b",0,,", b",0\0,,"))
    folders["NUL byte"] = (nul, "labels.csv")  # not CSV, or a bad fissure value: refused either way
    folders["no labels.csv"] = (root / "nothing", "not found")
    (root / "nothing").mkdir()

    # labels.csv whose bad images are set aside (exit 0): excluded rows with their reasons
    mixed = root / "mixed"
    shutil.copytree(good, mixed)
    (mixed / "images" / "broken.png").write_bytes(b"not a png")
    np.save(mixed / "images" / "empty.npy", np.zeros((0, 64), np.float32))
    np.save(mixed / "images" / "volume.npy", np.zeros((3, 64, 64), np.float32))
    np.save(mixed / "images" / "nan.npy", np.full((64, 64), np.nan, np.float32))
    page = np.zeros((64, 64), np.uint16)
    cv2.imwritemulti(str(mixed / "images" / "stack.tif"), [page, page])
    (mixed / "images" / "notes.txt").write_text("hello")
    _bomb(mixed / "images" / "bomb.png")
    extra = ["broken.png", "empty.npy", "volume.npy", "nan.npy", "stack.tif", "notes.txt", "bomb.png"]
    with (mixed / "labels.csv").open("a") as handle:  # a volume's row without a slice: refused, below
        handle.writelines(f"images/{e},0,,,\n" for e in extra if e != "volume.npy")
    # a volume's row without a slice is the row's error, not the file's (it was set aside as unreadable)
    no_slice = root / "no slice"
    shutil.copytree(good, no_slice)
    shutil.copy(mixed / "images" / "volume.npy", no_slice / "images")
    with (no_slice / "labels.csv").open("a") as handle:
        handle.write("images/volume.npy,0,,,\n")
    folders["volume row without a slice"] = (no_slice, "column 'slice': is a 3D volume with 3 slices")

    return {
        "root": root,
        "good": good,
        "run": run,
        "secret": secret,
        "folders": folders,
        "mixed": mixed,
        "extra": extra,
    }


def _bomb(path: Path) -> None:
    import struct
    import zlib

    ok, encoded = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    data = bytearray(encoded.tobytes())
    data[16:24] = struct.pack(">II", 20000, 20000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def _check(result, opened, corpus, exit_code: int, text: str = "") -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == exit_code, result.output
    assert text in result.output, result.output
    outside = corpus["secret"].parent
    assert not [p for p in opened if Path(p).resolve().is_relative_to(outside)], (
        "read outside the data folder"
    )
    assert "/etc/passwd" not in opened


BAD_FOLDERS = [
    "absolute path",
    "dot-dot path",
    "dot-dot inside a path",
    "system file",
    "mask outside",
    "path variants",
    "duplicated header",
    "no data rows",
    "missing columns",
    "many bad rows",
    "all rows split=test",
    "all the wrong size",
    "binary labels.csv",
    "NUL byte",
    "no labels.csv",
    "blank line before a bad row",
    "more values than the header",
    "a column named like a known one",
    "a patient in two splits",
    "volume row without a slice",
]


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_data_folders_are_refused_by_train_and_evaluate(corpus, tmp_path, case):
    folder, text = corpus["folders"][case]
    preset = str(_size_preset(tmp_path)) if case == "all the wrong size" else TINY
    result, opened = _invoke(
        ["train", "--config", preset, "--data", str(folder), "--out", str(tmp_path / "r")]
    )
    _check(result, opened, corpus, 1, text)
    assert not (tmp_path / "r" / "last.pt").exists()
    if case in ("all rows split=test", "all the wrong size"):
        return  # evaluate reads the folder as data, not as a training set
    result, opened = _invoke(
        [
            "evaluate",
            str(corpus["run"]),
            "--data",
            str(folder),
            "--split",
            "all",
            "--bootstrap",
            "0",
            "--tta",
            "0",
        ]
    )
    _check(result, opened, corpus, 1, text)


def _size_preset(tmp_path: Path) -> Path:
    preset = tmp_path / "size128.yaml"
    preset.write_text(Path(TINY).read_text().replace("image_size: 64", "image_size: 128"))
    return preset


def test_bad_images_in_a_data_folder_are_excluded_with_their_reasons(corpus, tmp_path):
    out = tmp_path / "r"
    result, opened = _invoke(
        ["train", "--config", TINY, "--data", str(corpus["mixed"]), "--out", str(out), "--max-epochs", "1"]
    )
    _check(result, opened, corpus, 0, "excluded")
    assert any(Path(p).parent == corpus["mixed"] / "images" for p in opened)  # the recorder sees the reads
    with (out / "exclusions.csv").open() as handle:
        reasons = {Path(r["image"]).name: r["reason"] for r in csv.DictReader(handle)}
    expected = {
        "broken.png": "cannot decode",
        "empty.npy": "empty",
        "nan.npy": "NaN",
        "stack.tif": "2 pages",
        "notes.txt": "unsupported format",
        "bomb.png": "above the limit",
    }
    for name, text in expected.items():
        assert text in reasons[name], (name, reasons[name])


def test_a_mask_that_contradicts_its_label_is_refused_for_segmentation(corpus, tmp_path):
    """A tear row's mask on a row labelled no tear: training the decoder on it would teach a tear
    the labels deny. Refused naming the row, before anything trains."""
    folder = tmp_path / "data"
    shutil.copytree(corpus["good"], folder)
    lines = (folder / "labels.csv").read_text().splitlines()
    tear = next(k for k, line in enumerate(lines) if line.split(",")[1] == "1")
    healthy = next(k for k, line in enumerate(lines) if k and line.split(",")[1] == "0")
    fields = lines[healthy].split(",")
    lines[healthy] = ",".join(fields[:-1] + [lines[tear].split(",")[-1]])  # the tear row's mask
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "r"
    args = ["train", "--config", TINY, "--data", str(folder), "--out", str(out), "--max-epochs", "1"]
    result, opened = _invoke([*args, "--set", "model.segmentation=true"])
    _check(result, opened, corpus, 1, f"row {healthy + 1}, column 'mask'")
    assert "tear pixels (value 2), but the row's fissure is 0 (no tear)" in result.output
    assert not (out / "last.pt").exists()


def test_predict_answers_every_input_with_one_row(corpus, tmp_path, pydicom_files):
    scans = tmp_path / "scans"
    scans.mkdir()
    images = sorted((corpus["good"] / "images").glob("*.png"))
    shutil.copy(images[0], scans / "a.png")
    shutil.copy(images[1], scans / "b.png")
    for name in corpus["extra"]:
        shutil.copy(corpus["mixed"] / "images" / name, scans / name)
    shutil.copy(pydicom_files / "MR_truncated.dcm", scans / "truncated.dcm")
    sagittal_copy(pydicom_files / "MR_small.dcm", scans / "small.dcm")  # 64x64: predicted
    (scans / "dangling.png").symlink_to(tmp_path / "gone.png")
    (scans / "sub").mkdir()
    shutil.copy(images[2], scans / "sub" / "a.png")  # same name in another folder
    explicit = [tmp_path / "missing.png", scans / "notes.txt"]  # named on the command line: rows too
    inputs_in_folder = [p for p in scans.rglob("*") if p.suffix in (".png", ".npy", ".tif", ".dcm")]
    out = tmp_path / "p.csv"
    result, opened = _invoke(
        [
            "predict",
            str(corpus["run"]),
            str(scans),
            *map(str, explicit),
            "--out",
            str(out),
            "--tta",
            "0",
            "--cam",
            str(tmp_path / "cams"),
        ]
    )
    _check(result, opened, corpus, 1, "failed, see the error column")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(inputs_in_folder) + len(explicit)
    assert sorted(r["image"] for r in rows) == sorted(map(str, inputs_in_folder + explicit))
    by_name = {r["image"]: r for r in rows}
    predicted = {
        str(scans / "a.png"),
        str(scans / "b.png"),
        str(scans / "sub" / "a.png"),
        str(scans / "small.dcm"),
    }
    for image, row in by_name.items():
        assert bool(row["p_fissure"]) == (image in predicted) == (not row["error"]), row
    assert len(list((tmp_path / "cams").glob("*.png"))) == 3 * len(predicted)
    assert not list(tmp_path.glob("*.tmp"))


def _evil(path: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format_version": 1, "state_dict": Payload()}, path)
    return path


RUN_CASES = [
    # (arguments, exit code, text in the output); RUN = the tiny run, IMG = one image, TMP = a fresh folder
    (["predict", "RUN", "IMG", "--out", "TMP/p.csv", "--batch-size", "0"], 1, "--batch-size"),
    (["predict", "RUN", "IMG", "--out", "TMP/p.csv", "--tta", "-1"], 1, "--tta"),
    (["predict", "RUN", "IMG", "--out", "TMP/p.csv", "--threshold", "nan"], 1, "--threshold"),
    (["predict", "RUN", "IMG", "--out", "TMP"], 1, "is a folder"),
    (["predict", "EVIL", "IMG", "--out", "TMP/p.csv"], 1, "not a checkpoint of this package"),
    (["predict", "RUN", "TMP", "--out", "TMP/p.csv"], 1, "no input images found"),
    (["predict", "RUN", "--out", "TMP/p.csv"], 2, "Missing argument"),
    (["predict", "RUN", "IMG", "--tta", "many"], 2, "Invalid value"),
    (["evaluate", "RUN", "--bootstrap", "-5"], 1, "--bootstrap"),
    (["evaluate", "RUN", "--split", "everything", "--bootstrap", "0"], 2, "Invalid value"),  # a choice
    (["evaluate", "EVIL"], 1, "not a checkpoint of this package"),
    (["evaluate", "TMP/nowhere"], 1, "checkpoint not found"),
    (["train", "--resume", "TMP"], 1, "no config.yaml"),
    (["train", "--config", "TINY", "--data", "GOOD", "--out", "TMP", "--seed", "-1"], 1, "train.seed"),
    (
        ["train", "--config", "TINY", "--data", "GOOD", "--out", "TMP", "--pretrained", "IMG"],
        1,
        "model.pretrained",
    ),
    (["train", "--config", "TINY", "--data", "GOOD", "--out", "IMG"], 1, "is a file, not a folder"),
    (
        ["train", "--config", "TINY", "--data", "GOOD", "--out", "TMP/r", "--trunk", "plian"],
        1,
        "unknown trunk 'plian' (this package's: reference, plain; or a timm model",
    ),
    (
        ["train", "--config", "TINY", "--data", "GOOD", "--out", "GOOD"],
        1,
        "is a data folder (its label file is there)",
    ),
    # TMP holds evil.pt, which no run writes
    (
        ["train", "--config", "TINY", "--data", "GOOD", "--out", "TMP"],
        1,
        "would replace or sit beside (evil.pt)",
    ),
    (["train", "--config", "IMG", "--data", "GOOD", "--out", "TMP"], 1, "not a text file"),
    (
        ["train", "--config", "TINY", "--data", "GOOD", "--out", "TMP", "--precision", "fp64"],
        2,
        "Invalid value",
    ),
    (["make-phantom", "GOOD", "--n", "20"], 1, "is not empty"),
    (["make-phantom", "TMP/ph", "--size", "0"], 1, "--size"),
    (["compare", "--seeds", "-1", "--out", "TMP/c"], 1, "seeds"),
    (["compare", "--seeds", "0,x", "--out", "TMP/c"], 1, "--seeds"),
    (
        ["compare", "--data", "GOOD", "--difficulty", "easy", "--out", "TMP/c"],
        1,
        "--difficulty: the built-in",
    ),
]


@pytest.mark.parametrize("case", RUN_CASES, ids=[" ".join(c[0]) for c in RUN_CASES])
def test_bad_options_and_files_are_refused(corpus, tmp_path, case):
    args, exit_code, text = case
    image = str(sorted((corpus["good"] / "images").glob("*.png"))[0])
    names = {"RUN": str(corpus["run"]), "IMG": image, "TINY": TINY, "GOOD": str(corpus["good"])}
    names["EVIL"] = str(_evil(tmp_path / "evil.pt"))
    resolved = [names.get(a, a.replace("TMP", str(tmp_path))) for a in args]
    before = sorted(p.name for p in corpus["good"].iterdir())
    result, opened = _invoke(resolved)
    _check(result, opened, corpus, exit_code, text)
    assert "pwned" not in result.output
    assert sorted(p.name for p in corpus["good"].iterdir()) == before  # the data folder is untouched
