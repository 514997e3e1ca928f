"""The task table (labels.py): tasks are data. A fourth task declared in the config trains, evaluates and predicts through
every layer (data validation, loss, both modes, metrics, cascade view, predict's columns) without
a change to any module."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from sklearn.metrics import roc_auc_score

from mtl_meniscus.commands.evaluate import run_evaluation
from mtl_meniscus.commands.predict import run_predict
from mtl_meniscus.config import load_config
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.errors import ConfigError, DataError
from mtl_meniscus.phantom.slices import write_phantom

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
DISPLACED = {"values": {"displaced": 1, "stable": 0}, "gated_by": "fissure"}


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The phantom with a 'displaced' column: a label on every tear (drawn at random), empty otherwise."""
    folder = tmp_path_factory.mktemp("fourth_task")
    write_phantom(folder, n=200, seed=6, size=64)
    rng = np.random.default_rng(0)
    rows = _read(folder / "labels.csv")
    for row in rows:
        row["displaced"] = rng.choice(["displaced", "stable"]) if row["fissure"] == "1" else ""
    _write(folder / "labels.csv", rows)
    return folder


def _config(data: Path, **overrides):
    settings = {
        "data.path": str(data),
        "data.extra_tasks": {"displaced": DISPLACED},
        "data.split_fractions": [0.5, 0.2, 0.3],  # a test split with both classes of every task
        "train.max_epochs": 2,
    }
    return load_config(TINY, settings | overrides)


@pytest.fixture(scope="module")
def shared_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("shared") / "run"
    train_run(_config(data), run, console=Console(quiet=True))
    return run


def test_the_fourth_task_trains_in_the_shared_model(shared_run, data):
    config = load_config(shared_run / "config.yaml")
    assert config.model.tasks == ("fissure", "orientation", "position", "displaced")
    metrics = json.loads((shared_run / "metrics.json").read_text())
    assert set(metrics["test"]["auc"]) == {"fissure", "orientation", "position", "displaced"}
    aucs = metrics["test"]["auc"]
    # weight 0: reported, not in the challenge score
    expected = 0.4 * aucs["fissure"] + 0.3 * aucs["orientation"] + 0.3 * aucs["position"]
    assert metrics["test"]["score"] == pytest.approx(expected)
    history = _read(shared_run / "history.csv")
    assert "val_auc_displaced" in history[0] and float(history[0]["weight_displaced"]) == 1.0
    splits = _read(shared_run / "splits.csv")
    labels = {row["image"]: row["displaced"] for row in _read(data / "labels.csv")}
    assert all(row["displaced"] == labels[row["image"]] for row in splits)


def test_evaluate_and_predict_report_it_gated_by_fissure(shared_run, tmp_path):
    metrics = run_evaluation(
        shared_run, n_bootstrap=20, console=Console(quiet=True), out_dir=tmp_path / "eval"
    )
    rows = _read(tmp_path / "eval" / "predictions.csv")
    # scored on the test tears only (its gate), against scikit-learn on the written probabilities
    tears = [r for r in rows if r["fissure"] == "1" and r["displaced"] != ""]
    assert metrics["tasks"]["displaced"]["n"] == len(tears)
    truth = roc_auc_score([int(r["displaced"]) for r in tears], [float(r["p_displaced_tta"]) for r in tears])
    assert metrics["tasks"]["displaced"]["auc"] == pytest.approx(truth)
    assert "displaced_correct" in metrics["cascade"]
    for row in rows:  # the cascade's gating: no displacement call without a predicted tear
        assert (row["pred_displaced"] != "") == (row["pred_fissure"] == "1")

    images = sorted((Path(load_config(shared_run / "config.yaml").data.path) / "images").glob("*.png"))[:6]
    # threshold 0: every image is called a tear, so every row reports displacement; 1: none does
    for threshold, tear in ((0.0, "1"), (1.0, "0")):
        out = tmp_path / f"predict-{threshold}.csv"
        run_predict(shared_run, images, out, threshold=threshold, console=Console(quiet=True))
        predicted = _read(out)
        assert list(predicted[0])[-4:] == ["p_displaced", "displaced", "error", "note"]
        assert {row["fissure"] for row in predicted} == {tear}
        for row in predicted:
            assert row["displaced"] in (("displaced", "stable") if tear == "1" else ("",))
            assert (row["p_displaced"] != "") == (tear == "1")


