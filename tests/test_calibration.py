"""Calibration: ECE and Brier against hand computations, temperature scaling against scikit-learn's
logistic regression, and a calibrated run applied identically by evaluate, predict and ONNX."""

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss
from typer.testing import CliRunner

from mtl_meniscus.data.preprocess import make_input
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import load_trained
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.evaluation.calibration import (
    brier_score,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    scaled_probability,
)
from mtl_meniscus.io.imageio import read_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import app  # noqa: E402

runner = CliRunner()
Y = np.array([0, 0, 1, 1, 1])
P = np.array([0.1, 0.3, 0.35, 0.8, 0.95])


def test_brier_and_ece_against_hand_computation():
    # Brier: (0.1^2 + 0.3^2 + 0.65^2 + 0.2^2 + 0.05^2) / 5 = 0.565 / 5
    assert brier_score(Y, P) == pytest.approx(0.113)
    assert brier_score(Y, P) == pytest.approx(brier_score_loss(Y, P))
    # Two bins: [0, 0.5) holds 0.1, 0.3, 0.35 (mean 0.25, 1 of 3 positive); [0.5, 1] holds 0.8,
    # 0.95 (mean 0.875, 2 of 2). ECE = 3/5 |1/3 - 0.25| + 2/5 |1 - 0.875| = 0.05 + 0.05.
    assert expected_calibration_error(Y, P, n_bins=2) == pytest.approx(0.1)
    bins = reliability_bins(Y, P, n_bins=2)
    assert [b["n"] for b in bins] == [3, 2]
    assert bins[0]["positive_rate"] == pytest.approx(1 / 3) and bins[1]["mean_probability"] == pytest.approx(
        0.875
    )
    # Ten bins: a probability of exactly 1 is in the last bin, empty bins have no rate.
    ten = reliability_bins(np.array([1, 0]), np.array([1.0, 0.0]))
    assert ten[9]["n"] == 1 and ten[0]["n"] == 1 and ten[5]["positive_rate"] is None
    assert expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0


def test_temperature_matches_a_logistic_regression_without_intercept():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(float)
    overconfident = 4.0 * true_logit  # a network four times too sure of itself
    t = fit_temperature(y, overconfident)
    fitted = LogisticRegression(fit_intercept=False, C=1e12, tol=1e-10, max_iter=1000)
    fitted.fit(overconfident[:, None], y)
    assert t == pytest.approx(1 / fitted.coef_[0, 0], rel=1e-4)
    assert t == pytest.approx(4.0, rel=0.1)
    before = negative_log_likelihood(y, scaled_probability(overconfident[None], 1.0))
    after = negative_log_likelihood(y, scaled_probability(overconfident[None], t))
    assert after < before - 0.1
    assert expected_calibration_error(y, scaled_probability(overconfident[None], t)) < 0.03
    # a network k times as sure of itself gets k times the temperature
    assert fit_temperature(y, 2.5 * overconfident) == pytest.approx(2.5 * t, rel=1e-4)


def test_with_tta_the_probability_is_the_mean_over_copies_of_the_scaled_sigmoid():
    logits = np.array([[2.0, -1.0], [4.0, 0.0]])  # (copies, images)
    expected = [
        (1 / (1 + math.exp(-1.0)) + 1 / (1 + math.exp(-2.0))) / 2,
        (1 / (1 + math.exp(0.5)) + 0.5) / 2,
    ]
    np.testing.assert_allclose(scaled_probability(logits, 2.0), expected)
    with pytest.raises(ValueError, match="both classes"):
        fit_temperature(np.ones(3), np.zeros(3))


def _overconfident_copy(run: Path, folder: Path, factor: float = 8.0) -> Path:
    """A copy of the run whose every task logit is `factor` times the original (the last layer of
    each head scaled): the same ranking, far too sure of itself."""
    copy = folder / "run"
    shutil.copytree(run, copy)
    payload = torch.load(copy / "best.pt", map_location="cpu", weights_only=True)
    state = payload["state_dict"]
    for task in payload["tasks"]:
        last = max(int(key.split(".")[2]) for key in state if key.startswith(f"heads.{task}."))
        for kind in ("weight", "bias"):
            state[f"heads.{task}.{last}.{kind}"] *= factor
    torch.save(payload, copy / "best.pt")
    return copy


