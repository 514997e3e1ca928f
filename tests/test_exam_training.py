"""Training on whole exams: slice features pooled over each exam, MRNet's layout read as data, and
the tasks its labels leave unknown left out of the model."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from support import Killed, kill_after
from typer.testing import CliRunner

from mtl_meniscus.cli import app
from mtl_meniscus.config import DataConfig, ModelConfig, load_config
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.data.mrnet import read_mrnet
from mtl_meniscus.data.torch_dataset import ExamDataset, collate_batch
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import load_trained
from mtl_meniscus.errors import ConfigError, DataError
from mtl_meniscus.networks.models import ExamNet, build_model
from mtl_meniscus.phantom.exams import write_phantom_exams

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SMALL_NET = {"widths": (4, 8, 8, 8), "pool_grid": 2, "dense": (8, 4), "conv_dropout": 0.0}


def exam_net(pooling: str, name: str = "shared") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, exam_pooling=pooling, **SMALL_NET)).eval()


@pytest.mark.parametrize("pooling", ["max", "attention"])
def test_exam_pooling_ignores_the_order_of_slices_and_keeps_exams_apart(pooling):
    net = exam_net(pooling)
    exams = [torch.randn(5, 2, 32, 32), torch.randn(3, 2, 32, 32)]
    with torch.no_grad():
        both = net(torch.cat(exams), torch.tensor([5, 3]))
        shuffled = net(torch.cat([exams[0][[3, 0, 4, 2, 1]], exams[1][[2, 0, 1]]]), torch.tensor([5, 3]))
        alone = [net(exam, torch.tensor([len(exam)])) for exam in exams]
    for task, logits in both.items():
        assert logits.shape == (2,)
        torch.testing.assert_close(shuffled[task], logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.cat([a[task] for a in alone]), logits, rtol=1e-5, atol=1e-6)


def test_max_pooling_is_the_highest_slice_feature():
    net = exam_net("max")
    assert isinstance(net, ExamNet)
    exam = torch.randn(4, 2, 32, 32)
    with torch.no_grad():
        features = net.slice_net.trunk(exam)  # (4, F), computed slice by slice here
        by_hand = torch.stack([features[:, j].max() for j in range(features.shape[1])])[None]
        expected = {task: head(by_hand) for task, head in net.slice_net.heads.items()}
        got = net(exam, torch.tensor([4]))
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=1e-5, atol=1e-6)


def test_the_cascade_on_exams_runs_each_network_on_the_same_exams():
    cascade = exam_net("max", name="separate")
    x, lengths = torch.randn(7, 2, 32, 32), torch.tensor([4, 3])
    with torch.no_grad():
        out = cascade(x, lengths)
        fissure = cascade.networks["fissure"](x, lengths)["fissure"]
    assert set(out) == {"fissure", "orientation", "position"} and out["fissure"].shape == (2,)
    torch.testing.assert_close(out["fissure"], fissure)


def test_exams_are_collated_slice_after_slice_with_their_lengths():
    a, b = torch.arange(3 * 2 * 4.0).reshape(3, 2, 2, 2), -torch.arange(1 * 2 * 4.0).reshape(1, 2, 2, 2)
    (x, lengths), targets = collate_batch([(a, torch.tensor([1.0])), (b, torch.tensor([0.0]))])
    assert lengths.tolist() == [3, 1] and targets.tolist() == [[1.0], [0.0]]
    torch.testing.assert_close(x, torch.cat([a, b]))
    (single,), _ = collate_batch([(a[0], torch.tensor([1.0]))])  # slices stay (B, C, H, W)
    torch.testing.assert_close(single, a[:1])


def test_an_augmented_exam_moves_every_slice_alike():
    from mtl_meniscus.config import AugmentConfig

    image = np.zeros((32, 32), np.float32)
    image[8:20, 10:14] = 1.0
    volume = np.stack([image, image * 2, image * 3])  # the same shape, three brightnesses
    dataset = ExamDataset(
        [volume], np.ones((1, 1)), "none", AugmentConfig(rotation_deg=40, translate_frac=0.2)
    )
    moved, _ = dataset[(0, 123)]  # (3, 1, 32, 32), each channel standardized
    assert moved.shape == (3, 1, 32, 32)
    assert not torch.allclose(moved[0], dataset[(0, None)][0][0])  # it did move
    torch.testing.assert_close(moved[1], moved[0], rtol=1e-4, atol=1e-4)  # and all slices alike
    torch.testing.assert_close(moved[2], moved[0], rtol=1e-4, atol=1e-4)


def test_mrnet_is_read_as_exams_with_valid_as_the_test_split(tmp_path):
    root = tmp_path / "mrnet"
    exams = write_phantom_exams(root, n=40, n_slices=4, seed=1, size=64, fmt="mrnet")
    # one more training exam whose slices are of another size
    np.save(root / "train" / "sagittal" / "0040.npy", np.zeros((4, 48, 48), np.uint8))
    # and two whose slices are not square: one saved slices-last (64, 64, 8), one of 64x48 slices
    np.save(root / "train" / "sagittal" / "0041.npy", np.zeros((64, 64, 8), np.uint8))
    np.save(root / "train" / "sagittal" / "0042.npy", np.zeros((4, 64, 48), np.uint8))
    with (root / "train-meniscus.csv").open("a") as handle:
        handle.write("0040,0\n0041,1\n0042,1\n")
    data = prepare_data(root, DataConfig(layout="mrnet", image_size=64))
    assert data.exams and len(data.records) == 40
    assert [image for image, _, _ in data.exclusions] == [f"train/sagittal/00{k}.npy" for k in (40, 41, 42)]
    reasons = [reason for _, _, reason in data.exclusions]
    assert reasons[0] == "wrong size: 48x48 slices, expected 64x64"
    assert "slices of 64x8 are not square (MRNet's are); saved slices-last?" in reasons[1]
    assert "slices of 64x48 are not square (MRNet's are)" in reasons[2] and "slices-last" not in reasons[2]
    test = [data.records[i].image for i in data.indices("test")]
    assert test == [f"valid/sagittal/{e.name}.npy" for e in exams[36:]]  # MRNet's valid folder, all of it
    tears = data.targets[:, 0]
    assert tears.tolist() == [e.case.fissure for e in exams]
    # the train folder split 7:2 (data.split_fractions' first two), stratified on the tear label
    train, val = data.indices("train"), data.indices("val")
    assert len(train) + len(val) == 36 and len(val) == round(36 * 2 / 9)
    assert abs(tears[val].mean() - tears[np.r_[train, val]].mean()) < 0.1
    # subtypes are unknown on tears (NaN, not negative) and the summary line says so
    assert np.isnan(data.targets[tears == 1, 1:]).all()
    assert f"unknown (masked, not negative): {int(tears.sum())} orientation" in data.exclusion_summary()
    assert data.images[0].shape == (4, 64, 64) and data.images[0].dtype == np.float32
    resized = prepare_data(root, DataConfig(layout="mrnet", image_size=64, size_policy="resize"))
    assert len(resized.records) == 41 and resized.resized == 1 and resized.images[40].shape == (4, 64, 64)
    assert len(resized.exclusions) == 2  # not square: set aside whatever the size policy


def test_a_case_in_both_mrnet_splits_is_refused_naming_both_files(tmp_path):
    root = tmp_path / "mrnet"
    for folder, cases in (("train", ("0000", "0001", "0002")), ("valid", ("0003", "0002"))):
        (root / folder / "sagittal").mkdir(parents=True)
        for case in cases:
            np.save(root / folder / "sagittal" / f"{case}.npy", np.zeros((3, 64, 64), np.uint8))
    (root / "train-meniscus.csv").write_text("0000,0\n0001,1\n0002,1\n")
    (root / "valid-meniscus.csv").write_text("0003,0\n2,1\n")  # case 2 is train's 0002: one exam
    expected = (
        f"{root / 'valid-meniscus.csv'}: 1 problem(s):\n  row 2: case 2 is also listed in "
        f"{root / 'train-meniscus.csv'} (row 3): an exam in both would be trained on and tested on; "
        "keep it in one of the two"
    )
    with pytest.raises(DataError) as err:
        prepare_data(root, DataConfig(layout="mrnet", image_size=64))
    assert str(err.value) == expected
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "--config", str(TINY), "--mrnet", str(root), "--device", "cpu", "--out", str(out)]
        + ["--max-epochs", "1", "--steps-per-epoch", "1"],
    )
    assert result.exit_code == 1 and expected in result.output and "Traceback" not in result.output
    assert not (out / "splits.csv").exists() and not (out / "best.pt").exists()
    # scoring one split reads that split alone: evaluate --mrnet on valid is not a training run
    assert [e.case for e in read_mrnet(root, "valid")] == ["0003", "2"]


def test_an_exam_model_needs_exam_data():
    with pytest.raises(ConfigError, match="model.exam_pooling"):
        load_config(TINY, {"model.exam_pooling": "max"})
    with pytest.raises(ConfigError, match="'data.path'.*make-phantom OUT --n-exams"):
        load_config(TINY, {"data.layout": "mrnet"})  # no built-in MRNet folder
    config = load_config(TINY, {"data.layout": "mrnet", "data.path": "MRNet-v1.0"})
    assert config.model.exam_pooling == "max"  # MRNet's labels are per exam


def _tiny_exam_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-exams.yaml"
    path.write_text(f"base: {TINY}\ntrain:\n  batch_size: 4\n  eval_batch_size: 4\n  max_epochs: 2\n")
    return path


@pytest.fixture(scope="module")
def mrnet_runs(tmp_path_factory):
    """Both modes trained on phantom exams in MRNet's layout through the CLI."""
    folder = tmp_path_factory.mktemp("exam-training")
    write_phantom_exams(folder / "mrnet", n=40, n_slices=5, seed=2, size=64, fmt="mrnet")
    config = _tiny_exam_config(folder)
    results = {}
    for mode in ("shared", "separate"):
        result = CliRunner().invoke(
            app,
            ["train", "--mode", mode, "--config", str(config), "--mrnet", str(folder / "mrnet")]
            + ["--precision", "fp32", "--out", str(folder / mode)],
        )
        assert result.exit_code == 0, result.output
        results[mode] = result.output
    return folder, results


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_both_modes_train_on_mrnet_exams_and_predict_only_the_tear(mrnet_runs, mode):
    folder, outputs = mrnet_runs
    run = folder / mode
    assert "unknown (masked, not negative)" in outputs[mode]
    assert "orientation: no known label in the train split" in outputs[mode]
    # the next steps an exam model takes: predict --exams, no ONNX export (slice models only)
    assert f"predict {run} EXAMS... --exams" in outputs[mode] and " export " not in outputs[mode]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["unit"] == "exams" and metrics["test"]["n_images"] == 4  # the valid folder
    assert list(metrics["test"]["auc"]) == ["fissure"]
    trained = load_trained(run, resolve_runtime("fp32"))
    assert trained.config.model.tasks == ("fissure",) and trained.config.model.exam_pooling == "max"
    assert trained.outputs == ["fissure"]
    if mode == "separate":
        assert sorted(p.name for p in (run / "members").iterdir()) == ["fissure"]
    # the test AUC is the exam model's on the valid folder's exams
    from sklearn.metrics import roc_auc_score

    with (folder / "mrnet" / "valid-meniscus.csv").open() as handle:
        cases = list(csv.reader(handle))
    volumes = [
        np.load(folder / "mrnet" / "valid" / "sagittal" / f"{c}.npy").astype(np.float32) for c, _ in cases
    ]
    probs = trained.predict(volumes, resolve_runtime("fp32"))["fissure"]
    truth = [int(label) for _, label in cases]
    assert metrics["test"]["auc"]["fissure"] == pytest.approx(roc_auc_score(truth, probs))
    # evaluate --mrnet scores the same exams with the exam model's own output
    result = CliRunner().invoke(
        app,
        ["evaluate", str(run), "--mrnet", str(folder / "mrnet"), "--tta", "0", "--bootstrap", "20"]
        + ["--precision", "fp32", "--out", str(run / "eval-mrnet")],
    )
    assert result.exit_code == 0, result.output
    exam_level = json.loads((run / "eval-mrnet" / "metrics.json").read_text())
    assert exam_level["auc"] == pytest.approx(metrics["test"]["auc"]["fissure"])
    assert "data_note" not in exam_level and "training exams" not in result.output  # valid: held out


