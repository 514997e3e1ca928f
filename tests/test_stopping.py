"""One rule for 'improved': early stopping, the learning-rate schedule, the restored weights and
every report agree on the best epoch."""

from pathlib import Path

import pytest
from rich.console import Console

from mtl_meniscus import train as train_module
from mtl_meniscus.checkpoint import load_checkpoint
from mtl_meniscus.config import load_config
from mtl_meniscus.phantom import write_phantom
from mtl_meniscus.stopping import EarlyStopping
from mtl_meniscus.train import train_run

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

    def validate(self):
        score = remaining.pop(0)
        return {"auc": {"fissure": score}, "score": score, "loss": 1.0}

    monkeypatch.setattr(train_module.MemberTrainer, "_validate", validate)


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
    # 1e-4 x 0.5, counted epoch 2 as an improvement and cut two epochs later.)
    scores = [0.5] + [0.50009] * 5
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
