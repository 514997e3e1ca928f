"""evaluate scores the run's own held-out images (its splits.csv), writes every scored image's
row, chooses and reports its threshold on the probabilities it applies it to, and writes metrics, the
ROC plot and saliency maps; the cascade view by hand."""

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from sklearn.metrics import roc_auc_score
from support import _quiet

from mtl_meniscus.commands.evaluate import cascade_line, cascade_view, run_evaluation, tear_mask
from mtl_meniscus.commands.predict import run_predict
from mtl_meniscus.config import load_config
from mtl_meniscus.engine.inference import predict_probs
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import evaluation_data, load_trained
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.evaluation.metrics import youden_threshold
from mtl_meniscus.phantom.slices import write_phantom

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
FP32 = resolve_runtime("fp32")


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evalsplits")
    write_phantom(folder / "data", n=100, seed=8, size=64)
    config = load_config(TINY, {"data.path": str(folder / "data"), "train.max_epochs": 1})
    train_run(config, folder / "run", console=Console(quiet=True))
    return folder


@pytest.fixture
def run_with_changed_labels(trained, tmp_path):
    """The trained run, whose labels.csv then gains 30 rows, loses one test row and relabels one."""
    run, data = tmp_path / "run", Path(load_trained(trained / "run", FP32).config.data.path)
    shutil.copytree(trained / "run", run)
    original = (data / "labels.csv").read_text()
    rows = _read(data / "labels.csv")
    saved = {r["image"]: r["split"] for r in _read(run / "splits.csv")}
    test_rows = [r for r in rows if saved.get(r["image"]) == "test"]
    gone, relabelled = test_rows[0]["image"], test_rows[1]["image"]
    for row in rows:
        if row["image"] == relabelled and row["fissure"] == "0":
            row.update(fissure="1", orientation="horizontal", position="posterior")
        elif row["image"] == relabelled:
            row.update(fissure="0", orientation="", position="")
    kept = [r for r in rows if r["image"] != gone]
    for k, row in enumerate(rows[:30]):  # the same pictures under new names: new images
        copy = f"images/added_{k}.png"
        shutil.copy(data / row["image"], data / copy)
        kept.append({**row, "image": copy, "mask": row["mask"]})
    with (data / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    yield run, saved, gone
    (data / "labels.csv").write_text(original)


def test_evaluate_scores_the_runs_own_test_images_after_labels_changed(run_with_changed_labels, tmp_path):
    run, saved, gone = run_with_changed_labels
    console = Console(record=True, width=200)
    run_evaluation(run, n_bootstrap=0, tta_copies=0, out_dir=tmp_path / "e", console=console)
    scored = {row["image"] for row in _read(tmp_path / "e" / "predictions.csv")}
    expected = {image for image, split in saved.items() if split == "test"} - {gone}
    assert scored == expected  # never a training image, never an image added since training
    output = console.export_text()
    assert "labels.csv changed since the run" in output
    assert "1 image(s) of the run no longer kept (1 test)" in output
    assert "1 relabelled" in output and "30 added since" in output


def test_evaluate_repeats_the_test_figures_train_wrote_whatever_the_training_seed(trained, tmp_path):
    # train drew its test split's TTA copies and bootstrap with the run's seed: evaluate's default
    data = load_trained(trained / "run", FP32).config.data.path
    config = load_config(TINY, {"data.path": data, "train.max_epochs": 1, "train.seed": 3})
    train_run(config, tmp_path / "run", console=Console(quiet=True))
    wrote = json.loads((tmp_path / "run" / "metrics.json").read_text())["test_tta"]
    metrics = run_evaluation(tmp_path / "run", console=Console(quiet=True))
    assert metrics["seed"] == 3
    undefined = {None: math.nan}  # metrics.json writes an undefined number as null
    for task, auc in wrote["auc"].items():
        assert metrics["tasks"][task]["auc"] == pytest.approx(undefined.get(auc, auc), nan_ok=True)
        ci = [undefined.get(v, v) for v in wrote["auc_ci95"][task]]
        assert metrics["tasks"][task]["auc_ci95"] == pytest.approx(ci, nan_ok=True)


def test_evaluate_refuses_a_split_it_cannot_know(trained, tmp_path):
    checkpoint = tmp_path / "model.pt"
    shutil.copy(trained / "run" / "best.pt", checkpoint)  # no run folder around it
    with pytest.raises(MeniscusError, match="split is unknown"):
        run_evaluation(
            checkpoint, n_bootstrap=0, tta_copies=0, out_dir=tmp_path / "e", console=Console(quiet=True)
        )
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    (run / "splits.csv").unlink()
    with pytest.raises(MeniscusError, match="splits.csv: not found"):
        run_evaluation(run, n_bootstrap=0, tta_copies=0, out_dir=tmp_path / "e", console=Console(quiet=True))


def test_predictions_csv_lets_anyone_recompute_the_figures(trained, tmp_path):
    metrics = run_evaluation(
        trained / "run", n_bootstrap=0, tta_copies=2, out_dir=tmp_path / "e", console=Console(quiet=True)
    )
    rows = _read(tmp_path / "e" / "predictions.csv")
    assert len(rows) == metrics["n_images"] and {r["split"] for r in rows} == {"test"}
    fissure = [int(r["fissure"]) for r in rows]
    auc = roc_auc_score(fissure, [float(r["p_fissure_tta"]) for r in rows])
    assert auc == pytest.approx(metrics["tasks"]["fissure"]["auc"], abs=1e-12)
    assert any(r["p_fissure"] != r["p_fissure_tta"] for r in rows)  # with and without TTA
    tears = [r for r in rows if r["fissure"] == "1"]
    auc = roc_auc_score([int(r["orientation"]) for r in tears], [float(r["p_horizontal_tta"]) for r in tears])
    assert auc == pytest.approx(metrics["tasks"]["orientation"]["auc"], abs=1e-12)
    for row in rows:
        predicted = float(row["p_fissure_tta"]) >= metrics["fissure_threshold"]
        assert row["pred_fissure"] == str(int(predicted))
        assert (row["pred_orientation"] != "") == predicted and (row["pred_position"] != "") == predicted
        if predicted:  # coded as the labels are (1 = horizontal), so they compare column to column
            assert row["pred_orientation"] == str(int(float(row["p_horizontal_tta"]) >= 0.5))


def test_youden_threshold_is_chosen_on_tta_probabilities_and_reported(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    console = Console(record=True, width=200)
    metrics = run_evaluation(
        run, youden=True, n_bootstrap=0, out_dir=tmp_path / "e", console=console, precision="fp32"
    )
    model = load_trained(run, FP32)
    data_rows = {r["image"]: r for r in _read(run / "splits.csv")}
    val = [image for image, r in data_rows.items() if r["split"] == "val"]
    from mtl_meniscus.io.imageio import read_image

    data_dir = Path(model.config.data.path)
    images = [read_image(data_dir / image) for image in val]
    probs = predict_probs(model.model, images, "sobel", FP32, tta=model.config.tta, seed=0)
    truth = np.array([int(data_rows[image]["fissure"]) for image in val])
    expected = youden_threshold(truth, probs["fissure"])
    record = json.loads((run / "threshold.json").read_text())
    assert record["fissure_threshold"] == pytest.approx(expected, abs=1e-9)
    assert record["tta_copies"] == model.config.tta.copies == 1 and record["chosen_by"] == "youden_j"
    assert metrics["fissure_threshold"] == record["fissure_threshold"]
    assert (
        "Youden's J on the run's validation split, TTA 1 copy, uncalibrated probabilities"
        in console.export_text()
    )

    # predict and a later evaluate say which threshold they use and why
    console = Console(record=True, width=200)
    image = data_dir / val[0]
    run_predict(run, [image], tmp_path / "p.csv", tta_copies=0, console=console)
    text = console.export_text()
    assert f"fissure threshold {expected:.3f}: Youden's J" in text and "applied here with 0" in text
    console = Console(record=True, width=200)
    run_evaluation(trained / "run", n_bootstrap=0, tta_copies=0, out_dir=tmp_path / "e2", console=console)
    assert "fissure threshold 0.500: the default" in console.export_text()


def test_cascade_view_by_hand():
    targets = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 1], [0, np.nan, np.nan]], dtype=float)
    probs = {
        "fissure": np.array([0.9, 0.8, 0.2, 0.9]),
        "orientation": np.array([0.7, 0.6, 0.9, 0.5]),  # row 1 wrong
        "position": np.array([0.1, 0.9, 0.9, 0.5]),
    }
    view = cascade_view(targets, probs, 0.5)
    assert view == {
        "true_tears": 3,
        "detected": 2,
        "orientation_correct": 1,
        "orientation_known": 2,
        "position_correct": 2,
        "position_known": 2,
        "all_correct": 1,
        "all_known": 2,
    }
    assert cascade_line(view) == (
        "cascade: 2/3 true tears detected; of those, orientation right 1, position right 2, both right 1"
    )
    # a detected tear of unknown orientation (allowed with data.allow_unknown_subtype) is right in
    # "both" only over the tears whose both labels are known: it made "both" outnumber orientation
    targets[0, 1] = np.nan
    view = cascade_view(targets, probs, 0.5)
    assert (view["orientation_correct"], view["all_correct"], view["all_known"]) == (0, 0, 1)
    assert cascade_line(view) == (
        "cascade: 2/3 true tears detected; of those, orientation right 0 of 1 known, position right 2, "
        "both right 0 of 1 known"
    )