def test_evaluating_an_exam_run_on_its_training_exams_says_so(mrnet_runs):
    folder, _ = mrnet_runs
    run = folder / "shared"
    result = CliRunner().invoke(
        app,
        ["evaluate", str(run), "--mrnet", str(folder / "mrnet"), "--split", "train", "--tta", "0"]
        + ["--bootstrap", "20", "--precision", "fp32", "--out", str(run / "eval-mrnet-train")],
    )
    assert result.exit_code == 0, result.output
    note = (
        f"these are the run's training exams (the train folder of {folder / 'mrnet'}, which the run split "
        "into its train and val): this AUC is not a held-out figure; the run's test split is MRNet's valid "
        "folder (--split valid, the default)"
    )
    assert f"! {note}" in " ".join(result.output.split())  # the console may wrap the line
    metrics = json.loads((run / "eval-mrnet-train" / "metrics.json").read_text())
    assert metrics["data_note"] == note and metrics["n_exams"] == 36  # the whole train folder


def test_predict_with_an_exam_model_on_a_dicom_series_and_a_bad_exam(mrnet_runs, tmp_path):
    folder, _ = mrnet_runs
    write_phantom_exams(tmp_path / "dicom", n=20, n_slices=5, seed=4, size=64, fmt="dicom-series")
    series = tmp_path / "dicom" / "exam_0000"
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an array")
    out = tmp_path / "exams.csv"
    result = CliRunner().invoke(
        app,
        ["predict", str(folder / "shared"), str(series), str(bad), "--exams", "--slices", "--tta", "0"]
        + ["--precision", "fp32", "--out", str(out)],
    )
    assert result.exit_code == 1, result.output  # the bad exam fails; the series is predicted
    assert "exam model's output (max pooling" in result.output
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    exam_rows = [r for r in rows if r["slice"] == ""]
    assert exam_rows[0]["error"] == "" and str(bad) in exam_rows[1]["error"]
    assert "p_horizontal" not in rows[0]  # orientation was not learned, so it is not predicted
    # the exam's row is the exam model on the whole series in anatomical order
    from mtl_meniscus.io.exams import read_exam

    fp32 = resolve_runtime("fp32")
    trained = load_trained(folder / "shared", fp32)
    expected = trained.predict([read_exam(series)], fp32)["fissure"][0]
    assert float(exam_rows[0]["p_fissure"]) == pytest.approx(float(expected), abs=1e-5)
    assert int(exam_rows[0]["slices"]) == 5 and len(rows) == 1 + 5 + 1
    # the same as JSON lines, one object per exam
    out = tmp_path / "exams.jsonl"
    result = CliRunner().invoke(
        app,
        ["predict", str(folder / "shared"), str(series), str(bad), "--exams", "--json", "--tta", "0"]
        + ["--precision", "fp32", "--out", str(out)],
    )
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["exam"] for line in lines] == [str(series), str(bad)]
    assert float(lines[0]["p_fissure"]) == pytest.approx(float(expected), abs=1e-5)
    assert lines[0]["error"] is None and "cannot read" in lines[1]["error"]


