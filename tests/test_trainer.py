"""One network's epoch loop (engine/trainer.py): a training that diverges, in its loss or in its
validation outputs, stops with a message and keeps the last finite state in last.pt. Splits that
leave a network a task of one class, or a validation that cannot pick an epoch or tell chance,
are warned about before training and under the test metrics, and recorded in metrics.json."""

import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console
from support import TINY, _labels, _png, _quiet

from mtl_meniscus.config import load_config
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.engine.members import plan_members
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.engine.trainer import has_validation_score, split_warnings
from mtl_meniscus.errors import MeniscusError

# labels.csv rows by what they are: (fissure, orientation, position)
NONE = ("0", "", "")
HA, HP = ("1", "horizontal", "anterior"), ("1", "horizontal", "posterior")
VA, VP = ("1", "vertical", "anterior"), ("1", "vertical", "posterior")


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


def _placed(folder, splits: dict[str, list[tuple[str, str, str]]]):
    """A data folder of one noise image per row, its labels.csv's split column placing each row."""
    rows = []
    for split, labels in splits.items():
        for row_labels in labels:
            k = len(rows)
            _png(folder / "img" / f"{k}.png", value=k)
            rows.append((f"img/{k}.png", *row_labels, split))
    return _labels(folder, rows, header=("image", "fissure", "orientation", "position", "split"))


TRAIN = [HA, HP, VA, VP, *[NONE] * 6]  # both classes of every task
# enough validation rows for a bar on every task (3 vs 9 tears: 26/27, 12 vs 12 images), in both modes
VAL = [*[HA] * 3, *[VP] * 9, *[NONE] * 12]
TEST = [HA, VP, NONE, NONE, NONE]


def _warnings(folder, mode="shared") -> dict[str, list[str]]:
    """{network: its split_warnings} for the data in `folder`, without training."""
    config = load_config(TINY, {"data.path": str(folder), "model.name": mode})
    data = prepare_data(folder, config.data)
    return {m.name: split_warnings(m, data) for m in plan_members(config, data, folder / "run")}


def _train(folder, tmp_path):
    """One tiny epoch of one step on `folder`: (metrics, console text, metrics.json)."""
    config = load_config(TINY, {"data.path": str(folder), "train.max_epochs": 1, "train.steps_per_epoch": 1})
    console = Console(record=True, width=500)
    metrics = train_run(config, tmp_path / "run", console=console)
    return metrics, console.export_text(), json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_splits_with_both_classes_and_enough_validation_say_nothing(tmp_path):
    folder = _placed(tmp_path / "d", {"train": TRAIN, "val": VAL, "test": TEST})
    assert _warnings(folder) == {"shared": []}
    assert _warnings(folder, "separate") == {"fissure": [], "orientation": [], "position": []}


def test_an_undefined_test_auc_is_printed_undefined_not_nan(tmp_path):
    # both tears of the test split horizontal: orientation has no AUC there
    folder = _placed(tmp_path / "d", {"train": TRAIN, "val": VAL, "test": [HA, HP, NONE, NONE]})
    metrics, text, _ = _train(folder, tmp_path)
    assert math.isnan(metrics["test"]["auc"]["orientation"])
    test_line = next(line for line in text.splitlines() if line.startswith("test: AUC"))
    assert "orientation undefined  position " in test_line and "nan" not in test_line, test_line


def test_a_val_split_without_tears_says_the_run_cannot_pick_an_epoch_or_tell(tmp_path):
    # every tear in train or test: no validation AUC, hence no score, no best epoch, learned unknown
    folder = _placed(tmp_path / "d", {"train": TRAIN, "val": [NONE] * 4, "test": TEST})
    metrics, text, saved = _train(folder, tmp_path)
    message = (
        "[shared] no validation AUC can be computed (fissure: no tear among the 4 images of the val split; "
        "orientation: no tear in the val split to score it on; position: no tear in the val split to score "
        "it on): the network has no validation score, so the run cannot choose a best epoch (it keeps the "
        "last one), stop early, or tell whether the network learned (learned is unknown); put both classes "
        "of each task in the val split"
    )
    assert text.index(f"warning: {message}") < text.index("[shared] epoch  1")  # said before training
    assert f"WARNING: {message}" in text  # and again under the test metrics
    assert "AUC undefined  score undefined  lr" in text  # the epoch line
    assert saved["warnings"] == [message] == metrics["warnings"]
    assert saved["learned"] is None and saved["members"]["shared"]["best_epoch"] == 0
    # separate mode: the fissure network has no validation score (the others have no validation
    # image, which check_members warns about)
    assert _warnings(folder, "separate") == {
        "fissure": [
            "[fissure] no validation AUC can be computed (fissure: no tear among the 4 images of the val "
            "split): the network has no validation score, so the run cannot choose a best epoch (it keeps "
            "the last one), stop early, or tell whether the network learned (learned is unknown); put both "
            "classes of each task in the val split"
        ],
        "orientation": [],
        "position": [],
    }


