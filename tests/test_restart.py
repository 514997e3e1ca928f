"""Starting again from new initial weights (train.restart_if_at_chance_after; engine/stopping.py):
when a network still has no task above chance K epochs after its start, if the budget leaves it K
more epochs. Decided like the other stopping rules, drawn from its own seed, and resumable."""

from pathlib import Path

import pytest
import torch
from rich.console import Console
from support import Killed, kill_after

from mtl_meniscus.config import load_config
from mtl_meniscus.engine import trainer as trainer_module
from mtl_meniscus.engine.checkpoint import load_checkpoint
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.engine.stopping import EarlyStopping, decide_after_epoch
from mtl_meniscus.evaluation.metrics import monitor_score
from mtl_meniscus.networks.models import build_model
from mtl_meniscus.phantom.slices import write_phantom

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
AT_CHANCE = {"fissure": 0.5, "orientation": 0.5, "position": 0.5}
LEARNED = {"fissure": 0.95, "orientation": 0.5, "position": 0.5}
BARS = {"fissure": 0.6, "orientation": 0.7}


def _decisions(stopping, aucs_per_epoch, after, max_epochs):
    restarts = []
    for epoch, aucs in enumerate(aucs_per_epoch, 1):
        decision = decide_after_epoch(
            stopping, epoch, monitor_score(aucs), 1e-3, 1e-5, max_epochs, aucs, restart_after=after
        )
        if decision.restart:
            restarts.append(epoch)
            stopping = stopping.restarted(epoch)
    return restarts, stopping


def test_a_network_at_chance_restarts_every_k_epochs_while_the_budget_leaves_k():
    stopping = EarlyStopping(patience=5, lr_patience=3, chance_bars=BARS)
    restarts, stopping = _decisions(stopping, [AT_CHANCE] * 12, after=4, max_epochs=12)
    assert restarts == [4, 8]  # at 12 the budget is spent; at 8 it leaves exactly 4
    assert stopping.restarts == [4, 8] and stopping.start_epoch == 8
    assert _decisions(EarlyStopping(5, 3, BARS), [AT_CHANCE] * 7, after=4, max_epochs=7)[0] == []
    assert _decisions(EarlyStopping(5, 3, BARS), [AT_CHANCE] * 12, after=0, max_epochs=12)[0] == []


def test_no_restart_once_a_task_left_chance_or_while_one_is_above_its_bar():
    learned_early = [AT_CHANCE, LEARNED, LEARNED] + [AT_CHANCE] * 9
    restarts, stopping = _decisions(EarlyStopping(5, 3, BARS), learned_early, after=4, max_epochs=12)
    assert restarts == [] and stopping.started_epoch == 2
    # above the bar in epoch 4 (a pair that may confirm in 5): wait; it confirmed, so never
    restarts, stopping = _decisions(
        EarlyStopping(5, 3, BARS), [AT_CHANCE] * 3 + [LEARNED] * 2 + [AT_CHANCE] * 7, after=4, max_epochs=12
    )
    assert restarts == [] and stopping.started_epoch == 4
    # above the bar in epoch 4 alone: the restart comes one epoch later
    restarts, _ = _decisions(
        EarlyStopping(5, 3, BARS), [AT_CHANCE] * 3 + [LEARNED] + [AT_CHANCE] * 8, after=4, max_epochs=12
    )
    assert restarts == [5]
    # too few validation rows to tell chance: never
    assert _decisions(EarlyStopping(5, 3, {}), [AT_CHANCE] * 12, after=4, max_epochs=12)[0] == []


def test_a_restart_clears_what_was_measured_and_old_states_load():
    stopping = EarlyStopping(patience=5, lr_patience=3, chance_bars=BARS)
    stopping.update(1, 0.55, AT_CHANCE)
    fresh = stopping.restarted(4)
    assert fresh.best_score is None and fresh.best_epoch == 0 and fresh.above_bar_streaks == {}
    assert (fresh.patience, fresh.lr_patience, fresh.chance_bars) == (5, 3, BARS)
    saved = stopping.state_dict()
    del saved["restarts"]  # a checkpoint from before restarts existed
    loaded = EarlyStopping(patience=5, lr_patience=3)
    loaded.load_state_dict(saved)
    assert loaded.restarts == [] and loaded.best_score == 0.55


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("phantom")
    write_phantom(folder, n=60, seed=5, size=64)
    return folder


def _scripted(monkeypatch, aucs_per_epoch):
    """validate() answers the scripted AUCs epoch after epoch; the bars are BARS."""
    answers = iter(aucs_per_epoch)

    def validate(*args, **kwargs):
        aucs = next(answers)
        return {"finite": True, "auc": aucs, "score": monitor_score(aucs), "loss": 1.0}

    monkeypatch.setattr(trainer_module, "member_chance_bars", lambda *_: dict(BARS))
    monkeypatch.setattr(trainer_module, "validate", validate)


def test_a_run_restarts_from_new_weights_of_its_own_seed_and_says_so(phantom, tmp_path, monkeypatch):
    _scripted(monkeypatch, [AT_CHANCE] * 2 + [LEARNED] * 4)
    drawn = {}
    restart = trainer_module.MemberTrainer._restart

    def keep_weights(self):
        restart(self)
        drawn["after"] = {k: v.clone() for k, v in self.state.model.state_dict().items()}

    monkeypatch.setattr(trainer_module.MemberTrainer, "_restart", keep_weights)
    overrides = {"data.path": str(phantom), "train.max_epochs": 6, "train.restart_if_at_chance_after": 2}
    config = load_config(TINY, overrides)
    console = Console(record=True, width=300)
    metrics = train_run(config, tmp_path / "run", console=console)
    shared = metrics["members"]["shared"]
    assert shared["restarts"] == [2] and shared["left_chance_epoch"] == 3 and metrics["learned"]
    assert "no task above chance in epochs 1-2" in console.export_text()
    torch.manual_seed(trainer_module.restart_seed(config.train.seed, 1))
    expected = build_model(config.model).state_dict()
    assert all(torch.equal(drawn["after"][k].float(), expected[k].float()) for k in expected)
    torch.manual_seed(config.train.seed)
    original = build_model(config.model).state_dict()  # the run's first weights: not drawn again
    assert not all(torch.equal(original[k].float(), expected[k].float()) for k in expected)


def test_a_run_killed_after_a_restart_resumes_as_if_uninterrupted(phantom, tmp_path, monkeypatch):
    epochs = [AT_CHANCE] * 2 + [LEARNED] * 3
    overrides = {"data.path": str(phantom), "train.max_epochs": 5, "train.restart_if_at_chance_after": 2}
    _scripted(monkeypatch, epochs)
    full = train_run(load_config(TINY, overrides), tmp_path / "full", console=Console(quiet=True))

    _scripted(monkeypatch, epochs)
    with pytest.raises(Killed):
        train_run(
            load_config(TINY, overrides),
            tmp_path / "killed",
            console=Console(quiet=True),
            on_epoch_end=kill_after(3),
        )
    _scripted(monkeypatch, epochs[3:])
    resumed = train_run(None, tmp_path / "killed", resume=True, console=Console(quiet=True))
    assert resumed["members"] == full["members"] and full["members"]["shared"]["restarts"] == [2]
    a = load_checkpoint(tmp_path / "full" / "best.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "killed" / "best.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
