"""Output locations (io/outputs.py): every command checks where it writes before any work: a file
where a folder is due, a folder where a file is due, a read-only folder, a non-empty folder for
make-phantom without --overwrite; an atomic write leaves no temporary file behind."""

import json
import os
import re
import subprocess
import sys

import pytest
from support import TINY, _clean, _predict, app, runner

from mtl_meniscus.io.outputs import atomic_write


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


def test_no_output_replaces_an_input_a_checkpoint_or_a_file_a_run_keeps(run64, data64, tmp_path):
    import shutil

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data64, data)
    shutil.copytree(run64, run)
    image = next((data / "images").glob("*.png"))
    kept = [image, run / "best.pt", run / "metrics.json", data / "labels.csv", *(data / "masks").iterdir()]
    before = {path: path.read_bytes() for path in kept}
    new_csv = str(tmp_path / "p.csv")
    cases = [
        (
            ["predict", run, image, "--tta", "0", "--out", image],
            "--out: .*png exists and is not an earlier output of this command",
        ),
        (
            ["predict", run, image, "--tta", "0", "--out", run / "best.pt"],
            "--out: .*best.pt exists and is not an earlier output",
        ),
        (
            ["predict", run, image, "--tta", "0", "--out", data / "labels.csv"],
            "labels.csv exists and is not an earlier output",
        ),
        (
            ["predict", run, image, "--tta", "0", "--out", new_csv, "--masks", data / "masks"],
            "--masks: .*but not this package.s mark",
        ),
        (
            ["predict", run, image, "--tta", "0", "--out", new_csv, "--cam", data / "images"],
            "--cam: .*but not this package.s mark",
        ),
        (
            ["evaluate", run, "--tta", "0", "--cam", data / "masks", "--bootstrap", "0"],
            "--cam: .*but not this package.s mark",
        ),
        (["evaluate", run, "--tta", "0", "--out", run, "--bootstrap", "0"], "--out: .*training run's folder"),
        (["export", run, "--out", run / "best.pt"], "--out: .*best.pt exists and is not an earlier output"),
        (
            ["export", run, "--out", data / "labels.csv"],
            "--out: .*labels.csv exists and is not an earlier output",
        ),
        (
            ["export", run, "--out", run / "metrics"],
            "--out's .json: .*metrics.json exists and is not an earlier output",
        ),
    ]
    for args, expected in cases:
        result = runner.invoke(
            app, [*map(str, args), "--tta", "0"] if args[0] != "export" else list(map(str, args))
        )
        _clean(result)
        assert result.exit_code == 1 and re.search(expected, result.output), (args, result.output)
    assert all(path.read_bytes() == content for path, content in before.items())
    assert not (tmp_path / "p.csv").exists()