def test_a_tear_mask_for_the_figures_and_the_peak_check_is_at_the_models_size(tiny_run, tmp_path):
    """The saliency gallery's outline and cam_peak_in_tear compare a mask with the model's image:
    with data.size_policy resize, a mask file of another size than the model's images was dropped."""
    import cv2

    folder = tmp_path / "larger"
    write_phantom(folder, n=20, seed=3, size=64)
    for path in [*(folder / "images").glob("*.png"), *(folder / "masks").glob("*.png")]:
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # every slice and mask at 96 x 96
        cv2.imwrite(str(path), cv2.resize(pixels, (96, 96), interpolation=cv2.INTER_NEAREST))
    trained = load_trained(tiny_run / "run", resolve_runtime("fp32", "cpu"))
    trained.config.data.size_policy = "resize"  # as a run trained on slices of several sizes reads them
    data, _ = evaluation_data(trained, folder, "all")
    size, other_size = trained.config.data.image_size, 0
    for index, record in enumerate(data.records):
        if not record.mask or data.targets[index, 0] != 1:
            continue
        stored = cv2.imread(str(data.data_dir / record.mask), cv2.IMREAD_UNCHANGED)
        expected = cv2.resize(stored, (size, size), interpolation=cv2.INTER_NEAREST) == 2
        np.testing.assert_array_equal(tear_mask(data, index, trained.config.data), expected)
        other_size += stored.shape != (size, size)
    assert other_size, "no mask of another size than the model's: the test shows nothing"


