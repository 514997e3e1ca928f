"""`tune`: trial values are the runs' validation scores, best.yaml trains, reruns add trials,
pruning leaves a consistent run folder, bad options are named."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mtl_meniscus.commands import tune as tune_module
from mtl_meniscus.commands.tune import SEARCH_SPACE, run_tune
from mtl_meniscus.config import load_config
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.engine.trainer import TrainingDivergedError
from mtl_meniscus.errors import ConfigError, MeniscusError
from mtl_meniscus.io.runlock import RunLock
from mtl_meniscus.labels import DEFAULT_TASKS
from mtl_meniscus.phantom.slices import write_phantom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import app  # noqa: E402

optuna = pytest.importorskip("optuna")  # the [tune] extra (part of [dev])

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny preset at 2 epochs of 2 steps: trials of about a second."""
    settings = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    settings["train"] |= {"max_epochs": 2, "steps_per_epoch": 2}
    path = tmp_path_factory.mktemp("preset") / "tiny-tune.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tune_phantom")
    write_phantom(folder, n=120, seed=4, size=64)
    return folder


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, tiny, phantom) -> Path:
    """A finished 3-trial search of the shared model (SQLite storage in the folder)."""
    out = tmp_path_factory.mktemp("searches") / "tiny-study"
    run_tune(out, tiny, mode="shared", data_dir=phantom, n_trials=3, seed=0)
    return out


