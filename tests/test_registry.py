"""Plug-ins: a model or a task weighting is one registration, seen by the config check, the
training engine, the checkpoint loader and the CLI help, with no other module edited."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from mtl_meniscus.commands.compare.plan import training_flops
from mtl_meniscus.config import ModelConfig, load_config
from mtl_meniscus.engine.checkpoint import load_checkpoint, model_from_checkpoint
from mtl_meniscus.engine.run import train_run, training_config
from mtl_meniscus.errors import ConfigError, MeniscusError
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


def test_an_unknown_name_is_blamed_on_the_file_or_option_that_gave_it(tmp_path):
    """As a bad value is: the registries' names and the trunk are checked with the config."""
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"base: {TINY}\nmodel:\n  name: sharred\n")
    with pytest.raises(ConfigError, match=rf"^{preset}: config key 'model.name': unknown model 'sharred'"):
        training_config(preset, None, [], [], exams=False)
    for setting, key in (
        ("train.weighting=uncertian", "train.weighting"),
        ("model.trunk=plian", "model.trunk"),
    ):
        with pytest.raises(ConfigError, match=rf"^--set {setting}: config key '{key}': unknown"):
            training_config(Path(TINY), None, [], [setting], exams=False)
    # a named option: its name, not only the key it sets (and over a --set of the same key)
    named = [("--trunk", "model.trunk", "plian")]
    with pytest.raises(ConfigError, match=r"^--trunk plian: config key 'model.trunk': unknown trunk"):
        training_config(Path(TINY), None, named, ["model.trunk=plain"], exams=False)


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


def test_a_per_task_plugin_trains_its_own_networks_and_is_evaluated(tmp_path, data64):
    """A model registered with per_task=True builds one network at a time, builder(config, network):
    the engine trains each network it built (not the package's cascade networks), assembles them,
    and evaluate and predict rebuild the same; saliency maps, which know this package's layers
    only, are skipped by evaluate and refused up front by predict --cam."""
    built = []

    def mean_pool_network(config, network):
        built.append(network)
        return MeanPool((network,))

    MODELS.register("mean-pool-cascade", per_task=True)(mean_pool_network)
    try:
        config = load_config(
            TINY, {"data.path": str(data64), "model.name": "mean-pool-cascade", "train.max_epochs": 1}
        )
        train_run(config, tmp_path / "run", console=Console(quiet=True))
        assert built[-3:] == ["fissure", "orientation", "position"]
        model, _ = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "best.pt"))
        assert all(isinstance(net, MeanPool) for net in model.networks.values())
        # one network's best.pt alone: its builder's network is not a model of its own (it once
        # recorded a one-task 'shared' net, whose layers these weights do not fit)
        member = tmp_path / "run" / "members" / "orientation" / "best.pt"
        with pytest.raises(
            MeniscusError, match="is the orientation network of a cascade run.*the run folder"
        ):
            model_from_checkpoint(load_checkpoint(member), member)
        # compare counts the FLOPs of the plug-in's networks: a Linear(4, 1) on 2 x (4,) features,
        # forward 2 x 4 x 1 multiply-adds and the weight's gradient as many, 2 FLOPs each, per image
        assert training_flops(config) == {"fissure": 16.0, "orientation": 16.0, "position": 16.0}
        from mtl_meniscus.cli import app

        runner = CliRunner()
        evaluated = runner.invoke(
            app, ["evaluate", str(tmp_path / "run"), "--threshold", "0", "--bootstrap", "10", "--tta", "0"]
        )
        assert evaluated.exit_code == 0, evaluated.output  # every image a detected tear: saliency skipped
        figures = tmp_path / "run" / "eval-test"
        assert (figures / "errors.png").is_file() and not (figures / "saliency.png").exists()
        image = next((data64 / "images").glob("*.png"))
        cams = tmp_path / "cams"
        refused = runner.invoke(
            app,
            [
                "predict",
                str(tmp_path / "run"),
                str(image),
                "--out",
                str(tmp_path / "p.csv"),
                "--cam",
                str(cams),
            ],
        )
        assert refused.exit_code == 1 and "is a plug-in" in refused.output, refused.output
        assert not (tmp_path / "p.csv").exists() and not any(cams.glob("*.png"))
    finally:
        MODELS.unregister("mean-pool-cascade")
    # a checkpoint of a model not registered in this process names what registers it
    with pytest.raises(
        MeniscusError, match=r"'mean-pool-cascade' is not registered here .*MTL_MENISCUS_PLUGINS"
    ):
        model_from_checkpoint(load_checkpoint(tmp_path / "run" / "best.pt"), tmp_path / "run" / "best.pt")