def test_attention_pooling_trains_and_an_exam_model_is_not_exported(mrnet_runs, tmp_path):
    folder, _ = mrnet_runs
    result = CliRunner().invoke(
        app,
        ["train", "--config", str(_tiny_exam_config(tmp_path)), "--mrnet", str(folder / "mrnet")]
        + ["--set", "model.exam_pooling=attention", "--max-epochs", "1", "--out", str(tmp_path / "run")],
    )
    assert result.exit_code == 0, result.output
    assert load_trained(tmp_path / "run", resolve_runtime("fp32")).config.model.exam_pooling == "attention"
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "ONNX export takes slice models only" in result.output


def test_subtypes_unknown_on_every_training_tear_are_left_out(small_phantom, tmp_path):
    """labels.csv with orientation and position empty on every tear (as fastMRI+ gives it): the
    model predicts the tear only, instead of two heads that never saw a label."""
    from mtl_meniscus.engine.run import train_run

    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(small_phantom / "images")
    with (small_phantom / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (data / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "fissure", "orientation", "position"])
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {"image": row["image"], "fissure": row["fissure"], "orientation": "", "position": ""}
            )
    config = load_config(
        TINY,
        {"data.path": str(data), "data.allow_unknown_subtype": True}
        | {"data.size_policy": "resize", "train.max_epochs": 1},
    )
    metrics = train_run(config, tmp_path / "run")
    assert list(metrics["test"]["auc"]) == ["fissure"]
    assert any("position: no known label in the train split" in w for w in metrics["warnings"])
    assert load_trained(tmp_path / "run", resolve_runtime("fp32")).outputs == ["fissure"]


