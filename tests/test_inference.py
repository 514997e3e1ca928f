"""Gating, TTA, evaluation metrics, bootstrap CIs, predict on mixed folders, Grad-CAM."""

import csv
import json
import math
import shutil
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch
from rich.console import Console
from sklearn.metrics import confusion_matrix, roc_auc_score

from mtl_meniscus.commands.evaluate import cascade_view, run_evaluation
from mtl_meniscus.commands.predict import CSV_COLUMNS, gate, run_predict
from mtl_meniscus.config import AugmentConfig, ModelConfig, TTAConfig, load_config
from mtl_meniscus.engine.inference import predict_probs
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import load_trained
from mtl_meniscus.evaluation.metrics import binary_counts, bootstrap_cis, youden_threshold
from mtl_meniscus.labels import DEFAULT_TASKS
from mtl_meniscus.networks.cam import grad_cam, overlay, peak_in_mask
from mtl_meniscus.networks.models import build_model
from mtl_meniscus.phantom.slices import write_phantom

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
FP32 = resolve_runtime("fp32")


def _quiet():
    return Console(quiet=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("infer")
    write_phantom(folder / "data", n=80, seed=21, size=64)
    config = load_config(TINY, {"data.path": str(folder / "data"), "train.max_epochs": 1})
    train_run(config, folder / "run", console=_quiet())
    return folder


# ---- gating and TTA ---------------------------------------------------------------------------
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


class _MeanModel(torch.nn.Module):
    """Logit = mean of channel 0 over the left half: sensitive to shifts, easy to reason about."""

    def forward(self, x):
        value = x[:, 0, :, : x.shape[3] // 2].mean(dim=(1, 2))
        return {"fissure": value, "orientation": -value, "position": 2 * value}


def test_tta_averages_the_original_and_n_copies_deterministically():
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(32, 32)).astype(np.float32) + np.linspace(0, 5, 32) for _ in range(3)]
    model = _MeanModel()
    plain = predict_probs(model, images, "none", FP32)
    tta = TTAConfig(copies=4, augment=AugmentConfig(rotation_deg=10, translate_frac=0.1))
    a = predict_probs(model, images, "none", FP32, batch_size=2, tta=tta, seed=1)
    b = predict_probs(model, images, "none", FP32, batch_size=5, tta=tta, seed=1)
    c = predict_probs(model, images, "none", FP32, tta=tta, seed=2)
    np.testing.assert_allclose(a["fissure"], b["fissure"], rtol=1e-6)  # batch size does not matter
    assert not np.allclose(a["fissure"], c["fissure"])  # the seed does
    assert not np.allclose(a["fissure"], plain["fissure"])
    # by hand: the mean over the original and the 4 copies, each copy seeded (seed, image, copy)
    from mtl_meniscus.data.augment import augment_image
    from mtl_meniscus.data.preprocess import make_input

    def prob(image):
        return torch.sigmoid(model(torch.from_numpy(make_input(image, "none"))[None])["fissure"]).item()

    for i, image in enumerate(images):
        copies = [
            augment_image(
                image,
                tta.augment,
                np.random.default_rng(np.random.SeedSequence([1, i, k]).generate_state(1)[0]),
            )
            for k in range(4)
        ]
        expected = np.mean([prob(image)] + [prob(copy) for copy in copies])
        assert math.isclose(a["fissure"][i], expected, rel_tol=1e-5)


# ---- metrics ----------------------------------------------------------------------------------
def test_threshold_metrics_against_sklearn():
    rng = np.random.default_rng(3)
    y = (rng.random(200) < 0.3).astype(int)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    counts = binary_counts(y, p, 0.5)
    tn, fp, fn, tp = confusion_matrix(y, p >= 0.5).ravel()
    assert (counts["tp"], counts["fp"], counts["tn"], counts["fn"]) == (tp, fp, tn, fn)
    assert math.isclose(counts["sensitivity"], tp / (tp + fn)) and math.isclose(
        counts["specificity"], tn / (tn + fp)
    )
    t = youden_threshold(y, p)
    best = max(
        binary_counts(y, p, c)["sensitivity"] + binary_counts(y, p, c)["specificity"] for c in np.unique(p)
    )
    at_t = binary_counts(y, p, t)
    assert math.isclose(at_t["sensitivity"] + at_t["specificity"], best)