def test_predict_and_export_replace_their_own_outputs_whatever_their_name(run64, data64, tmp_path):
    image = next((data64 / "images").glob("*.png"))
    masks = tmp_path / "masks"
    for out, extra in ((tmp_path / "preds", []), (tmp_path / "p.jsonl", ["--json"])):
        for _ in range(2):  # the second run replaces the first one's table, in the folder it marked
            result = _predict(run64, image, out=out, extra=[*extra, "--masks", str(masks)])
            _clean(result)
            assert result.exit_code == 0, result.output
        assert (masks / "overlays").is_dir()
    assert (tmp_path / "preds").read_text().startswith("image,")
    for _ in range(2):
        result = runner.invoke(app, ["export", str(run64), "--out", str(tmp_path / "model")])
        _clean(result)
        assert result.exit_code == 0, result.output
    # an earlier version's sidecar (2026-11-27: no input_name, no outputs) is export's own too
    old = {
        "path": "model.onnx",
        "fissure_threshold": 0.5,
        "max_abs_difference": 1e-7,
        "mtl_meniscus_version": "0.1.0",
    }
    (tmp_path / "model.json").write_text(json.dumps(old))
    result = runner.invoke(app, ["export", str(run64), "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    (tmp_path / "model.json").unlink()  # the graph alone is still export's own, by its metadata
    result = runner.invoke(app, ["export", str(run64), "--out", str(tmp_path / "model")])
    _clean(result)
    assert result.exit_code == 0, result.output
    (tmp_path / "empty.csv").touch()  # nothing to protect (mktemp, then --out)
    assert _predict(run64, image, out=tmp_path / "empty.csv").exit_code == 0
    others = {
        "valid-meniscus.csv": "0000,1\n0001,0\n",  # MRNet's label files have no header
        "manifest.jsonl": '{"image": "scans/a.png", "label": 1}\n',
        # evaluate's and compare's prediction tables: p_ columns, but not predict's
        "predictions.csv": "image,slice,split,fissure,p_fissure\na.png,,test,1,0.9\n",
        "test_predictions.csv": "image,fissure,p_fissure\na.png,1,0.9\n",
    }
    for name, text in others.items():
        (tmp_path / name).write_text(text)
        result = _predict(run64, image, out=tmp_path / name)
        _clean(result)
        assert result.exit_code == 1 and "not an earlier output of this command" in result.output, name
        assert (tmp_path / name).read_text() == text


def test_make_phantom_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    (tmp_path / "labels.csv").write_text("image,fissure,orientation,position\nmine.png,0,,\n")
    args = ["make-phantom", str(tmp_path), "--n", "20", "--size", "64"]
    result = runner.invoke(app, args)
    _clean(result)
    assert result.exit_code == 1 and "is not empty" in result.output and "--overwrite" in result.output
    assert "mine.png" in (tmp_path / "labels.csv").read_text()
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert "mine.png" not in (tmp_path / "labels.csv").read_text()


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


def test_atomic_write_removes_what_a_killed_writer_of_the_same_file_left(tmp_path):
    """kill -9 during a write leaves <name>.<pid>.tmp (a checkpoint's as large as the checkpoint):
    the next write of that file removes it; another file's, or a live process's, is left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is no longer a process
    stale, other, live = (
        tmp_path / f"metrics.json.{dead.pid}.tmp",
        tmp_path / f"history.csv.{dead.pid}.tmp",
        tmp_path / f"metrics.json.{os.getppid()}.tmp",
    )
    for path in (stale, other, live):
        path.write_text("half")
    with atomic_write(tmp_path / "metrics.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["metrics.json", other.name, live.name])


def test_json_text_writes_undefined_numbers_as_null():
    import json

    import numpy as np

    from mtl_meniscus.io.outputs import json_text, nan_for_null

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    text = json_text({"auc": float("nan"), "ci": [np.float32(0.5), float("inf")], "n": np.int64(3)})
    assert json.loads(text, parse_constant=refuse) == {"auc": None, "ci": [0.5, None], "n": 3}
    assert np.isnan(nan_for_null(None)) and nan_for_null(0.25) == 0.25


def test_every_json_a_run_evaluate_and_export_write_is_strict(run64, data64, tmp_path):
    import json

    from support import app, runner

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    import shutil

    run = tmp_path / "run"
    shutil.copytree(run64, run)  # --calibrate and --youden write into the run
    args = ["evaluate", str(run), "--data", str(data64), "--split", "all", "--out", str(tmp_path / "eval")]
    result = runner.invoke(app, [*args, "--bootstrap", "20", "--calibrate", "--youden"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "m.onnx")]).exit_code == 0
    written = [*run.glob("*.json"), *(tmp_path / "eval").glob("*.json"), *tmp_path.glob("*.json")]
    assert {"metrics.json", "calibration.json", "threshold.json", "m.onnx.json"} <= {p.name for p in written}
    for path in written:
        json.loads(path.read_text(), parse_constant=refuse)


def test_a_figure_that_does_not_fit_leaves_no_cut_short_file(tmp_path):
    """A file-size limit (as a full disk) while a figure was saved: matplotlib, writing to the file
    itself, left a cut-short PDF under its name and raised its own error (a traceback)."""
    script = """
import errno, resource, signal, sys
from pathlib import Path
import matplotlib.pyplot as plt
import numpy as np
from mtl_meniscus.evaluation.plots import save_figure
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long write fails with EFBIG instead of a kill
fig, ax = plt.subplots()
ax.plot(np.random.default_rng(0).random(20000))  # a PDF of a few hundred kB
resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))
try:
    save_figure(fig, Path(sys.argv[1]) / "curves.png")
except OSError as err:
    print(errno.errorcode[err.errno], err.filename)
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.split() == ["EFBIG", str(tmp_path / "curves.pdf")]
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # whole; the PDF not there at all
