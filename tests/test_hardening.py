"""Hostile input, one test (or a few) per defect of the hardening issue: each names what it covers.

Tiny data only (64-pixel phantoms, the tiny preset, one-epoch runs): seconds per test.
"""

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from mtl_meniscus.config import DataConfig, load_config
from mtl_meniscus.data.folder import read_labels
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.errors import DataError, ImageReadError, MeniscusError
from mtl_meniscus.io.imageio import read_image
from mtl_meniscus.io.outputs import atomic_write
from mtl_meniscus.phantom.slices import write_phantom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import app  # noqa: E402

runner = CliRunner()
TINY = ROOT / "configs" / "tiny.yaml"


def _quiet():
    return Console(quiet=True)


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


def _clean(result) -> None:
    """A command ended as documented: no traceback, no exception other than its exit."""
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


@pytest.fixture(scope="module")
def data64(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hard_data")
    write_phantom(folder, n=40, seed=5, size=64)
    return folder


@pytest.fixture(scope="module")
def run64(data64, tmp_path_factory) -> Path:
    """A finished one-epoch tiny run (shared mode)."""
    out = tmp_path_factory.mktemp("hard_run") / "run"
    result = runner.invoke(
        app,
        ["train", "--config", str(TINY), "--data", str(data64), "--out", str(out), "--max-epochs", "1"],
    )
    assert result.exit_code == 0, result.output
    return out


def _copy_run(run64: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run64, copy)
    return copy


def _predict(run, *inputs, out, extra=()):
    args = ["predict", str(run), *map(str, inputs), "--out", str(out), "--tta", "0", *extra]
    return runner.invoke(app, args)


# ---- 1. image paths must stay inside the data folder -------------------------------------------
def test_image_and_mask_paths_outside_the_data_folder_are_refused(tmp_path):
    outside = _png(tmp_path / "outside.png")
    data = tmp_path / "data"
    _png(data / "img" / "a.png")
    rows = [
        ("img/a.png", "0", "", "", ""),
        (str(outside), "0", "", "", ""),  # row 3: absolute path to a file that exists
        ("../outside.png", "1", "vertical", "posterior", ""),  # row 4
        ("img/../../outside.png", "0", "", "", ""),  # row 5
        ("/etc/passwd", "0", "", "", ""),  # row 6
        ("img/a.png", "0", "", "", "../outside.png"),  # row 7: mask outside (and a duplicate)
    ]
    _labels(data, rows, header=("image", "fissure", "orientation", "position", "mask"))
    with pytest.raises(DataError) as info:
        read_labels(data)
    message = str(info.value)
    for line in (3, 4, 5, 6):
        assert f"row {line}, column 'image': bad value" in message and "inside the data folder" in message
    assert "row 7, column 'mask': bad value '../outside.png'" in message
    assert "file not found" not in message  # nothing is said about which outside files exist
    assert "unsupported format" not in message


def test_symlinks_inside_the_data_folder_are_the_owners_choice(tmp_path):
    outside = _png(tmp_path / "elsewhere" / "b.png")
    data = tmp_path / "data"
    _png(data / "img" / "a.png")
    (data / "img" / "b.png").symlink_to(outside)
    _labels(data, [("img/a.png", "0", "", ""), ("img/b.png", "0", "", "")])
    assert [r.image for r in read_labels(data)] == ["img/a.png", "img/b.png"]


# ---- 2. duplicates by normalised path and by file ---------------------------------------------
def test_path_variants_of_one_image_are_duplicates(tmp_path):
    _png(tmp_path / "img" / "x.png")
    (tmp_path / "img" / "alias.png").symlink_to("x.png")
    rows = [
        ("img/x.png", "0", "", ""),
        ("img//x.png", "0", "", ""),  # row 3
        ("./img/x.png", "1", "vertical", "posterior"),  # row 4: a contradictory label
        ("img/alias.png", "0", "", ""),  # row 5: another name of the same file
    ]
    _labels(tmp_path, rows)
    with pytest.raises(DataError) as info:
        read_labels(tmp_path)
    message = str(info.value)
    assert "row 3: image 'img//x.png' is listed twice (also row 2, as 'img/x.png': the same file)" in message
    assert "row 4: image './img/x.png' is listed twice (also row 2, as 'img/x.png': the same file)" in message
    assert (
        "row 5: image 'img/alias.png' is listed twice (also row 2, as 'img/x.png': the same file)" in message
    )


def test_paths_are_normalised_in_the_records(tmp_path):
    _png(tmp_path / "img" / "x.png")
    _labels(tmp_path, [("./img//x.png", "0", "", "")])
    assert read_labels(tmp_path)[0].image == "img/x.png"


# ---- 3. one bad file never ends a predict run ---------------------------------------------------
def test_a_zero_size_array_gets_an_error_row_and_the_others_are_predicted(run64, data64, tmp_path):
    good = sorted((data64 / "images").glob("*.png"))[:2]
    np.save(tmp_path / "empty.npy", np.zeros((0, 64), np.float32))
    result = _predict(run64, good[0], tmp_path / "empty.npy", good[1], out=tmp_path / "p.csv")
    _clean(result)
    assert result.exit_code == 1
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [Path(r["image"]).name for r in rows] == [good[0].name, "empty.npy", good[1].name]
    assert "empty" in rows[1]["error"] and rows[0]["p_fissure"] and rows[2]["p_fissure"]


def test_any_per_file_exception_becomes_that_files_row(run64, data64, tmp_path, monkeypatch):
    import mtl_meniscus.commands.predict as predict_module

    good = sorted((data64 / "images").glob("*.png"))[:2]
    real = predict_module.read_image

    def flaky(path, *args, **kwargs):
        if Path(path) == good[1]:
            raise MemoryError("out of memory in a decoder")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(predict_module, "read_image", flaky)
    result = _predict(run64, *good, out=tmp_path / "p.csv")
    _clean(result)
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 2 and rows[0]["p_fissure"] and "MemoryError" in rows[1]["error"]


# ---- 4. decoded-size limit, checked on the header -----------------------------------------------
def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares width x height (IHDR patched, CRC fixed)."""
    ok, encoded = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    data = bytearray(encoded.tobytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_declared_sizes_above_the_limit_are_refused_before_decoding(tmp_path):
    _png_declaring(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(
        ImageReadError, match="bomb.png: image of 400.0 megapixels is above the limit of 64.0 megapixels"
    ):
        read_image(tmp_path / "bomb.png")
    header = nib.Nifti1Header()
    header.set_data_shape((600, 600, 600))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    (tmp_path / "cube.nii").write_bytes(header.binaryblock + bytes(104))  # 840 KB would be the gz
    with pytest.raises(ImageReadError, match="cube.nii: NIfTI image of 600x600x600 = 216.0 megapixels"):
        read_image(tmp_path / "cube.nii", slice_index=0)
    with (tmp_path / "big.npy").open("wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (20000, 20000)}
        )
    with pytest.raises(ImageReadError, match="big.npy: array of 20000x20000 .* above the limit"):
        read_image(tmp_path / "big.npy")


def test_the_pixel_limit_is_configurable(tmp_path, pydicom_files, monkeypatch):
    _png(tmp_path / "a.png", size=(100, 100))
    with pytest.raises(ImageReadError, match="100x100 = 10,000 pixels is above the limit of 5,000 pixels"):
        read_image(tmp_path / "a.png", max_pixels=5000)
    assert read_image(tmp_path / "a.png", max_pixels=10000).shape == (100, 100)
    monkeypatch.setenv("MTL_MENISCUS_MAX_PIXELS", "1000")  # MR_small is 64x64
    with pytest.raises(
        ImageReadError, match="DICOM image of 64x64 = 4,096 pixels is above the limit of 1,000 pixels"
    ):
        read_image(pydicom_files / "MR_small.dcm")
    monkeypatch.delenv("MTL_MENISCUS_MAX_PIXELS")
    # data.max_pixels, the config key: an image above it is excluded with the reason
    _labels(tmp_path, [("a.png", "0", "", ""), ("b.png", "0", "", "")])
    _png(tmp_path / "b.png", size=(32, 32))
    data = prepare_data(tmp_path, DataConfig(image_size=32, max_pixels=2000, split_fractions=(1, 0, 0)))
    assert [image for image, _ in data.exclusions] == ["a.png"]
    assert "above the limit" in data.exclusions[0][1]


# ---- 5. one process per run folder ---------------------------------------------------------------
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
    from mtl_meniscus.config import CompareConfig

    out = tmp_path / "cmp"
    out.mkdir()
    settings = CompareConfig(modes=("shared",), seeds=(0,), max_epochs=1, steps_per_epoch=1).validate()
    with _locked_by_another_process(out):
        with pytest.raises(MeniscusError, match="is in use by another process"):
            run_compare(settings, out, {"shared": TINY}, data_dir=data64, console=_quiet())
        assert not (out / "variants").exists()


# ---- 6. diverged training ----------------------------------------------------------------------
def test_non_finite_loss_stops_with_a_message_and_keeps_last_pt(data64, tmp_path, monkeypatch):
    import mtl_meniscus.engine.trainer as train_module

    real = train_module.task_losses
    calls = {"n": 0}

    def diverging(*args):
        calls["n"] += 1
        losses = real(*args)
        if calls["n"] > 3:  # epoch 2 of 3 steps per epoch
            losses = {task: loss * float("nan") for task, loss in losses.items()}
        return losses

    monkeypatch.setattr(train_module, "task_losses", diverging)
    config = load_config(TINY, {"data.path": str(data64), "train.lr": 0.05})
    with pytest.raises(MeniscusError) as info:
        train_run(config, tmp_path / "run", console=_quiet())
    message = str(info.value)
    assert "[shared] training diverged in epoch 2" in message and "--lr 0.005" in message
    assert "last.pt keeps epoch 1" in message
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["training_state"]
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_non_finite_validation_outputs_stop_with_a_message(data64, tmp_path, monkeypatch):
    import mtl_meniscus.engine.validation as validation_module

    def nan_probs(model, images, *args, **kwargs):
        return {task: np.full(len(images), np.nan) for task in ("fissure", "orientation", "position")}

    monkeypatch.setattr(validation_module, "predict_probs", nan_probs)
    config = load_config(TINY, {"data.path": str(data64)})
    with pytest.raises(MeniscusError, match="diverged in epoch 1: the network's outputs .* not finite"):
        train_run(config, tmp_path / "run", console=_quiet())


# ---- 7. empty splits ---------------------------------------------------------------------------
def _split_folder(folder: Path, splits: list[str], tears: bool = True) -> Path:
    rows = []
    for k, split in enumerate(splits):
        _png(folder / "img" / f"{k}.png", value=k)
        tear = tears and k % 2 == 1
        rows.append(
            (f"img/{k}.png", int(tear), "vertical" if tear else "", "posterior" if tear else "", split)
        )
    return _labels(folder, rows, header=("image", "fissure", "orientation", "position", "split"))


def test_an_empty_training_set_is_named_before_training(tmp_path):
    _split_folder(tmp_path / "d1", ["test"] * 8)
    config = load_config(TINY, {"data.path": str(tmp_path / "d1")})
    with pytest.raises(
        MeniscusError, match=r"the train split is empty: the 'split' column .* \(train 0, val 0, test 8\)"
    ):
        train_run(config, tmp_path / "r1", console=_quiet())
    assert not (tmp_path / "r1" / "last.pt").exists()

    _split_folder(tmp_path / "d2", ["train"] * 6 + ["val"] * 2 + ["test"] * 2, tears=False)
    config = load_config(TINY, {"data.path": str(tmp_path / "d2"), "model.name": "separate"})
    with pytest.raises(MeniscusError, match="the orientation network has no training image"):
        train_run(config, tmp_path / "r2", console=_quiet())


def test_compare_refuses_data_without_a_test_split(tmp_path):
    from mtl_meniscus.commands.compare import run_compare
    from mtl_meniscus.config import CompareConfig

    _split_folder(tmp_path / "d", ["train"] * 6 + ["val"] * 2)
    settings = CompareConfig(modes=("shared",), seeds=(0,), max_epochs=1, steps_per_epoch=1).validate()
    with pytest.raises(MeniscusError, match="the test split of .* is empty"):
        run_compare(settings, tmp_path / "cmp", {"shared": TINY}, data_dir=tmp_path / "d", console=_quiet())


def test_empty_val_and_test_splits_are_warned_and_recorded(tmp_path):
    _split_folder(tmp_path / "d", ["train"] * 8)
    config = load_config(TINY, {"data.path": str(tmp_path / "d"), "train.max_epochs": 1})
    console = Console(record=True, width=200)
    metrics = train_run(config, tmp_path / "r", console=console)
    text = console.export_text()
    assert "warning: [shared] no validation image (the val split is empty)" in text
    assert "warning: the test split is empty" in text
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["warnings"] == metrics["warnings"] and len(saved["warnings"]) == 2
    result = runner.invoke(app, ["evaluate", str(tmp_path / "r"), "--youden", "--bootstrap", "0"])
    _clean(result)
    assert result.exit_code == 1 and "--youden picks the threshold on the val split" in result.output


# ---- 8. make-phantom never overwrites silently ------------------------------------------------
def test_make_phantom_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    (tmp_path / "labels.csv").write_text("image,fissure,orientation,position\nmine.png,0,,\n")
    args = ["make-phantom", str(tmp_path), "--n", "20", "--size", "64"]
    result = runner.invoke(app, args)
    _clean(result)
    assert result.exit_code == 1 and "is not empty" in result.output and "--overwrite" in result.output
    assert "mine.png" in (tmp_path / "labels.csv").read_text()
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert "mine.png" not in (tmp_path / "labels.csv").read_text()


# ---- 9. a weights file needs a timm trunk -----------------------------------------------------
def test_pretrained_file_with_the_reference_trunk_is_refused(data64, tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    args = ["train", "--config", str(TINY), "--data", str(data64), "--out", str(tmp_path / "r")]
    result = runner.invoke(app, [*args, "--pretrained", str(weights)])
    _clean(result)
    assert result.exit_code == 1 and "'model.pretrained'" in result.output and "timm trunk" in result.output
    assert not (tmp_path / "r" / "best.pt").exists()
    result = runner.invoke(app, [*args, "--freeze-backbone"])  # the same kind of silent no-op
    _clean(result)
    assert result.exit_code == 1 and "'model.freeze_backbone'" in result.output


def test_checkpoints_trained_with_the_ignored_setting_still_load(run64, data64, tmp_path):
    payload = torch.load(run64 / "best.pt", weights_only=True)
    payload["config"]["model"].update(pretrained="/old/weights.pth", freeze_backbone=True)
    torch.save(payload, tmp_path / "old.pt")
    image = next((data64 / "images").glob("*.png"))
    result = _predict(tmp_path / "old.pt", image, out=tmp_path / "p.csv")
    assert result.exit_code == 0, result.output


# ---- 10. bad values are refused, naming the option or key ------------------------------------
def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "command,expected",
    [
        (["predict", "RUN", "IMG", "--batch-size", "0"], "--batch-size: bad value 0"),
        (["predict", "RUN", "IMG", "--batch-size", "-3"], "--batch-size: bad value -3"),
        (["predict", "RUN", "IMG", "--tta", "-1"], "--tta: bad value -1"),
        (["predict", "RUN", "IMG", "--tta", "-2"], "--tta: bad value -2"),
        (["predict", "RUN", "IMG", "--threshold", "nan"], "--threshold: bad value nan"),
        (["predict", "RUN", "IMG", "--threshold", "-0.5"], "--threshold: bad value -0.5"),
        (["evaluate", "RUN", "--bootstrap", "-5"], "--bootstrap: bad value -5"),
        (["evaluate", "RUN", "--tta", "-2"], "--tta: bad value -2"),
        (["evaluate", "RUN", "--threshold", "nan"], "--threshold: bad value nan"),
        (["evaluate", "RUN", "--seed", "-1"], "--seed: bad value -1"),
        (["train", "--config", "TINY", "--seed", "-1"], "'train.seed': bad value -1"),
        (
            ["train", "--config", "TINY", "--batch-size", "100000000"],
            "'train.batch_size': bad value 100000000",
        ),
        (["train", "--config", "TINY", "--lr", "nan"], "'train.lr': bad value nan"),
        (["train", "--config", "YAML:model:\n  widths: [0, 0, 0, 0]\n"], "'model.widths'"),
        (["train", "--config", "YAML:model:\n  dense: [-3]\n"], "'model.dense'"),
        (["train", "--config", "YAML:model:\n  kernels: [-1]\n"], "'model.kernels'"),
        (["train", "--config", "YAML:tta:\n  copies: 1000000000\n"], "'tta.copies'"),
        (["train", "--config", "BINARY"], "not a text file"),
        (["compare", "--seeds", "-1", "--out", "OUT"], "'seeds': bad value"),
        (["compare", "--bootstrap", "-5", "--out", "OUT"], "'bootstrap': bad value -5"),
        (["make-phantom", "OUT", "--size", "0"], "--size: bad value 0"),
        (["make-phantom", "OUT", "--n", "3"], "--n: bad value 3"),
    ],
)
def test_bad_values_are_refused_with_the_option_named(run64, data64, tmp_path, command, expected):
    image = next((data64 / "images").glob("*.png"))
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    args = []
    for arg in command:
        if arg.startswith("YAML:"):
            arg = _yaml(tmp_path, arg[5:])
        arg = {"RUN": str(run64), "IMG": str(image), "TINY": str(TINY), "OUT": str(tmp_path / "o")}.get(
            arg, arg
        )
        args.append(str(tmp_path / "binary.yaml") if arg == "BINARY" else arg)
    if command[0] == "train":
        args += ["--data", str(data64), "--out", str(tmp_path / "r")]
    result = runner.invoke(app, args)
    _clean(result)
    assert result.exit_code == 1, result.output
    assert expected in result.output
    assert not (tmp_path / "r" / "config.yaml").exists()


# ---- 11. output locations are checked first; no *.tmp left behind ----------------------------
def test_predict_checks_its_output_before_predicting(run64, data64, tmp_path, monkeypatch):
    from mtl_meniscus.engine.trained import TrainedModel

    def never(*args, **kwargs):
        raise AssertionError("predicted although the output cannot be written")

    monkeypatch.setattr(TrainedModel, "predict", never)
    image = next((data64 / "images").glob("*.png"))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    for out, expected in (
        (tmp_path / "a_folder", "--out: .*a_folder is a folder"),
        (tmp_path / "a_file" / "p.csv", "--out: .*a_file is a file, not a folder"),
    ):
        result = _predict(run64, image, out=out)
        _clean(result)
        assert result.exit_code == 1
        assert re.search(expected, result.output), result.output
    result = _predict(run64, image, out=tmp_path / "p.csv", extra=["--cam", str(tmp_path / "a_file")])
    assert result.exit_code == 1 and "--cam" in result.output and "is a file" in result.output


def test_train_evaluate_and_make_phantom_check_their_output(run64, data64, tmp_path):
    (tmp_path / "a_file").write_text("x")
    file = str(tmp_path / "a_file")
    cases = [
        ["train", "--config", str(TINY), "--data", str(data64), "--out", file],
        ["evaluate", str(run64), "--out", file, "--bootstrap", "0", "--tta", "0"],
        ["evaluate", str(run64), "--cam", file, "--bootstrap", "0", "--tta", "0"],
        ["make-phantom", file, "--n", "20", "--size", "64"],
        ["make-phantom", str(tmp_path / "a_file" / "sub"), "--n", "20", "--size", "64"],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        _clean(result)
        assert result.exit_code == 1 and "a_file is a file, not a folder" in result.output, args
    assert (tmp_path / "a_file").read_text() == "x"


def test_a_read_only_output_folder_is_refused(run64, data64, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):
        locked.chmod(0o755)
        pytest.skip("this user (root) can write into read-only folders")
    try:
        image = next((data64 / "images").glob("*.png"))
        result = _predict(run64, image, out=locked / "p.csv")
        _clean(result)
        assert result.exit_code == 1 and "cannot write into" in result.output
        result = runner.invoke(
            app, ["train", "--config", str(TINY), "--data", str(data64), "--out", str(locked)]
        )
        _clean(result)
        assert result.exit_code == 1 and "cannot write into" in result.output
    finally:
        locked.chmod(0o755)


def test_atomic_write_leaves_no_temporary_file_on_failure(tmp_path):
    target = tmp_path / "result.csv"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as tmp:
        tmp.write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["result.csv"] and target.read_text() == "whole"


# ---- 12. damaged run files are named ----------------------------------------------------------
@pytest.mark.parametrize(
    "content", ["{", '{"fissure_threshold": "high"}', "[]", '{"fissure_threshold": NaN}']
)
def test_a_malformed_threshold_json_is_named(run64, data64, tmp_path, content):
    run = _copy_run(run64, tmp_path)
    (run / "threshold.json").write_text(content)
    result = _predict(run, next((data64 / "images").glob("*.png")), out=tmp_path / "p.csv")
    _clean(result)
    assert result.exit_code == 1 and "threshold.json: malformed" in result.output


def test_a_broken_config_yaml_on_resume_is_named(run64, tmp_path):
    run = _copy_run(run64, tmp_path)
    for content in ("model: [unclosed\n", "- a list\n", "model:\n  widths: many\n"):
        (run / "config.yaml").write_text(content)
        result = runner.invoke(app, ["train", "--resume", str(run)])
        _clean(result)
        assert result.exit_code == 1 and "config.yaml" in result.output, content


def test_a_broken_splits_csv_on_resume_is_named(run64, tmp_path):
    run = _copy_run(run64, tmp_path)
    (run / "splits.csv").write_text("name,set\na.png,train\n")
    result = runner.invoke(app, ["train", "--resume", str(run)])
    _clean(result)
    assert result.exit_code == 1 and "splits.csv: damaged" in result.output


def test_last_pt_without_training_state_is_named(run64, tmp_path):
    run = _copy_run(run64, tmp_path)
    shutil.copy(run / "best.pt", run / "last.pt")
    result = runner.invoke(app, ["train", "--resume", str(run)])
    _clean(result)
    assert result.exit_code == 1 and "last.pt: holds no training state" in result.output
    payload = torch.load(run64 / "last.pt", weights_only=True)
    del payload["training_state"]["optimizer"]
    torch.save(payload, run / "last.pt")
    result = runner.invoke(app, ["train", "--resume", str(run)])
    _clean(result)
    assert result.exit_code == 1 and "last.pt: damaged training state" in result.output


def test_checkpoints_with_missing_keys_or_mismatched_weights_are_named(run64, data64, tmp_path):
    image = next((data64 / "images").glob("*.png"))
    payload = torch.load(run64 / "best.pt", weights_only=True)
    torch.save({"format_version": 1, "config": payload["config"]}, tmp_path / "keys.pt")
    result = _predict(tmp_path / "keys.pt", image, out=tmp_path / "p.csv")
    _clean(result)
    assert result.exit_code == 1 and "keys.pt: damaged checkpoint: missing state_dict" in result.output

    weights = dict(payload["state_dict"])
    name = next(k for k in weights if k.endswith("weight"))
    weights[name] = torch.zeros(3, 3)
    torch.save({**payload, "state_dict": weights}, tmp_path / "shape.pt")
    result = _predict(tmp_path / "shape.pt", image, out=tmp_path / "p.csv")
    _clean(result)
    assert result.exit_code == 1 and "shape.pt: damaged checkpoint: its weights do not fit" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "shape.pt"), "--data", str(data64)])
    _clean(result)
    assert result.exit_code == 1 and "shape.pt: damaged checkpoint" in result.output


# ---- 13. no silent results -------------------------------------------------------------------
def test_multi_page_tiffs_and_broken_links_get_error_rows(run64, data64, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    page = cv2.imread(str(next((data64 / "images").glob("*.png"))), cv2.IMREAD_UNCHANGED)
    assert cv2.imwritemulti(str(scans / "stack.tif"), [page, page])
    shutil.copy(next((data64 / "images").glob("*.png")), scans / "good.png")
    (scans / "gone.png").symlink_to(tmp_path / "deleted.png")
    result = _predict(run64, scans, out=tmp_path / "p.csv")
    _clean(result)
    rows = {Path(r["image"]).name: r for r in csv.DictReader((tmp_path / "p.csv").open())}
    assert set(rows) == {"stack.tif", "good.png", "gone.png"}
    assert "holds 2 pages" in rows["stack.tif"]["error"] and not rows["stack.tif"]["p_fissure"]
    assert "broken symbolic link" in rows["gone.png"]["error"]
    assert rows["good.png"]["p_fissure"] and result.exit_code == 1


def test_cam_overlays_of_inputs_with_the_same_file_name_do_not_overwrite(run64, data64, tmp_path):
    images = sorted((data64 / "images").glob("*.png"))[:2]
    for folder, image in zip(("a", "b"), images):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / "scan.png")
    inputs = [tmp_path / "a" / "scan.png", tmp_path / "b" / "scan.png"]
    result = _predict(run64, *inputs, out=tmp_path / "p.csv", extra=["--cam", str(tmp_path / "cams")])
    _clean(result)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cams").glob("*.png"))) == 2 * 3  # two inputs x three tasks


# ---- 14. clear messages ------------------------------------------------------------------------
def test_predict_on_a_volume_does_not_mention_labels_csv(run64, tmp_path):
    np.save(tmp_path / "vol.npy", np.zeros((3, 64, 64), np.float32))
    result = _predict(run64, tmp_path / "vol.npy", out=tmp_path / "p.csv")
    _clean(result)
    assert result.exit_code == 1
    error = next(csv.DictReader((tmp_path / "p.csv").open()))["error"]
    assert "3D volume" in error and "predict reads 2D slices only" in error and "labels.csv" not in error


def test_a_duplicated_header_column_is_reported(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _labels(
        tmp_path,
        [("img/a.png", "0", "", "", "1")],
        header=("image", "fissure", "orientation", "position", "fissure"),
    )
    with pytest.raises(DataError, match="column\\(s\\) fissure appear more than once in the header"):
        read_labels(tmp_path)


def test_every_problem_is_written_to_a_file(tmp_path):
    rows = [(f"img/missing{k}.png", "0", "", "") for k in range(70)]
    _labels(tmp_path / "data", rows)
    with pytest.raises(DataError) as info:
        read_labels(tmp_path / "data", report_dir=tmp_path / "run")
    message = str(info.value)
    assert "70 problem(s)" in message and "and 20 more: all 70 are listed in" in message
    report = (tmp_path / "run" / "labels_problems.txt").read_text().splitlines()
    assert sum("file not found" in line for line in report) == 70 and len(info.value.problems) == 70
    result = runner.invoke(
        app, ["train", "--config", str(TINY), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 1 and str(tmp_path / "r" / "labels_problems.txt") in result.output


def test_all_images_excluded_for_their_size_says_why(data64, tmp_path):
    config = load_config(TINY, {"data.path": str(data64), "data.image_size": 128})
    with pytest.raises(DataError) as info:
        train_run(config, tmp_path / "r", console=_quiet())
    message = str(info.value)
    assert "wrong size (e.g." in message and "expected 128x128" in message
    assert "data.image_size" in message and "size_policy: resize" in message


def test_a_refused_pickle_is_not_a_checkpoint_and_no_advice_to_disable_the_safeguard(data64, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"format_version": 1, "x": Payload()}, tmp_path / "evil.pt")
    result = _predict(tmp_path / "evil.pt", next((data64 / "images").glob("*.png")), out=tmp_path / "p.csv")
    _clean(result)
    assert result.exit_code == 1 and "evil.pt: not a checkpoint of this package" in result.output
    assert "weights_only" not in result.output and "this must never run" not in result.output


# ---- 15. full tables outside a terminal; bracketed prefixes printed as they are --------------
def test_tables_are_not_cut_and_member_prefixes_survive(run64, tmp_path):
    result = runner.invoke(app, ["evaluate", str(run64), "--bootstrap", "20", "--tta", "0", "--split", "all"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and "TP/FP/TN/FN" in result.output
    fissure_row = next(line for line in result.output.splitlines() if "fissure " in line and "│" in line)
    assert fissure_row.count("/") == 3  # TP/FP/TN/FN in full

    run = _copy_run(run64, tmp_path)
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "[shared] resumed after epoch 1 (finished)" in result.output
