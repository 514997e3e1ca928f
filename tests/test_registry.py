"""Plug-ins: a model or a task weighting is one registration, seen by the config check, the
training engine, the checkpoint loader and the CLI help, with no other module edited."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from mtl_meniscus.config import ModelConfig, load_config
from mtl_meniscus.engine.checkpoint import load_checkpoint, model_from_checkpoint
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.errors import ConfigError
from mtl_meniscus.networks.losses import WEIGHTINGS, TaskWeighting
from mtl_meniscus.networks.models import MODELS, build_model
from mtl_meniscus.phantom.slices import write_phantom
from mtl_meniscus.registry import Registry

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


class MeanPool(nn.Module):
    """Global mean and max of each input channel, one linear layer per task."""

    def __init__(self, tasks):
        super().__init__()
        self.heads = nn.ModuleDict({task: nn.Linear(4, 1) for task in tasks})

    def forward(self, x):  # x (B, C=2, H, W) -> {task: (B,) logits}
        features = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)  # (B, 4)
        return {task: head(features).squeeze(1) for task, head in self.heads.items()}


class HalfWeighting(TaskWeighting):
    """Every task's loss times one half."""

    def __init__(self, tasks):
        super().__init__()
        self.tasks = tuple(tasks)

    def forward(self, losses):
        return sum(0.5 * loss for loss in losses.values())

    def current_weights(self):
        return dict.fromkeys(self.tasks, 0.5)


@pytest.fixture
def plugins():
    """A model and a weighting registered for one test, and removed after it."""
    MODELS.register("mean-pool", per_task=False)(lambda config: MeanPool(config.tasks))
    WEIGHTINGS.register("half")(HalfWeighting)
    yield
    MODELS.unregister("mean-pool")
    WEIGHTINGS.unregister("half")


def test_a_registered_model_and_weighting_train_save_and_reload(plugins, tmp_path):
    data = tmp_path / "data"
    write_phantom(data, n=60, seed=4, size=64)
    config = load_config(
        TINY,
        {"data.path": str(data), "model.name": "mean-pool", "train.weighting": "half", "train.max_epochs": 1},
    )
    metrics = train_run(config, tmp_path / "run", console=Console(quiet=True))
    assert metrics["model"] == "mean-pool"
    assert set(metrics["test"]["auc"]) == {"fissure", "orientation", "position"}
    model, saved = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "best.pt"))
    assert isinstance(model, MeanPool) and saved.train.weighting == "half"
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    assert float(history[1].split(",")[header.index("weight_fissure")]) == 0.5  # the weighting was used


def test_unknown_names_stop_the_run_naming_the_key_and_the_registered_ones(tmp_path):
    for key, value in (("model.name", "resnet9000"), ("train.weighting", "gradnorm")):
        config = load_config(TINY, {key: value})
        with pytest.raises(ConfigError) as err:
            train_run(config, tmp_path / key, console=Console(quiet=True))
        assert f"'{key}'" in str(err.value) and repr(value) in str(err.value)
    assert "registered: shared, separate" in str(
        pytest.raises(ConfigError, build_model, ModelConfig(name="x")).value
    )
    assert not (tmp_path / "model.name").exists()  # refused before the run folder was made


def test_the_cli_help_lists_the_registered_models():
    from mtl_meniscus.cli import app

    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "300"}).output
    for name in MODELS.names():
        assert f"{name}: {MODELS.describe(name)}" in help_text


def test_registry_refuses_a_second_entry_of_one_name_and_reports_its_facts():
    registry = Registry("thing", key="x.thing")
    registry.register("a", per_task=True)(lambda: None)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(lambda: None)
    assert registry.facts("a") == {"per_task": True} and registry.names() == ("a",)
    with pytest.raises(ConfigError, match=r"config key 'x.thing': unknown thing 'b' \(registered: a\)"):
        registry.get("b")


def test_the_docs_table_of_plugins_is_the_registries():
    root = Path(__file__).resolve().parents[1]
    checked = subprocess.run(
        [sys.executable, str(root / "scripts" / "plugins_table.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr
