"""One network's epoch loop (engine/trainer.py): a training that diverges, in its loss or in its
validation outputs, stops with a message and keeps the last finite state in last.pt."""

import numpy as np
import pytest
import torch
from support import TINY, _quiet

from mtl_meniscus.config import load_config
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.errors import MeniscusError


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