class Scalar(nn.Module):
    def forward(self, x):  # one logit per image, no dict
        return x.mean(dim=(1, 2, 3))


@pytest.mark.parametrize(
    "builder, facts, named",
    [
        (lambda config: Scalar(), {"per_task": False}, "it returned a Tensor of shape (2,)"),
        (lambda config: MeanPool(("fissure", "orientation")), {"per_task": False}, "'orientation': (2,)}"),
        (lambda config: MeanPool(config.tasks)[0], {"per_task": False}, "its builder failed (TypeError"),
        (lambda config: lambda x: x, {"per_task": False}, "returned a function, not a torch nn.Module"),
        (lambda: MeanPool(()), {"per_task": False}, "its builder failed (TypeError"),
        (lambda config: MeanPool(config.tasks), {}, "registered without per_task"),
    ],
)
def test_a_plugin_that_breaks_the_output_contract_is_named_before_any_work(tmp_path, builder, facts, named):
    """A plug-in model is built once and run on a zero batch before anything is read: a wrong output
    (or a missing task, which would train silently on two tasks) is named, never a traceback."""
    message = _refused_before_any_work(MODELS, "model.name", builder, tmp_path, **facts)
    assert named in message and "model 'broken'" in message, message


def _refused_before_any_work(registry, key, plugin, tmp_path, **facts) -> str:
    """Register `plugin` as 'broken' and train the tiny preset with it (config key `key`): the
    message it is refused with, once it is checked that no run folder was made."""
    registry.register("broken", **facts)(plugin)
    try:
        with pytest.raises(MeniscusError) as err:
            train_run(load_config(TINY, {key: "broken"}), tmp_path / "run", console=Console(quiet=True))
        assert not (tmp_path / "run").exists()
        return str(err.value)
    finally:
        registry.unregister("broken")


def test_plugin_modules_named_in_the_environment_register_for_the_cli(tmp_path):
    (tmp_path / "knee_plugins.py").write_text(
        "from torch import nn\n"
        "from mtl_meniscus.networks.models import MODELS\n\n\n"
        "@MODELS.register('outside-model', per_task=False)\n"
        "def build(config):\n"
        '    """A model from a module outside the package."""\n'
        "    return nn.Identity()\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "MTL_MENISCUS_PLUGINS": "knee_plugins",
        "COLUMNS": "300",
    }
    shown = subprocess.run(
        [sys.executable, str(root / "cli.py"), "train", "--help"], capture_output=True, text=True, env=env
    )
    assert shown.returncode == 0 and "<shared|separate|outside-model>" in shown.stdout, shown.stdout
    env["MTL_MENISCUS_PLUGINS"] = "knee_plugins, no_such_module"
    failed = subprocess.run(
        [sys.executable, str(root / "cli.py"), "--help"], capture_output=True, text=True, env=env
    )
    assert failed.returncode == 1 and "Traceback" not in failed.stdout + failed.stderr
    assert "$MTL_MENISCUS_PLUGINS: cannot import the plug-in module 'no_such_module'" in failed.stdout


class NoWeights(HalfWeighting):
    def current_weights(self):
        return None


class PerTask(HalfWeighting):
    def forward(self, losses):  # one loss per task, not their combination
        return torch.stack(list(losses.values()))


class FloatLoss(HalfWeighting):
    def backward(self, losses):  # its own backward, giving the loss as a Python float
        loss, weights = super().backward(losses)
        return float(loss), weights


@pytest.mark.parametrize(
    "weighting, named",
    [
        (NoWeights, "current_weights() must give a number for each of fissure"),
        (PerTask, "RuntimeError"),
        (FloatLoss, "must give the combined loss as one finite scalar tensor; it gave 1.5"),
    ],
)
def test_a_weighting_plugin_that_breaks_its_contract_is_named_before_any_work(tmp_path, weighting, named):
    message = _refused_before_any_work(WEIGHTINGS, "train.weighting", weighting, tmp_path)
    assert named in message and "task weighting 'broken'" in message, message