def test_a_killed_exam_run_resumes_to_the_same_model(mrnet_runs, tmp_path):
    """Long jobs can be resumed: an exam run killed after epoch 1 ends as the uninterrupted one."""
    from mtl_meniscus.engine.checkpoint import load_checkpoint
    from mtl_meniscus.engine.run import train_run

    folder, _ = mrnet_runs
    overrides = {"data.path": str(folder / "mrnet"), "data.layout": "mrnet", "train.precision": "fp32"}

    def config():  # a fresh one per run: train_run fills in what it resolves
        return load_config(_tiny_exam_config(tmp_path), overrides)

    full = train_run(config(), tmp_path / "full")

    with pytest.raises(Killed):
        train_run(config(), tmp_path / "killed", on_epoch_end=kill_after(1))
    resumed = train_run(None, tmp_path / "killed", resume=True)
    assert resumed["test"]["auc"] == full["test"]["auc"] and resumed["members"] == full["members"]
    a = load_checkpoint(tmp_path / "full" / "best.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "killed" / "best.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- ROI-first classification on exams: each slice cropped around its own classical horns ------


def test_an_exam_roi_model_pools_each_slices_image_and_crop_features():
    from mtl_meniscus.networks.models import needs_horns

    with pytest.raises(ConfigError, match="model.roi.*none or classical with model.exam_pooling"):
        load_config(TINY, {"data.layout": "mrnet", "data.path": "MRNet-v1.0", "model.roi": "truth"})
    torch.manual_seed(0)
    config = ModelConfig(exam_pooling="attention", roi="classical", **SMALL_NET)
    model = build_model(config).eval()
    assert needs_horns(model)
    x, lengths = torch.randn(7, 2, 64, 64), torch.tensor([4, 3])  # crops of 96 px at 256: 24 px
    horns = torch.rand(7, 2, 3) * 64
    horns[..., 2] = 1.0
    with torch.no_grad():
        out = model(x, lengths, horns)["fissure"]
        net = model.slice_net  # by hand: each slice's features and its two crops', pooled per exam
        features = torch.cat([net.trunk(x), net.horn_features(x, horns)], dim=1)
        expected = net.heads["fissure"](model.pool(features, lengths))
    assert out.shape == (2,) and torch.equal(out, expected)
    assert features.shape[1] == net.num_features == 3 * net.trunk.num_features
    with pytest.raises(Exception, match="model.roi classical"):
        model(x, lengths)  # no horns: named


def test_an_exams_horns_move_with_its_slices_and_are_collated_slice_after_slice():
    from mtl_meniscus.config import AugmentConfig
    from mtl_meniscus.data.augment import move_points, sample_affine
    from mtl_meniscus.data.roi import HornCentres

    rng = np.random.default_rng(0)
    volumes = [
        rng.normal(size=(3, 32, 32)).astype(np.float32),
        rng.normal(size=(2, 32, 32)).astype(np.float32),
    ]
    found = {0: rng.uniform(4, 28, size=(3, 2, 3)).astype(np.float32), 1: np.zeros((2, 2, 3), np.float32)}
    horns = HornCentres("classical", volumes)
    horns._found = dict(found)  # as if the classical search had found these on each slice
    augment = AugmentConfig(rotation_deg=30, translate_frac=0.1)
    with_horns = ExamDataset(volumes, np.ones((2, 1)), "sobel", augment, horns=horns)
    without = ExamDataset(volumes, np.ones((2, 1)), "sobel", augment)
    x, _, moved = with_horns[(0, 7)]
    torch.testing.assert_close(x, without[(0, 7)][0])  # the slices are what they are without horns
    params = sample_affine(augment, 32, 32, np.random.default_rng(7))
    for k in range(3):  # every slice's horns by the exam's one transform
        expected = move_points(found[0][k, :, :2], params, 32, 32)
        np.testing.assert_allclose(moved[k, :, :2].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(moved[..., 2].numpy(), found[0][..., 2])
    (x, lengths, batch_horns), _ = collate_batch([with_horns[(0, None)], with_horns[(1, None)]], horns=True)
    assert lengths.tolist() == [3, 2] and batch_horns.shape == (5, 2, 3)
    np.testing.assert_array_equal(batch_horns.numpy(), np.concatenate([found[0], found[1]]))
    assert horns.not_found() == 1  # exam 1 has no horns on any slice


def test_an_exam_roi_model_trains_on_mrnet_exams_and_predicts_an_exam(mrnet_runs, tmp_path):
    folder, _ = mrnet_runs
    run = tmp_path / "roi"
    args = [
        "train",
        "--mode",
        "shared",
        "--config",
        str(_tiny_exam_config(tmp_path)),
        "--mrnet",
        str(folder / "mrnet"),
    ]
    result = CliRunner().invoke(
        app, args + ["--set", "model.roi=classical", "--precision", "fp32", "--out", str(run)]
    )
    assert result.exit_code == 0, result.output
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert test["roi"]["images"] == 4 * 5  # every slice of the 4 test exams cropped once
    assert "slices cropped at the fallback windows" in result.output
    trained = load_trained(run, resolve_runtime("fp32"))
    volume = np.load(folder / "mrnet" / "valid" / "sagittal" / "0036.npy").astype(np.float32)
    probs = trained.predict([volume, volume[:2]], resolve_runtime("fp32"))["fissure"]  # horns found by itself
    assert probs.shape == (2,) and np.isfinite(probs).all()


def test_blank_lines_in_an_mrnet_label_file_are_skipped_and_rows_keep_their_line(tmp_path):
    """A blank line (one ends many files) was refused as a bad row; labels.csv skips them."""
    root = tmp_path / "mrnet"
    (root / "valid" / "sagittal").mkdir(parents=True)
    for case in ("0003", "0004"):
        np.save(root / "valid" / "sagittal" / f"{case}.npy", np.zeros((3, 64, 64), np.uint8))
    (root / "valid-meniscus.csv").write_text("0003,0\n\n0004,1\n\n")
    assert [(e.case, e.tear) for e in read_mrnet(root, "valid")] == [("0003", 0), ("0004", 1)]
    (root / "valid-meniscus.csv").write_text("0003,0\n\n0004,7\n")
    with pytest.raises(DataError, match=r"row 3: '0004,7'"):  # numbered by its line
        read_mrnet(root, "valid")


def test_evaluate_sets_an_unreadable_exam_aside_and_names_it(mrnet_runs, tmp_path):
    """One unreadable exam ended the evaluation of all the others (an error after reading them); it
    is set aside, as train sets it aside, and named in exclusions.csv."""
    folder, _ = mrnet_runs
    mrnet = tmp_path / "mrnet"
    shutil.copytree(folder / "mrnet", mrnet)
    with (mrnet / "valid-meniscus.csv").open() as handle:
        cases = [case for case, _ in csv.reader(handle)]
    broken = mrnet / "valid" / "sagittal" / f"{cases[1]}.npy"
    broken.write_bytes(broken.read_bytes()[:100])  # cut short
    # saved slices-last: it read as many slices of a stretched strip, and was scored
    slices_last = mrnet / "valid" / "sagittal" / f"{cases[2]}.npy"
    np.save(slices_last, np.load(slices_last).transpose(1, 2, 0))
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app,
        ["evaluate", str(folder / "shared"), "--mrnet", str(mrnet), "--tta", "0", "--bootstrap", "0"]
        + ["--precision", "fp32", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert (
        f"set aside 2 exams that could not be scored (e.g. valid/sagittal/{cases[1]}.npy, unreadable; report: {out}"
        in " ".join(result.output.split())
    )
    with (out / "exclusions.csv").open() as handle:
        cut, turned = list(csv.DictReader(handle))
    assert cut["image"] == f"valid/sagittal/{cases[1]}.npy" and cut["reason"].startswith("unreadable: ")
    assert turned["image"] == f"valid/sagittal/{cases[2]}.npy" and turned["reason"].startswith("not square: ")
    assert "saved slices-last?" in turned["reason"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_exams"] == len(cases) - 2 and metrics["excluded_exams"] == 2
    with (out / "predictions.csv").open() as handle:
        assert [row["case"] for row in csv.DictReader(handle)] == [c for c in cases if c not in cases[1:3]]