def read_trials(out: Path) -> list[dict]:
    with (out / "trials.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_trial_values_are_the_runs_validation_scores(study_dir):
    rows = read_trials(study_dir)
    assert [int(r["number"]) for r in rows] == [0, 1, 2]
    for row in rows:
        assert row["state"] == "COMPLETE"
        run_dir = Path(row["run_dir"])
        assert run_dir == (study_dir / "trials" / f"trial-{int(row['number']):04d}").resolve()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        value = float(row["value"])
        assert 0 <= value <= 1
        assert value == pytest.approx(metrics["members"]["shared"]["val_score"], abs=1e-12)
        # the sampled values are what the run trained with
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["train"]["lr"] == pytest.approx(float(row["train.lr"]))
        assert config["model"]["widths"] == [int(w) for w in row["model.widths"].split(",")]
        assert config["train"]["pos_weights"]["position"] == pytest.approx(
            float(row["train.pos_weights.position"])
        )
        assert config["train"]["seed"] == 0
        assert config["wandb"]["group"] == "tiny-study" and config["wandb"]["job_type"] == "tune-trial"
    study = optuna.load_study(study_name="tiny-study", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert len(study.trials) == 3
    assert (study_dir / "history.png").stat().st_size > 0
    assert (study_dir / "importance.png").stat().st_size > 0


def test_best_yaml_is_the_best_runs_config_and_trains(study_dir, tmp_path):
    rows = read_trials(study_dir)
    best = max(rows, key=lambda r: float(r["value"]))
    best_yaml = yaml.safe_load((study_dir / "best.yaml").read_text())
    run_config = yaml.safe_load((Path(best["run_dir"]) / "config.yaml").read_text())
    # equal but for the study's wandb group and job type, cleared in best.yaml
    assert best_yaml["wandb"]["group"] is None and best_yaml["wandb"]["job_type"] is None
    run_config["wandb"] |= {"group": None, "job_type": None}
    assert best_yaml == run_config
    metrics = train_run(load_config(study_dir / "best.yaml"), tmp_path / "from-best")
    assert (tmp_path / "from-best" / "metrics.json").is_file()
    assert metrics["members"]["shared"]["val_score"] is not None


def test_a_second_process_adds_trials_to_the_study(tiny, study_dir, tmp_path, phantom):
    out = tmp_path / study_dir.name  # a copy: same study name (the folder's), its own storage
    shutil.copytree(study_dir, out)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = ["tune", "--config", str(tiny), "--data", str(phantom), "--out", str(out), "--n-trials", "2"]
    done = subprocess.run(
        [sys.executable, "cli.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 trials so far" in done.stdout and "trial 4:" in done.stdout
    study = optuna.load_study(study_name=study_dir.name, storage=f"sqlite:///{out / 'study.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert len(read_trials(out)) == 5
    # the continuation draws new points instead of replaying the first trials'
    first = [t.params for t in study.trials[:3]]
    assert all(t.params not in first for t in study.trials[3:])


class PruneAlways(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_a_pruned_trial_leaves_a_resumable_run_folder(tiny, tmp_path, phantom):
    out = tmp_path / "pruned"
    study = run_tune(
        out, tiny, mode="shared", data_dir=phantom, n_trials=1, pruner=PruneAlways(), warmup_epochs=0
    )
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]  # stopped after epoch 1
    assert trial.user_attrs["pruned_at"] == "shared epoch 1"
    rows = read_trials(out)
    assert rows[0]["state"] == "PRUNED" and not (out / "best.yaml").exists()
    run_dir = Path(rows[0]["run_dir"])
    assert not (run_dir / "metrics.json").exists() and (run_dir / "last.pt").is_file()
    RunLock(run_dir).release()  # the lock was released (flock conflicts within one process too)
    metrics = train_run(None, run_dir, resume=True)
    assert metrics["members"]["shared"]["epochs"] == 2


def test_separate_mode_value_is_the_challenge_weighted_mean_of_the_networks(tiny, tmp_path, phantom):
    out = tmp_path / "separate"
    study = run_tune(out, tiny, mode="separate", data_dir=phantom, n_trials=1, seed=1)
    trial = study.trials[0]
    metrics = json.loads((Path(trial.user_attrs["run_dir"]) / "metrics.json").read_text())
    expected = sum(t.weight * metrics["members"][t.name]["val_score"] for t in DEFAULT_TASKS)
    assert trial.value == pytest.approx(expected)
    assert max(trial.intermediate_values) >= 4  # position network: steps 4.. (max_epochs 2)


def test_steps_mean_the_same_network_and_epoch_in_every_trial(tiny, monkeypatch, tmp_path):
    class FakeTrial:
        def __init__(self):
            self.reports, self.asked = [], []

        def report(self, value, step):
            self.reports.append((value, step))

        def should_prune(self):
            self.asked.append(self.reports[-1][1])
            return False

    monkeypatch.setattr(tune_module, "epoch_score", lambda run_dir, member, epoch: 0.5)
    config = load_config(tiny, {"model.name": "separate", "train.max_epochs": 3})
    trial = FakeTrial()
    report = tune_module._pruning_callback(trial, tmp_path, config, warmup_epochs=2)
    for member in ("fissure", "orientation", "position"):
        for epoch in (1, 2, 3):
            report(member, epoch)
    assert [step for _, step in trial.reports] == list(range(9))
    assert trial.asked == [2, 5, 8]  # epoch 3 of each network: none is pruned in its first 2 epochs


def test_objective_and_search_space_use_real_config_keys(tiny):
    for param in SEARCH_SPACE:
        values = param.choices or (param.low, param.high)
        for value in values:
            load_config(tiny, {param.key: tune_module.decode(param.key, value)})
    config = load_config(tiny, {"model.name": "separate"})
    metrics = {"members": {"fissure": {"val_score": 1.0}, "orientation": {"val_score": 0.5}}}
    metrics["members"]["position"] = {"val_score": 0.0}
    assert tune_module.objective_value(metrics, config) == pytest.approx(0.4 + 0.15)
    metrics["members"]["position"]["val_score"] = None
    assert tune_module.objective_value(metrics, config) is None


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--n-trials", "0", "--n-trials"),
        ("--timeout", "-5", "--timeout"),
        ("--n-jobs", "0", "--n-jobs"),
        ("--seed", "-1", "--seed"),
        ("--storage", "not-a-url", "--storage not-a-url"),
        ("--storage", "postgresql://me:secret@127.0.0.1:1/db", "postgresql://me:***@127.0.0.1:1/db"),
    ],
)
def test_bad_options_are_named_without_a_traceback(tiny, tmp_path, phantom, option, value, named):
    args = ["tune", "--config", str(tiny), "--data", str(phantom), "--out", str(tmp_path / "t")]
    result = runner.invoke(app, [*args, option, value])
    assert result.exit_code == 1, result.output
    assert named in result.output and "Traceback" not in result.output
    assert "secret" not in result.output


def test_another_mode_in_the_same_study_is_refused(tiny, study_dir, tmp_path, phantom):
    out = tmp_path / study_dir.name
    shutil.copytree(study_dir, out)
    with pytest.raises(ConfigError, match="tunes shared mode"):
        run_tune(out, tiny, mode="separate", data_dir=phantom, n_trials=1)


def test_missing_optuna_is_a_clear_message(tiny, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    with pytest.raises(MeniscusError, match=r"pip install 'mtl_meniscus\[tune\]'"):
        run_tune(tmp_path / "t", tiny)
    result = runner.invoke(app, ["tune", "--config", str(tiny), "--out", str(tmp_path / "t")])
    assert result.exit_code == 1 and "mtl_meniscus[tune]" in result.output
    assert "Traceback" not in result.output


def test_values_are_finite(study_dir):
    assert all(math.isfinite(float(r["value"])) for r in read_trials(study_dir))


def test_readme_search_space_table_matches_the_code():
    readme = (ROOT / "docs" / "cli.md").read_text()  # the page with the search-space table
    for param in SEARCH_SPACE:
        assert f"| `{param.key}` | {param.describe()} |" in readme, param.key


def test_a_diverged_trial_fails_and_the_search_goes_on(tiny, phantom, tmp_path, monkeypatch):
    def diverge(config, run_dir, **kwargs):
        raise TrainingDivergedError("[shared] training diverged in epoch 1: the training loss is nan")

    monkeypatch.setattr(tune_module, "train_run", diverge)
    out = tmp_path / "diverged"
    study = run_tune(out, tiny, data_dir=phantom, n_trials=2)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("diverged" in row["error"] for row in read_trials(out))
    assert not (out / "best.yaml").exists()


def test_parallel_trials_with_wandb_are_refused(tiny, phantom, tmp_path):
    with pytest.raises(ConfigError, match="--n-jobs 2 with wandb"):
        run_tune(tmp_path / "t", tiny, data_dir=phantom, n_trials=2, n_jobs=2, wandb_mode="offline")