def test_a_calibrated_run_gives_the_same_probabilities_in_evaluate_predict_and_onnx(tiny_run, tmp_path):
    run = _overconfident_copy(tiny_run / "run", tmp_path)
    fp32 = ["--precision", "fp32"]
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(run),
            "--calibrate",
            "--split",
            "all",
            "--tta",
            "0",
            "--bootstrap",
            "0",
            "--wandb",
            "disabled",
        ]
        + fp32,
    )
    assert result.exit_code == 0, result.output
    record = json.loads((run / "calibration.json").read_text())
    for fit in record["fits"].values():  # (this 1-epoch network learned little: T goes to the range's end)
        assert fit["nll_after"] < fit["nll_before"]  # the over-confident network is softened
    metrics = json.loads((run / "eval-all" / "metrics.json").read_text())
    for task in record["fits"]:
        m = metrics["tasks"][task]
        assert m["calibration"]["ece"] < m["uncalibrated"]["ece"]
    assert "ECE before -> after" in result.output

    with (run / "eval-all" / "predictions.csv").open() as handle:
        evaluated = {Path(row["image"]).name: row for row in csv.DictReader(handle)}
    images = sorted((tiny_run / "data" / "images").glob("*.png"))[:6]
    images = [path for path in images if path.name in evaluated]
    out = tmp_path / "p.csv"
    result = runner.invoke(
        app, ["predict", str(run), *map(str, images), "--out", str(out), "--tta", "0"] + fp32
    )
    assert result.exit_code == 0, result.output
    assert "calibrated by temperature scaling" in result.output
    with out.open() as handle:
        predicted = {Path(row["image"]).name: row for row in csv.DictReader(handle)}
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.stack([make_input(read_image(path), "sobel") for path in images])
    names = [output.name for output in session.get_outputs()]
    onnx_probs = dict(zip(names, session.run(names, {"x": x})))

    trained = load_trained(run, resolve_runtime("fp32"))
    with torch.no_grad():
        logits = trained.model(torch.from_numpy(x))
    for task, column in (
        ("fissure", "p_fissure"),
        ("orientation", "p_horizontal"),
        ("position", "p_anterior"),
    ):
        # independent truth: sigmoid(logit / T) from the network's own logits and the saved T
        # (a task with one class in the validation split keeps T = 1)
        truth = torch.sigmoid(logits[task] / record["temperatures"].get(task, 1.0)).numpy()
        for k, path in enumerate(images):
            assert float(evaluated[path.name][column]) == pytest.approx(truth[k], abs=1e-5)
            assert float(predicted[path.name][column]) == pytest.approx(truth[k], abs=1e-5)
            assert float(onnx_probs[column][k]) == pytest.approx(truth[k], abs=1e-5)


def test_a_stale_or_broken_calibration_is_refused_with_the_file_named(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    fp32 = resolve_runtime("fp32")
    (run / "calibration.json").write_text('{"temperatures": {"fissure": -1}}')
    with pytest.raises(MeniscusError, match="calibration.json: malformed"):
        load_trained(run, fp32)
    record = {"temperatures": {"fissure": 2.0}, "checkpoint": "best.pt", "checkpoint_sha256": "0" * 64}
    (run / "calibration.json").write_text(json.dumps(record))
    with pytest.raises(MeniscusError, match="fitted on another best.pt"):
        load_trained(run, fp32)
    assert load_trained(run / "last.pt", fp32).calibration is None  # another checkpoint: uncalibrated


def test_a_stale_calibration_can_be_fitted_again_and_the_threshold_belongs_to_its_checkpoint(
    tiny_run, tmp_path
):
    """After the run's best.pt changed, `evaluate --calibrate` (the advised fix) fits anew; a threshold
    chosen for best.pt is not applied to last.pt, and is refused once best.pt has changed."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    fp32 = resolve_runtime("fp32")
    args = [
        "evaluate",
        str(run),
        "--split",
        "val",
        "--bootstrap",
        "0",
        "--wandb",
        "disabled",
        "--precision",
        "fp32",
    ]
    assert runner.invoke(app, [*args, "--calibrate", "--youden"]).exit_code == 0
    assert load_trained(run, fp32).saved_threshold.source.startswith("Youden's J")
    on_last = load_trained(run / "last.pt", fp32).saved_threshold
    assert on_last.value == 0.5 and "chosen for best.pt, not last.pt" in on_last.source

    payload = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    first = next(key for key in payload["state_dict"] if key.endswith("weight"))
    payload["state_dict"][first] *= 1.01  # the run "trained further"
    torch.save(payload, run / "best.pt")
    with pytest.raises(MeniscusError, match="calibration.json was fitted on another best.pt"):
        load_trained(run, fp32)
    result = runner.invoke(app, [*args, "--calibrate"])  # fits anew, and chooses the threshold anew
    assert result.exit_code == 0, result.output
    assert "threshold.json chosen again" in result.output
    assert load_trained(run, fp32).saved_threshold.source.startswith("Youden's J")
    (run / "calibration.json").unlink()
    with pytest.raises(
        MeniscusError, match="threshold.json was chosen on probabilities with fissure temperature"
    ):
        _ = load_trained(run, fp32).saved_threshold


def test_a_fit_names_the_checkpoint_it_loaded_even_when_training_replaces_best_pt_meanwhile(
    tiny_run, tmp_path
):
    """train replaces best.pt (an atomic rename) whenever an epoch scores better; evaluate
    --calibrate --youden running meanwhile fitted the weights it had loaded but named the new file,
    hashed afterwards, and predict then applied those temperatures to other weights. The hash is
    of the bytes loaded."""
    import hashlib

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    loaded = hashlib.sha256((run / "best.pt").read_bytes()).hexdigest()
    trained = load_trained(run, resolve_runtime("fp32"))
    payload = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    first = next(key for key in payload["state_dict"] if key.endswith("weight"))
    payload["state_dict"][first] *= 1.01  # a better epoch, written beside and renamed over best.pt
    torch.save(payload, run / "best.pt.new")
    (run / "best.pt.new").replace(run / "best.pt")
    assert trained.checkpoint_sha256 == loaded != hashlib.sha256((run / "best.pt").read_bytes()).hexdigest()
