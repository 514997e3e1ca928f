"""`predict`: the subtype answers gated by the tear answer, and one row per input whatever it
holds: a bad file gets an error row and never ends the run; saliency overlays never overwrite."""

import csv
import json
import os
import shutil
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
from support import _clean, _predict, _quiet, app, runner, sagittal_copy

from mtl_meniscus.commands.predict import CSV_COLUMNS, gate, run_predict
from mtl_meniscus.labels import DEFAULT_TASKS


def test_gating_reports_orientation_and_position_only_for_predicted_tears():
    def probs(f, o, p):
        return {"fissure": f, "orientation": o, "position": p}

    tear = gate(probs(0.7, 0.2, 0.9), DEFAULT_TASKS, threshold=0.5, image="a.png")
    assert tear.labels == {"fissure": 1, "orientation": "vertical", "position": "anterior"}
    none = gate(probs(0.3, 0.9, 0.9), DEFAULT_TASKS, threshold=0.5, image="b.png")
    assert none.labels == {"fissure": 0, "orientation": "", "position": ""}
    assert none.row()["p_horizontal"] == "" and none.row()["p_fissure"] == 0.3
    assert (
        gate(probs(0.3, 0.9, 0.9), DEFAULT_TASKS, threshold=0.25, image="c.png").labels["orientation"]
        == "horizontal"
    )


def test_predict_on_a_folder_mixing_good_and_bad_files(tiny_run, tmp_path, pydicom_files):
    inputs = tmp_path / "inputs"
    (inputs / "nested").mkdir(parents=True)
    good = sorted((tiny_run / "data" / "images").glob("*.png"))[:3]
    for path in good:
        shutil.copy(path, inputs / path.name)
    cv2.imwrite(str(inputs / "nested" / "big.png"), np.full((96, 80), 500, np.uint16))
    sagittal_copy(pydicom_files / "MR_small.dcm", inputs / "nested" / "mr.dcm")
    shutil.copy(pydicom_files / "MR_truncated.dcm", inputs / "nested" / "truncated.dcm")
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 3), np.float32), np.eye(4)), inputs / "volume.nii.gz")
    np.save(inputs / "nan.npy", np.full((64, 64), np.nan))
    (inputs / "readme.txt").write_text("not an image, skipped in folders")

    rows = run_predict(tiny_run / "run", [inputs], tmp_path / "p.csv", tta_copies=1, console=_quiet())
    with (tmp_path / "p.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == CSV_COLUMNS
    by_name = {Path(r["image"]).name: r for r in table}
    assert len(by_name) == 8 and "readme.txt" not in by_name
    for name in ("truncated.dcm", "volume.nii.gz", "nan.npy"):
        assert by_name[name]["error"] and by_name[name]["p_fissure"] == ""
    assert "slice" in by_name["volume.nii.gz"]["error"] and "NaN" in by_name["nan.npy"]["error"]
    assert by_name["big.png"]["note"] == "resized from 96x80 to 64x64" and not by_name["big.png"]["error"]
    assert by_name["mr.dcm"]["p_fissure"] != "" and not by_name["mr.dcm"]["error"]  # a 64x64 MR slice
    for row in table:
        if row["p_fissure"] and float(row["p_fissure"]) < 0.5:
            assert row["orientation"] == "" and row["position"] == "" and row["p_horizontal"] == ""
        if row["fissure"] == "1":
            assert row["orientation"] in ("horizontal", "vertical") and row["position"] in (
                "anterior",
                "posterior",
            )
    assert sum(1 for r in rows if r.error) == 3

    strict = run_predict(
        tiny_run / "run",
        [inputs / "nested" / "big.png"],
        tmp_path / "s.jsonl",
        as_json=True,
        strict_size=True,
        console=_quiet(),
    )
    record = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])
    assert "strict-size" in record["error"] and record["p_fissure"] is None and strict[0].error


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
    import mtl_meniscus.engine.answers as answers_module  # predict reads each slice there

    good = sorted((data64 / "images").glob("*.png"))[:2]
    real = answers_module.read_image

    def flaky(path, *args, **kwargs):
        if Path(path) == good[1]:
            raise MemoryError("out of memory in a decoder")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(answers_module, "read_image", flaky)
    result = _predict(run64, *good, out=tmp_path / "p.csv")
    _clean(result)
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 2 and rows[0]["p_fissure"] and "MemoryError" in rows[1]["error"]


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


