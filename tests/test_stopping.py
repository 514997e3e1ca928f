"""One rule for 'improved': early stopping, the learning-rate schedule, the restored weights and
every report agree on the best epoch."""

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from mtl_meniscus.config import load_config
from mtl_meniscus.engine import trainer as trainer_module
from mtl_meniscus.engine.checkpoint import load_checkpoint
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.engine.stopping import EarlyStopping
from mtl_meniscus.phantom.slices import write_phantom

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_improvement_must_beat_the_best_by_more_than_min_delta():
    stopping = EarlyStopping(patience=3, lr_patience=2)
    assert [stopping.update(epoch, s) for epoch, s in enumerate([0.8, 0.80005, 0.9, float("nan")], 1)] == [
        True,
        False,
        True,
        False,
    ]
    assert (stopping.best_epoch, stopping.best_score, stopping.bad_epochs) == (3, 0.9, 1)


def test_learning_rate_cut_and_stop_follow_the_counts():
    stopping = EarlyStopping(patience=4, lr_patience=2)
    stopping.update(1, 0.7)
    due = []
    for epoch in range(2, 6):
        stopping.update(epoch, 0.6)
        due.append(stopping.lr_cut_due)
        if stopping.lr_cut_due:
            stopping.lr_was_cut()
    assert due == [False, True, False, True]  # after 2 epochs without improvement, counted from each cut
    assert stopping.should_stop and stopping.best_epoch == 1


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stop")
    write_phantom(folder, n=60, seed=5, size=64)
    return folder


def _scripted_validation(monkeypatch, scores):
    """Make every validation return the next score of `scores` (the rule under test, not learning)."""
    remaining = list(scores)

    def validate(*args, **kwargs):
        score = remaining.pop(0)
        return {"finite": True, "auc": {"fissure": score}, "score": score, "loss": 1.0}

    monkeypatch.setattr(trainer_module, "validate", validate)


def test_reported_best_epoch_is_the_restored_one(phantom, tmp_path, monkeypatch):
    # Epoch 2 is higher than epoch 1 by less than the improvement margin: the weights of epoch 1
    # are restored, so every report must say epoch 1 (the plain maximum of the history says 2).
    _scripted_validation(monkeypatch, [0.8, 0.80005, 0.7])
    config = load_config(TINY, {"data.path": str(phantom), "train.max_epochs": 3})
    metrics = train_run(config, tmp_path / "run", console=Console(quiet=True))
    assert metrics["members"]["shared"]["best_epoch"] == 1
    assert metrics["members"]["shared"]["val_score"] == 0.8
    assert load_checkpoint(tmp_path / "run" / "best.pt")["metrics"]["members"]["shared"]["best_epoch"] == 1
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0:2] for line in history[1:]] == [
        ["shared", "1"],
        ["shared", "2"],
        ["shared", "3"],
    ]


def test_learning_rate_schedule_uses_the_same_rule(phantom, tmp_path, monkeypatch):
    # A gain of 9e-5 over the best is not an improvement (margin 1e-4): the learning rate is cut
    # after lr_patience epochs without one. (torch's ReduceLROnPlateau, whose margin is relative,
    # 1e-4 x 0.5, counted epoch 2 as an improvement and cut two epochs later.) Every score is
    # above the fissure bar of this validation split (3 tears vs 9: 26/27), so patience counts.
    scores = [0.97] + [0.97009] * 5
    _scripted_validation(monkeypatch, scores)
    config = load_config(
        TINY,
        {
            "data.path": str(phantom),
            "train.max_epochs": 6,
            "train.lr_patience": 2,
            "train.early_stopping_patience": 10,
            "train.lr": 0.01,
        },
    )
    train_run(config, tmp_path / "run", console=Console(quiet=True))
    lines = (tmp_path / "run" / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    lrs = [float(line.split(",")[header.index("lr")]) for line in lines[1:]]
    # lr logged is the one the epoch trained with: cut after epochs 3 and 5 (2 bad epochs each)
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.005, 0.005, 0.0025])


def test_patience_counts_only_once_validation_has_left_chance():
    stopping = EarlyStopping(patience=2, lr_patience=1, chance_bars={"fissure": 0.7})
    for epoch, score in enumerate([0.52, 0.5, 0.55, 0.51, 0.53, 0.5], 1):  # six epochs at chance
        stopping.update(epoch, score, {"fissure": score})
        assert not stopping.lr_cut_due and not stopping.should_stop
    assert not stopping.started
    stopping.update(7, 0.8, {"fissure": 0.8})
    assert not stopping.started  # one epoch above the bar could be noise
    stopping.update(8, 0.79, {"fissure": 0.79})
    assert stopping.started_epoch == 7  # confirmed by epoch 8, which is the first to count
    assert stopping.lr_cut_due and not stopping.should_stop
    stopping.update(9, 0.78, {"fissure": 0.78})
    assert stopping.should_stop and stopping.best_epoch == 7