def test_evaluate_writes_metrics_roc_and_cams(tiny_run, tmp_path):
    metrics = run_evaluation(
        tiny_run / "run",
        split="all",
        n_bootstrap=50,
        out_dir=tmp_path / "eval",
        console=_quiet(),
        cam_dir=tmp_path / "cams",
        tta_copies=1,
    )
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["n_images"] == 78 and saved["split"] == "all"
    assert set(saved["tasks"]) == {"fissure", "orientation", "position"}
    assert saved["tasks"]["orientation"]["n"] == saved["cascade"]["true_tears"]
    assert len(list((tmp_path / "cams").glob("*_fissure.png"))) == 78
    assert metrics["cam_peak_in_tear"]["n"] <= saved["tasks"]["fissure"]["tp"]
    # every figure as a PNG and a vector PDF beside it
    for name in ("roc", "pr", "confusion", "reliability", "errors"):
        assert (tmp_path / "eval" / f"{name}.png").stat().st_size > 1000
        assert (tmp_path / "eval" / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    # calibration per task, from the same probabilities as predictions.csv (recomputed by hand)
    with (tmp_path / "eval" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    y = np.array([int(r["fissure"]) for r in rows])
    p = np.array([float(r["p_fissure_tta"]) for r in rows])
    assert saved["tasks"]["fissure"]["calibration"]["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert sum(b["n"] for b in saved["tasks"]["fissure"]["calibration"]["bins"]) == 78
    assert saved["calibration"] is None and "uncalibrated" not in saved["tasks"]["fissure"]


def test_a_degenerate_interval_is_marked_in_the_table_and_the_metrics():
    from mtl_meniscus.commands.evaluate import metrics_table, table_notes
    from mtl_meniscus.evaluation.figures import degenerate_interval

    assert degenerate_interval(2, 40) == "only 2 positive images: the interval is not informative"
    assert degenerate_interval(30, 1) == "only 1 negative image: the interval is not informative"
    assert degenerate_interval(5, 5) is None
    assert degenerate_interval(0, 12) == "no positive image: the AUC is undefined"
    task = {
        "n": 3, "n_positive": 2, "auc": 0.5, "auc_ci95": [0.5, 0.5],
        "auc_ci95_note": degenerate_interval(2, 1), "sensitivity": 0.5, "specificity": 1.0,
        "tp": 1, "fp": 0, "tn": 1, "fn": 1, "calibration": {"ece": 0.1, "brier": 0.2},
    }  # fmt: skip
    metrics = {"tasks": {"position": task}, "challenge_score": 0.5, "challenge_score_ci95": [0.4, 0.6]}
    console = Console(record=True, width=200)
    console.print(metrics_table(metrics, "t"))
    assert "0.500-0.500 !" in console.export_text()
    assert table_notes(metrics) == ["! position: only 1 negative image: the interval is not informative"]


def test_evaluate_youden_saves_the_threshold_used_by_predict(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    metrics = run_evaluation(run, youden=True, n_bootstrap=0, out_dir=tmp_path / "e", console=_quiet())
    saved = json.loads((run / "threshold.json").read_text())["fissure_threshold"]
    assert metrics["fissure_threshold"] == saved
    assert load_trained(run, FP32).saved_threshold.value == saved


def test_a_copied_data_folder_keeps_the_runs_splits_and_other_data_gets_its_own_output(trained, tmp_path):
    # A copy with one label edited used to be split by its own rules: its "test" split was mostly
    # the run's training images. Other data went into RUN/eval-test, over the held-out evaluation.
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    copy = tmp_path / "moved"
    shutil.copytree(trained / "data", copy)
    rows = _read(copy / "labels.csv")
    healthy = next(row for row in rows if row["fissure"] == "0")
    healthy.update(fissure="1", orientation="horizontal", position="posterior")
    _write(copy / "labels.csv", rows)
    metrics = run_evaluation(run, data_dir=copy, n_bootstrap=0, tta_copies=0, console=_quiet())
    saved = {row["image"]: row["split"] for row in _read(run / "splits.csv")}
    scored = _read(run / "eval-test-moved" / "predictions.csv")
    assert scored and {saved[row["image"]] for row in scored} == {"test"}  # the run's own test images
    assert "holds images of the run's data" in metrics["data_note"] and "1 relabelled" in metrics["data_note"]
    assert not (run / "eval-test").exists()  # its own evaluation's folder is left alone

    own = run_evaluation(run, split="train", n_bootstrap=0, tta_copies=0, console=_quiet())
    assert "these are the run's training images: not a held-out figure" in own["data_note"]
    import torch

    payload = torch.load(run / "best.pt", weights_only=True)
    payload["config"]["data"]["path"] = str(tmp_path / "gone")  # the run's data folder moved away
    torch.save(payload, run / "best.pt")
    with pytest.raises(MeniscusError, match="data folder .*gone is gone \\(moved\\?\\): pass --data"):
        run_evaluation(run, n_bootstrap=0, tta_copies=0, console=_quiet())


def test_another_data_set_sharing_image_names_is_split_by_its_own_rules(trained, tmp_path):
    """Two phantoms (or two hospitals' case001...) share names, not pixels or labels. Taken for the
    run's data because one name matched, another phantom was scored on the names of the run's test
    split, 'relabelled' and all; now it is another data set, and the note says why."""
    other = tmp_path / "other"
    write_phantom(other, n=60, seed=9, size=64)  # knee_00000..knee_00059, as 60 of the run's 100
    metrics = run_evaluation(
        trained / "run", data_dir=other, n_bootstrap=0, tta_copies=0, out_dir=tmp_path / "e", console=_quiet()
    )
    assert "holds images of the run's data" not in metrics["data_note"]
    assert re.search(
        r"shares \d\d of the run's \d\d image names \(\d+ of them labelled otherwise\)", metrics["data_note"]
    )
    assert "taken as another data set, split by its own rules" in metrics["data_note"]
    own = {row["image"] for row in _read(tmp_path / "e" / "predictions.csv")}
    run_test = {row["image"] for row in _read(trained / "run" / "splits.csv") if row["split"] == "test"}
    assert own != run_test & {f"images/knee_{k:05d}.png" for k in range(60)}


def test_youden_on_a_one_class_val_split_is_refused(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    rows = _read(run / "splits.csv")
    for row in rows:  # every val tear moved to train: the val split holds one class
        if row["split"] == "val" and row["fissure"] == "1":
            row["split"] = "train"
    _write(run / "splits.csv", rows)
    with pytest.raises(MeniscusError, match="--youden: the val split .* has 0 tears in .*needs both classes"):
        run_evaluation(run, youden=True, n_bootstrap=0, tta_copies=0, console=_quiet())
    assert not (run / "threshold.json").exists()


def test_evaluate_keeps_others_files_and_best_pts_evaluation(trained, tmp_path):
    """--out that holds files evaluate did not write is refused before any work (its metrics.json
    or predictions.csv would be replaced); a folder it wrote takes it again. Another checkpoint
    (last.pt) gets a default folder of its own instead of replacing best.pt's evaluation."""
    from typer.testing import CliRunner

    from mtl_meniscus.cli import app

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    work = tmp_path / "work"
    work.mkdir()
    (work / "metrics.json").write_text('{"mine": 1}\n')
    options = ["--bootstrap", "20", "--tta", "1"]
    result = CliRunner().invoke(app, ["evaluate", str(run), "--out", str(work), *options])
    assert result.exit_code == 1 and "holds files (metrics.json)" in result.output
    assert (work / "metrics.json").read_text() == '{"mine": 1}\n'
    for _ in range(2):  # a new folder, then the folder evaluate wrote
        result = CliRunner().invoke(app, ["evaluate", str(run), "--out", str(tmp_path / "mine"), *options])
        assert result.exit_code == 0, result.output
    assert CliRunner().invoke(app, ["evaluate", str(run), *options]).exit_code == 0
    assert CliRunner().invoke(app, ["evaluate", str(run / "last.pt"), *options]).exit_code == 0
    best = json.loads((run / "eval-test" / "metrics.json").read_text())["checkpoint"]
    last = json.loads((run / "eval-test-last" / "metrics.json").read_text())["checkpoint"]
    assert Path(best).name == "best.pt" and Path(last).name == "last.pt"


def test_evaluate_on_data_of_another_size_gives_advice_it_can_follow(trained, tmp_path):
    """evaluate keeps the run's settings (it has no --set), so the config keys are no advice."""
    write_phantom(tmp_path / "big", n=20, seed=3, size=96)
    with pytest.raises(MeniscusError, match="wrong size") as refused:
        run_evaluation(
            trained / "run", data_dir=tmp_path / "big", split="all", n_bootstrap=0, console=_quiet()
        )
    message = str(refused.value)
    assert "resize yours to it" in message and "data.size_policy" not in message


def test_calibrating_on_the_val_split_does_not_call_the_test_figures_optimistic(trained, tmp_path):
    """--calibrate and --youden fit on the val split; the note for scoring that split ('an
    optimistic figure') was printed twice above the test split's table."""
    from typer.testing import CliRunner

    from mtl_meniscus.cli import app

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    result = CliRunner().invoke(app, ["evaluate", str(run), "--calibrate", "--youden", "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    assert "optimistic" not in result.output
    result = CliRunner().invoke(app, ["evaluate", str(run), "--split", "val", "--bootstrap", "20"])
    assert "an optimistic figure" in result.output  # scoring the val split still says it


@pytest.mark.parametrize("option", ["--calibrate", "--youden"])
def test_fitting_last_pt_does_not_replace_the_fit_predict_applies(trained, tmp_path, option):
    """calibration.json and threshold.json hold one checkpoint's fit; predict, export and serve
    apply best.pt's. A fit for last.pt written over it left them uncalibrated without a word."""
    from typer.testing import CliRunner

    from mtl_meniscus.cli import app

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    result = CliRunner().invoke(app, ["evaluate", str(run), option, "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    fits = ("calibration.json", "threshold.json")
    saved = {path.name: path.read_text() for path in run.glob("*.json") if path.name in fits}
    assert saved
    result = CliRunner().invoke(
        app, ["evaluate", str(run / "last.pt"), option, "--bootstrap", "0", "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "was fitted for best.pt" in result.output and "move" in result.output
    assert {name: (run / name).read_text() for name in saved} == saved
    if option == "--youden":  # a threshold.json from before fits named their checkpoint: best.pt's
        record = json.loads(saved["threshold.json"])
        del record["checkpoint"]
        (run / "threshold.json").write_text(json.dumps(record))
        result = CliRunner().invoke(
            app, ["evaluate", str(run / "last.pt"), option, "--bootstrap", "0", "--out", str(tmp_path / "e")]
        )
        assert result.exit_code == 1 and "was fitted for best.pt" in result.output
        assert json.loads((run / "threshold.json").read_text()) == record


def test_a_run_folder_without_its_config_yaml_is_named_so(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    (run / "config.yaml").unlink()
    with pytest.raises(MeniscusError, match="has no config.yaml, so it is not read as a run folder"):
        run_evaluation(run, n_bootstrap=0, console=Console(quiet=True), out_dir=tmp_path / "e")


def test_evaluate_names_the_rows_it_left_out(trained, tmp_path):
    """An unreadable image of another data folder was left out of every figure, counted in one
    line but named nowhere (train writes exclusions.csv; evaluate wrote nothing)."""
    other = tmp_path / "other"
    shutil.copytree(trained / "data", other)
    broken = _read(other / "labels.csv")[3]["image"]
    (other / broken).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    console = Console(record=True, width=300)
    metrics = run_evaluation(
        trained / "run",
        data_dir=other,
        split="all",
        n_bootstrap=0,
        tta_copies=0,
        out_dir=tmp_path / "e",
        console=console,
    )
    excluded = {row["image"]: row["reason"] for row in _read(tmp_path / "e" / "exclusions.csv")}
    assert excluded[broken].startswith("unreadable") and len(excluded) == metrics["excluded_rows"]
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["excluded_rows"] == len(excluded)
    assert f"(report: {tmp_path / 'e' / 'exclusions.csv'})" in console.export_text()


def test_an_evaluation_that_fails_to_write_leaves_no_metrics_json(trained, tmp_path, monkeypatch):
    """A full disk halfway through: the new metrics.json sat beside the earlier evaluation's
    predictions.csv and figures, and nothing said the folder was a mix. metrics.json, written last,
    is there only when the evaluation is whole."""
    import errno

    import mtl_meniscus.commands.evaluate as evaluate_module

    out = tmp_path / "eval"
    run_evaluation(trained / "run", n_bootstrap=0, tta_copies=0, out_dir=out, console=_quiet())
    assert (out / "metrics.json").is_file()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "errors.png"))

    monkeypatch.setattr(evaluate_module, "write_galleries", full_disk)
    with pytest.raises(OSError):
        run_evaluation(trained / "run", n_bootstrap=0, tta_copies=1, out_dir=out, console=_quiet())
    assert not (out / "metrics.json").exists()


def test_a_second_evaluation_into_the_same_folder_is_refused_while_the_first_writes(trained, tmp_path):
    """Two evaluate calls into one folder (or both into RUN/eval-test) had mixed their files: one's
    metrics.json (tta_copies 8) beside the other's predictions.csv. The folder is locked while an
    evaluation writes it; the other is refused naming it, and leaves the first's files alone."""
    from typer.testing import CliRunner

    from mtl_meniscus.cli import app
    from mtl_meniscus.io.runlock import RunLock

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    options = ["--bootstrap", "20", "--tta", "1"]
    assert CliRunner().invoke(app, ["evaluate", str(run), *options]).exit_code == 0
    written = (run / "eval-test" / "metrics.json").read_bytes()
    first = RunLock(
        run / "eval-test", "evaluation folder"
    )  # an evaluation writing it (this process holds it)
    try:
        result = CliRunner().invoke(app, ["evaluate", str(run), *options, "--tta", "0"])
    finally:
        first.release()
    assert result.exit_code == 1 and "eval-test is in use by another process" in result.output
    assert (run / "eval-test" / "metrics.json").read_bytes() == written
    assert not (run / "eval-test" / ".lock").exists()
    assert CliRunner().invoke(app, ["evaluate", str(run), *options]).exit_code == 0  # free again