def test_predict_on_a_volume_does_not_mention_labels_csv(run64, tmp_path):
    np.save(tmp_path / "vol.npy", np.zeros((3, 64, 64), np.float32))
    result = _predict(run64, tmp_path / "vol.npy", out=tmp_path / "p.csv")
    _clean(result)
    assert result.exit_code == 1
    error = next(csv.DictReader((tmp_path / "p.csv").open()))["error"]
    assert "3D volume" in error and "predict reads 2D slices only" in error and "labels.csv" not in error


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


def test_an_mrnet_folder_given_to_predict_exams_is_one_exam_per_volume(run64, tmp_path):
    from mtl_meniscus.phantom.exams import write_phantom_exams

    write_phantom_exams(tmp_path / "mrnet", n=20, n_slices=4, seed=2, size=64, fmt="mrnet")
    folder = tmp_path / "mrnet" / "valid" / "sagittal"  # MRNet's own layout: NNNN.npy per exam
    out = tmp_path / "exams.csv"
    result = runner.invoke(app, ["predict", str(run64), str(folder), "--exams", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(row["exam"]).name for row in rows] == sorted(p.name for p in folder.glob("*.npy"))
    assert all(row["p_fissure"] and not row["error"] for row in rows)

    # interrupted after the first exam, the same command continues after it, to the same table
    import mtl_meniscus.commands.predict as predict

    real_exam_rows, done = predict.exam_rows, []

    def interrupted(*answer):
        done.append(answer[1])
        if len(done) == 2:
            raise KeyboardInterrupt
        return real_exam_rows(*answer)

    command = ["predict", str(run64), str(folder), "--exams", "--slices", "--out", str(tmp_path / "e.csv")]
    whole = runner.invoke(app, [*command[:-1], str(tmp_path / "whole.csv")])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict, "exam_rows", interrupted)
        stopped = runner.invoke(app, command)
        assert stopped.exit_code != 0, (done, stopped.output)
    assert not (tmp_path / "e.csv").exists()
    resumed = runner.invoke(app, command)
    assert whole.exit_code == 0 and resumed.exit_code == 0 and "inputs already done: 1" in resumed.output
    assert (tmp_path / "e.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_a_files_answer_does_not_depend_on_the_other_files_or_their_order(tiny_run, tmp_path):
    """With test-time augmentation, every file's copy k is the same draw: listed first or last,
    alone or with others, a file gets the same probabilities (serve answers one file)."""
    images = sorted((tiny_run / "data" / "images").glob("*.png"))[:4]

    def probabilities(files: list[Path], name: str) -> dict[str, float]:
        # fp32: in bf16 on AMX a batch of 16 and one of 4 differ in the fourth decimal
        rows = run_predict(
            tiny_run / "run", files, tmp_path / name, tta_copies=3, precision="fp32", console=_quiet()
        )
        return {Path(row.image).name: row.probs["fissure"] for row in rows}

    forward = probabilities(images, "forward.csv")
    backward = probabilities(images[::-1], "backward.csv")
    alone = probabilities(images[2:3], "alone.csv")
    for name, p in forward.items():
        assert backward[name] == pytest.approx(p, abs=1e-6), name
    assert alone[images[2].name] == pytest.approx(forward[images[2].name], abs=1e-6)


def test_a_files_answer_with_tta_does_not_depend_on_how_its_pixels_are_stored(tiny_run, tmp_path):
    """The same slice stored with other intensities (x3 + 500) is standardised to the same input,
    and its copies are the same draws: the same answer. (Seeded by a checksum of the stored pixels,
    an 8-bit PNG and its 16-bit copy got fissure probabilities up to 0.034 apart with 5 copies.)"""
    sources = sorted((tiny_run / "data" / "images").glob("*.png"))[:3]
    copies = []
    for k, source in enumerate(sources):
        pixels = cv2.imread(str(source), cv2.IMREAD_UNCHANGED).astype(np.uint32)
        copies.append(tmp_path / f"{k}.png")
        assert cv2.imwrite(str(copies[-1]), (pixels * 3 + 500).astype(np.uint16))
    rows = run_predict(  # fp32: a slice and its copy fall in batches of other sizes (bf16 on AMX: 1e-4)
        tiny_run / "run",
        sources + copies,
        tmp_path / "p.csv",
        tta_copies=5,
        precision="fp32",
        console=_quiet(),
    )
    p = [row.probs["fissure"] for row in rows]
    assert p[:3] == pytest.approx(p[3:], abs=1e-5)


def test_an_interrupted_predict_keeps_its_rows_and_the_same_command_continues(
    run64, data64, tmp_path, monkeypatch
):
    """predict writes a chunk of inputs at a time into OUT.partial: a kill loses one chunk at most,
    and the same command continues after the rows on disk (half a row from a kill during a write
    cut away), to the very table an uninterrupted call writes. A failed row of the first call
    still fails the command."""
    import mtl_meniscus.commands.predict as predict

    monkeypatch.setattr(predict, "CHUNK", 3)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in sorted((data64 / "images").glob("*.png"))[:7]:
        shutil.copy(path, inputs / path.name)
    (inputs / "0-broken.png").write_bytes(b"not a png")  # first in name order: in the first chunk
    args = ["--tta", "1", "--batch-size", "2"]
    whole = runner.invoke(
        app, ["predict", str(run64), str(inputs), "--out", str(tmp_path / "whole.csv"), *args]
    )
    assert whole.exit_code == 1, whole.output  # the broken file

    chunks = []
    real_rows = predict.SliceAnswers.rows

    def interrupted_rows(self, files, start, on_batch=None):
        chunks.append(len(files[start : start + predict.CHUNK]))
        if len(chunks) == 2:
            raise KeyboardInterrupt
        return real_rows(self, files, start, on_batch)

    monkeypatch.setattr(predict.SliceAnswers, "rows", interrupted_rows)
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(run64), str(inputs), "--out", str(out), *args])
    assert result.exit_code != 0 and not out.exists()
    assert (
        "the rows of 3 of 8 inputs are in" in result.output and "the same command continues" in result.output
    )
    partial = tmp_path / "p.csv.partial"
    assert len(partial.read_text().splitlines()) == 1 + 3  # header and the first chunk
    with partial.open("a") as handle:
        handle.write("half a row of the chunk being writ")

    monkeypatch.setattr(predict.SliceAnswers, "rows", real_rows)
    resumed = runner.invoke(app, ["predict", str(run64), str(inputs), "--out", str(out), *args])
    assert resumed.exit_code == 1, resumed.output  # the broken file's row came from the first call
    assert "continuing" in resumed.output and "inputs already done: 3" in resumed.output
    assert out.read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert not partial.exists() and not (tmp_path / "p.csv.partial.json").exists()
    assert chunks == [3, 3]  # no chunk larger than CHUNK