def test_chance_sd_is_the_mann_whitney_null_sd():
    from mtl_meniscus.engine.stopping import chance_sd

    # by hand: sqrt((55 + 165 + 1) / (12 * 55 * 165)); the bars themselves: test_left_chance.py
    assert chance_sd(55, 165) == pytest.approx((221 / (12 * 55 * 165)) ** 0.5)


def test_a_run_that_starts_late_is_not_stopped_or_slowed_before_it_starts(phantom, tmp_path, monkeypatch):
    # Validation at chance for six epochs, then learning (above the fissure bar of this split, 26/27,
    # from epoch 7 on). Patience 2 would have stopped it at epoch 3 and the learning rate would
    # have been cut twice before it learned anything.
    _scripted_validation(monkeypatch, [0.5, 0.52, 0.49, 0.51, 0.5, 0.53, 0.97, 1.0, 0.99, 0.98])
    config = load_config(
        TINY,
        {
            "data.path": str(phantom),
            "train.max_epochs": 10,
            "train.early_stopping_patience": 2,
            "train.lr_patience": 1,
            "train.lr": 0.01,
        },
    )
    metrics = train_run(config, tmp_path / "run", console=Console(quiet=True))
    shared = metrics["members"]["shared"]
    assert shared["epochs"] == 10 and shared["best_epoch"] == 8 and shared["left_chance_epoch"] == 7
    assert shared["left_chance_tasks"] == {"fissure": 7} and shared["tasks_at_chance"] == []
    assert shared["chance_bars"] == {"fissure": pytest.approx(26 / 27)}  # the others: too few rows to tell
    # the one warning: this phantom's val split has no anterior tear (trainer.py validation_warnings)
    assert metrics["learned"] and metrics["warnings"] == [
        "[shared] validation AUC undefined (position: no anterior among the 3 tears of the val split): it "
        "counts neither in the validation score that picks the best epoch nor in whether the network left chance"
    ]
    lines = (tmp_path / "run" / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    lrs = [float(line.split(",")[header.index("lr")]) for line in lines[1:]]
    assert (
        lrs[:9] == [0.01] * 9 and lrs[9] == 0.005
    )  # first cut after epoch 9, the first bad epoch after the best


def test_a_run_that_cannot_learn_says_so(tmp_path):
    # Shuffled labels: nothing to learn. The run ends at chance and says so on the console, in
    # metrics.json and in the checkpoint's metrics.
    import csv

    write_phantom(tmp_path / "data", n=300, seed=9, size=64)
    with (tmp_path / "data" / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = [(r["fissure"], r["orientation"], r["position"]) for r in rows]
    order = np.random.default_rng(0).permutation(len(rows))
    for row, k in zip(rows, order):
        row["fissure"], row["orientation"], row["position"] = labels[k]
    with (tmp_path / "data" / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = load_config(
        TINY,
        {"data.path": str(tmp_path / "data"), "data.split_fractions": [0.5, 0.4, 0.1], "train.max_epochs": 4},
    )
    console = Console(record=True, width=250)
    metrics = train_run(config, tmp_path / "run", console=console)
    assert not metrics["learned"]
    assert "did not learn: no task left chance" in metrics["warnings"][0]
    output = console.export_text()
    assert "WARNING: [shared] did not learn: no task left chance" in output and "chance is 0.50" in output
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["learned"] is False and saved["members"]["shared"]["learned"] is False


def test_a_cut_due_at_the_learning_rate_floor_ends_the_run(phantom, tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [0.99, 0.98, 0.98, 0.98, 0.98, 0.98])  # above chance from epoch 1
    config = load_config(
        TINY,
        {
            "data.path": str(phantom),
            "train.max_epochs": 6,
            "train.lr": 0.01,
            "train.min_lr": 0.005,
            "train.lr_patience": 1,
            "train.early_stopping_patience": 10,
        },
    )
    metrics = train_run(config, tmp_path / "run", console=Console(quiet=True))
    assert metrics["members"]["shared"]["epochs"] == 3  # cut to the floor after epoch 2, done after 3


def test_a_network_that_started_learning_as_the_budget_ended_is_warned_about():
    from mtl_meniscus.engine.trainer import late_start_warning

    warning = late_start_warning("shared", left_chance_epoch=20, epochs=20, max_epochs=20)
    assert warning.startswith("[shared] left chance only at epoch 20 of 20") and "--max-epochs" in warning
    assert late_start_warning("fissure", 18, 20, 20) is not None  # within the last three epochs
    assert late_start_warning("fissure", 17, 20, 20) is None  # four epochs to learn in
    assert late_start_warning("shared", None, 20, 20) is None  # never left chance: did-not-learn instead
    assert late_start_warning("shared", 19, 19, 20) is None  # stopped early, not by the budget