def test_separate_mode_trains_a_network_for_it_on_the_tears(data, tmp_path):
    run = tmp_path / "separate"
    train_run(
        _config(data, **{"model.name": "separate", "train.max_epochs": 1}), run, console=Console(quiet=True)
    )
    assert (run / "members" / "displaced" / "best.pt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["members"]) == {"fissure", "orientation", "position", "displaced"}
    assert "displaced" in metrics["test"]["auc"]


def test_its_labels_are_checked_like_the_built_in_ones(data, tmp_path):
    rows = _read(data / "labels.csv")
    tear = next(k for k, r in enumerate(rows) if r["fissure"] == "1")
    healthy = next(k for k, r in enumerate(rows) if r["fissure"] == "0")
    rows[tear]["displaced"], rows[healthy]["displaced"] = "maybe", "stable"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "images").symlink_to(data / "images")
    (bad / "masks").symlink_to(data / "masks")
    _write(bad / "labels.csv", rows)
    from mtl_meniscus.data.load import prepare_data

    with pytest.raises(DataError) as err:
        prepare_data(bad, _config(bad).data)
    message = str(err.value)
    assert (
        f"row {tear + 2}, column 'displaced': bad value 'maybe' (a tear needs one of: displaced, stable)"
        in message
    )
    assert (
        f"row {healthy + 2}, column 'displaced': bad value 'stable' (must be empty when fissure is 0)"
        in message
    )
    without = [{k: v for k, v in r.items() if k != "displaced"} for r in rows]
    _write(bad / "labels.csv", without)
    with pytest.raises(DataError, match="missing column.*displaced"):
        prepare_data(bad, _config(bad).data)


@pytest.mark.parametrize(
    "task, message",
    [
        ({"fissure": DISPLACED}, "data.extra_tasks"),  # a built-in name
        ({"split": DISPLACED}, "not one of fissure, .*split"),  # would read the split column as labels
        ({"patient_id": DISPLACED}, "the labels.csv column of its name"),
        ({"displaced": {"values": {"yes_": 2, "no_": 0}}}, "data.extra_tasks.displaced.values"),
        ({"displaced": {"values": {"a": 1, "b": 0}, "gated_by": "nothing"}}, "gated_by"),
    ],
)
def test_bad_task_declarations_name_the_key(data, task, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, {"data.path": str(data), "data.extra_tasks": task})


def test_yes_no_values_written_in_yaml_or_capitalised_read_as_written(data, tmp_path):
    """YAML 1.1 made `{yes: 1, no: 0}` the booleans true/false, so every row saying yes was
    refused ('a tear needs one of: true, false'); a value written 'Yes' was refused too, as
    labels.csv's values are read in lower case."""
    from mtl_meniscus.data.load import prepare_data

    folder = tmp_path / "yesno"
    folder.mkdir()
    for sub in ("images", "masks"):
        (folder / sub).symlink_to(data / sub)
    rows = _read(data / "labels.csv")
    for row in rows:  # displaced -> Yes, stable -> no; a second, ungated task: yes everywhere
        row["displaced"] = {"displaced": "Yes", "stable": "no"}.get(row["displaced"], "")
        row["fragment"] = "yes"
    _write(folder / "labels.csv", rows)
    config = tmp_path / "yesno.yaml"
    config.write_text(
        "data:\n  extra_tasks:\n    displaced:\n      values: {yes: 1, no: 0}\n"
        "    fragment:\n      values: {'Yes': 1, 'No': 0}\n      gated_by: null\n"
    )
    loaded = load_config(config, {"data.path": str(folder), "data.image_size": 64})
    assert dict(loaded.data.extra_tasks["displaced"].values) == {"yes": 1, "no": 0}
    prepared = prepare_data(folder, loaded.data)
    by_image = {row["image"]: row["displaced"] for row in rows}
    expected = [{"Yes": 1.0, "no": 0.0}.get(by_image[r.image], np.nan) for r in prepared.records]
    np.testing.assert_array_equal(prepared.targets[:, prepared.tasks.index("displaced")], expected)
    assert (prepared.targets[:, prepared.tasks.index("fragment")] == 1).all()
    with pytest.raises(ConfigError, match="case is ignored, each once"):
        load_config(TINY, {"data.extra_tasks": {"displaced": {"values": {"Yes": 1, "yes": 0, "no": 0}}}})