def _scored(folder, mode="shared") -> dict[str, bool]:
    """{network: has_validation_score} for the data in `folder`."""
    config = load_config(TINY, {"data.path": str(folder), "model.name": mode})
    data = prepare_data(folder, config.data)
    return {m.name: has_validation_score(m, data) for m in plan_members(config, data, folder / "run")}


def test_tune_refuses_a_val_split_that_scores_no_network_before_a_trial_trains(tmp_path):
    """tune compares trials by their validation score: a val split without a tear gives none, and
    the first trial is refused after reading the data, before any epoch (it used to train first)."""
    optuna = pytest.importorskip("optuna", reason="tune needs optuna (the [tune] extra)")
    from mtl_meniscus.commands.tune import run_tune

    folder = _placed(tmp_path / "d", {"train": TRAIN, "val": [NONE] * 4, "test": TEST})
    assert _scored(folder) == {"shared": False}
    assert _scored(folder, "separate") == {"fissure": False, "orientation": False, "position": False}
    with pytest.raises(MeniscusError) as refused:
        run_tune(tmp_path / "t", TINY, data_dir=folder, n_trials=2)
    trial = tmp_path / "t" / "trials" / "trial-0000"
    assert str(refused.value).startswith(
        f"{trial}: tune compares trials by their validation score, and this data's val split gives none: "
        "[shared] no validation AUC can be computed (fissure: no tear among the 4 images of the val split;"
    ), refused.value
    assert (trial / "splits.csv").is_file() and not (trial / "last.pt").exists()  # read, not trained
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 't' / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL"]  # the search stopped at its first trial
    # one task of one class in validation: the shared network still has a score, that task's network not
    val = [*[HP] * 3, *[VP] * 9, *[NONE] * 12]
    folder = _placed(tmp_path / "one-class", {"train": TRAIN, "val": val, "test": TEST})
    assert _scored(folder) == {"shared": True}
    assert _scored(folder, "separate") == {"fissure": True, "orientation": True, "position": False}


def test_a_task_with_one_class_in_validation_is_named_with_why(tmp_path):
    # tears in val, every one posterior: position's AUC is undefined there, the others count
    val = [*[HP] * 3, *[VP] * 9, *[NONE] * 12]
    folder = _placed(tmp_path / "d", {"train": TRAIN, "val": val, "test": TEST})
    assert _warnings(folder) == {
        "shared": [
            "[shared] validation AUC undefined (position: no anterior among the 12 tears of the val split): "
            "it counts neither in the validation score that picks the best epoch nor in whether the network "
            "left chance"
        ]
    }
    position = _warnings(folder, "separate")["position"]  # that network has nothing else to score
    assert position == [
        "[position] no validation AUC can be computed (position: no anterior among the 12 tears of the val "
        "split): the network has no validation score, so the run cannot choose a best epoch (it keeps the "
        "last one), stop early, or tell whether the network learned (learned is unknown); put both classes "
        "of each task in the val split"
    ]


def test_a_task_with_one_class_in_training_is_warned_before_training(tmp_path):
    train = [HP, HP, VP, VP, *[NONE] * 6]  # no anterior tear: position is trained on one class
    folder = _placed(tmp_path / "d", {"train": train, "val": VAL, "test": TEST})
    metrics, text, saved = _train(folder, tmp_path)
    message = (
        "[shared] position: no anterior among the 4 tears of the train split (0 anterior, 4 posterior): "
        "the network trains this task on one class and cannot learn it; its test AUC, which enters the "
        "challenge score, measures no learning"
    )
    assert text.index(f"warning: {message}") < text.index("[shared] epoch  1")
    assert f"WARNING: {message}" in text  # under the test metrics it qualifies
    assert saved["warnings"] == metrics["warnings"]
    # orientation has both classes: no word of it (one noise epoch did not learn: that warning follows)
    assert [w for w in saved["warnings"] if "did not learn" not in w] == [message]
    # in separate mode the position network is the one concerned
    assert _warnings(folder, "separate") == {
        "fissure": [],
        "orientation": [],
        "position": [message.replace("[shared]", "[position]")],
    }


def test_too_few_validation_images_to_tell_chance_say_learned_is_unknown(tmp_path):
    # 20 images, val 5 with 2 tears: no AUC on these rows is rare enough by chance to be a bar
    folder = _placed(tmp_path / "d", {"train": TRAIN, "val": [HA, VP, NONE, NONE, NONE], "test": TEST})
    metrics, text, saved = _train(folder, tmp_path)
    message = (
        "[shared] too few validation images (fissure: 2 tears vs 3 others; orientation: 1 horizontal vs 1 "
        "vertical; position: 1 anterior vs 1 posterior) to test whether fissure, orientation or position left "
        "chance: even an AUC of 1 is reached by random scores more often than 1% of the time; learned is unknown"
    )
    assert text.index(f"warning: {message}") < text.index("[shared] epoch  1")
    assert saved["warnings"] == [message] == metrics["warnings"]
    assert saved["learned"] is None and saved["members"]["shared"]["chance_bars"] == {}
    assert _warnings(folder, "separate")["fissure"] == [
        "[fissure] too few validation images (2 tears vs 3 others) to test whether fissure left chance: even "
        "an AUC of 1 is reached by random scores more often than 1% of the time; learned is unknown"
    ]