def test_an_unfinished_table_of_other_settings_starts_over_and_a_foreign_partial_is_kept(
    run64, data64, tmp_path, monkeypatch
):
    import mtl_meniscus.commands.predict as predict

    monkeypatch.setattr(predict, "CHUNK", 2)
    images = sorted((data64 / "images").glob("*.png"))[:4]
    out = tmp_path / "p.csv"

    def stop_after_one_chunk(self, files, start, on_batch=None):
        monkeypatch.setattr(predict.SliceAnswers, "rows", real_rows)
        real_rows(self, files, start, on_batch)
        raise KeyboardInterrupt

    real_rows = predict.SliceAnswers.rows
    monkeypatch.setattr(predict.SliceAnswers, "rows", stop_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_predict(run64, images, out, tta_copies=0, threshold=0.2, console=_quiet())
    assert json.loads((tmp_path / "p.csv.partial.json").read_text())["inputs"] == 0  # the chunk never landed
    assert (
        _predict(run64, *images, out=tmp_path / "reference.csv", extra=["--threshold", "0.3"]).exit_code == 0
    )
    # another threshold than the unfinished table's: started over, none of its rows mixed in
    result = _predict(run64, *images, out=out, extra=["--threshold", "0.3"])
    assert result.exit_code == 0 and "of other settings, started over" in result.output, result.output
    assert out.read_text() == (tmp_path / "reference.csv").read_text()

    (tmp_path / "p.csv.partial").write_text("someone's notes\n")  # not described by a progress file
    result = _predict(run64, *images, out=out)
    _clean(result)
    assert result.exit_code == 1 and "p.csv.partial exists" in result.output, result.output
    assert (tmp_path / "p.csv.partial").read_text() == "someone's notes\n"


def test_an_input_rewritten_under_its_name_or_another_pixel_limit_starts_the_table_over(
    run64, data64, tmp_path, monkeypatch
):
    """A resumed table keeps the rows of the inputs it holds: an input replaced by another image of
    the same name since, or a pixel limit that now refuses inputs, would leave rows the same command
    would not write today. Either starts the table over."""
    import mtl_meniscus.commands.predict as predict

    monkeypatch.setattr(predict, "CHUNK", 2)
    sources = sorted((data64 / "images").glob("*.png"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in sources[:4]:
        shutil.copy(path, inputs / path.name)
    out = tmp_path / "p.csv"
    real_rows = predict.SliceAnswers.rows

    def stop_at_the_second_chunk(self, files, start, on_batch=None):
        if start:  # the first chunk's rows are on disk
            raise KeyboardInterrupt
        return real_rows(self, files, start, on_batch)

    for change in ("rewrite", "limit"):
        monkeypatch.setattr(predict.SliceAnswers, "rows", stop_at_the_second_chunk)
        with pytest.raises(KeyboardInterrupt):
            run_predict(run64, [inputs], out, tta_copies=0, console=_quiet())
        monkeypatch.setattr(predict.SliceAnswers, "rows", real_rows)
        assert json.loads((tmp_path / "p.csv.partial.json").read_text())["inputs"] == 2
        if change == "rewrite":  # the first input is now another slice, under its old name
            first = sorted(inputs.iterdir())[0]
            shutil.copy(sources[10], first)
            os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
        else:  # 64 x 64 = 4096 pixels per slice: now every input is refused
            monkeypatch.setenv("MTL_MENISCUS_MAX_PIXELS", "100")
        result = _predict(run64, inputs, out=out)
        _clean(result)
        assert "of other settings, started over" in result.output, result.output
        reference = tmp_path / f"reference-{change}.csv"
        assert _predict(run64, inputs, out=reference).exit_code == result.exit_code
        assert out.read_text() == reference.read_text()
        out.unlink()
    assert reference.read_text().count("is above the limit of 100 pixels") == 4  # every row refused


def test_a_bad_pixel_limit_stops_predict_instead_of_failing_every_row(tiny_run, tmp_path):
    image = sorted((tiny_run / "data" / "images").glob("*.png"))[0]
    command = ["predict", str(tiny_run / "run"), str(image), "--out", str(tmp_path / "p.csv")]
    result = runner.invoke(app, command, env={"MTL_MENISCUS_MAX_PIXELS": "bogus"})
    assert result.exit_code == 1 and "$MTL_MENISCUS_MAX_PIXELS: bad value 'bogus'" in result.output, (
        result.output
    )
    assert not list(tmp_path.iterdir())  # no table of failed rows, no partial one


def test_a_table_being_written_is_refused_to_a_second_writer(tmp_path):
    from mtl_meniscus.errors import MeniscusError
    from mtl_meniscus.io.resumable_table import ResumableTable

    first = ResumableTable(tmp_path / "p.csv", "image\n", {})
    with pytest.raises(MeniscusError, match="another process is writing this table"):
        ResumableTable(tmp_path / "p.csv", "image\n", {})
    first.add("a.png\n", 1, 0)
    first.finish()
    assert (tmp_path / "p.csv").read_text() == "image\na.png\n"


def test_a_writer_that_waited_for_a_finished_table_starts_a_new_one(tmp_path, monkeypatch):
    """The second writer opened p.csv.partial just before the first one finished (renamed it into
    p.csv) and locked it after: it must not continue in p.csv, but start a new p.csv.partial."""
    import mtl_meniscus.io.resumable_table as tables

    first = tables.ResumableTable(tmp_path / "p.csv", "image\n", {})
    first.add("a.png\n", 1, 0)
    lock_now = tables.lock_now

    def first_finishes_meanwhile(handle):
        if not first._handle.closed:
            first.finish()
        return lock_now(handle)

    monkeypatch.setattr(tables, "lock_now", first_finishes_meanwhile)
    second = tables.ResumableTable(tmp_path / "p.csv", "image\n", {})
    assert second.done == 0 and (tmp_path / "p.csv").read_text() == "image\na.png\n"
    second.add("b.png\n", 1, 0)
    second.finish()
    assert (tmp_path / "p.csv").read_text() == "image\nb.png\n"


def test_a_damaged_files_decoder_warnings_are_not_printed(tiny_run, tmp_path):
    """Its error row says what is wrong; pydicom's and Pillow's own warnings (with their
    site-packages paths) are not printed beside it. A process of its own: pytest records warnings."""
    import subprocess
    import sys

    (tmp_path / "fake.dcm").write_bytes(bytes(128) + b"DICM" + b"\x02\x00" * 10)  # implicit VR, bad UIDs
    (tmp_path / "fake.tif").write_bytes(b"II*\x00 garbage")  # Pillow: corrupt EXIF data
    command = [sys.executable, "cli.py", "predict", str(tiny_run / "run"), str(tmp_path), "--out"]
    result = subprocess.run(
        [*command, str(tmp_path / "p.csv")],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        env=os.environ | {"WANDB_MODE": "disabled"},
    )
    assert result.returncode == 1 and "2 failed, see the error column" in result.stdout, result.stdout
    assert "Warning" not in result.stderr + result.stdout and "site-packages" not in result.stderr, (
        result.stderr
    )


def test_a_table_whose_progress_cannot_be_written_counts_and_continues_right(tmp_path, monkeypatch):
    """A full disk at the progress file: the note counted the rows of the failed chunk as kept, and
    a table started over (other settings) kept the old record, so the next call refused the table
    as someone else's."""
    import errno

    import mtl_meniscus.io.resumable_table as tables

    table = tables.ResumableTable(tmp_path / "p.csv", "image\n", {"model": "a"})
    table.add("a.png\n", 1, 0)
    real_write = tables.write_text_atomic

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(tables, "write_text_atomic", full_disk)
    with pytest.raises(OSError):
        table.add("b.png\n", 1, 0)
    assert (table.done, table.failed) == (1, 0)  # what the record on disk holds
    table.close()
    with pytest.raises(OSError):  # other settings: started over, and its first record fails too
        tables.ResumableTable(tmp_path / "p.csv", "image\n", {"model": "b"})
    monkeypatch.setattr(tables, "write_text_atomic", real_write)
    again = tables.ResumableTable(tmp_path / "p.csv", "image\n", {"model": "b"})  # not refused
    assert again.done == 0
    again.close()