def _synthetic(n, seed):
    rng = np.random.default_rng(seed)
    fissure = (rng.random(n) < 0.3).astype(float)
    orientation = np.where(fissure == 1, (rng.random(n) < 0.6).astype(float), np.nan)
    position = np.where(fissure == 1, (rng.random(n) < 0.3).astype(float), np.nan)
    targets = np.stack([fissure, orientation, position], axis=1)
    noise = lambda: rng.normal(0, 1.0, n)  # noqa: E731
    probs = {
        "fissure": 1 / (1 + np.exp(-(2 * fissure - 1 + noise()))),
        "orientation": 1 / (1 + np.exp(-(2 * np.nan_to_num(orientation) - 1 + noise()))),
        "position": 1 / (1 + np.exp(-(2 * np.nan_to_num(position) - 1 + noise()))),
    }
    return targets, probs


def test_bootstrap_ci_covers_the_estimate_and_narrows_with_more_data():
    targets, probs = _synthetic(300, 0)
    cis = bootstrap_cis(targets, probs, n_resamples=300, seed=0)
    tears = targets[:, 0] == 1
    point = {
        "fissure": roc_auc_score(targets[:, 0], probs["fissure"]),
        "orientation": roc_auc_score(targets[tears, 1], probs["orientation"][tears]),
    }
    for task, value in point.items():
        low, high = cis[task]
        assert low < value < high
    big_targets, big_probs = _synthetic(3000, 0)
    big = bootstrap_cis(big_targets, big_probs, n_resamples=300, seed=0)
    for task in ("fissure", "orientation", "position", "score"):
        assert big[task][1] - big[task][0] < 0.6 * (cis[task][1] - cis[task][0])
    assert bootstrap_cis(targets, probs, n_resamples=50, seed=4) == bootstrap_cis(
        targets, probs, n_resamples=50, seed=4
    )


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
        "position_correct": 2,
        "all_correct": 1,
    }


# ---- evaluate and predict on a trained tiny run --------------------------------------------------
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
    assert (tmp_path / "eval" / "roc.png").is_file()
    assert len(list((tmp_path / "cams").glob("*_fissure.png"))) == 78
    assert metrics["cam_peak_in_tear"]["n"] <= saved["tasks"]["fissure"]["tp"]


def test_evaluate_youden_saves_the_threshold_used_by_predict(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    metrics = run_evaluation(run, youden=True, n_bootstrap=0, out_dir=tmp_path / "e", console=_quiet())
    saved = json.loads((run / "threshold.json").read_text())["fissure_threshold"]
    assert metrics["fissure_threshold"] == saved
    assert load_trained(run, FP32).saved_threshold.value == saved


def test_predict_on_a_folder_mixing_good_and_bad_files(tiny_run, tmp_path, pydicom_files):
    inputs = tmp_path / "inputs"
    (inputs / "nested").mkdir(parents=True)
    good = sorted((tiny_run / "data" / "images").glob("*.png"))[:3]
    for path in good:
        shutil.copy(path, inputs / path.name)
    cv2.imwrite(str(inputs / "nested" / "big.png"), np.full((96, 80), 500, np.uint16))
    shutil.copy(pydicom_files / "MR_small.dcm", inputs / "nested" / "mr.dcm")
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


# ---- Grad-CAM ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["shared", "separate"])
def test_grad_cam_shape_range_and_locality(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, widths=(4, 8, 8, 8), dense=(8, 4)))
    x = torch.randn(2, 2, 64, 64)
    for task in ("fissure", "orientation", "position"):
        cam = grad_cam(model, x, task)
        assert cam.shape == (2, 64, 64) and cam.dtype == np.float32
        assert cam.min() >= 0 and cam.max() <= 1
    picture = overlay(np.random.default_rng(0).normal(size=(64, 64)), cam[0])
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8


def test_peak_in_mask():
    cam = np.zeros((32, 32), np.float32)
    cam[10, 20] = 1
    mask = np.zeros((32, 32), bool)
    mask[10, 25] = True
    assert peak_in_mask(cam, mask, dilation_px=5) and not peak_in_mask(cam, mask, dilation_px=2)
