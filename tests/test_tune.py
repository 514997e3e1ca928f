"""`tune`: trial values are the runs' validation scores, best.yaml trains, reruns add trials,
pruning leaves a consistent run folder, bad options are named."""

import csv
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from mtl_meniscus.commands import tune as tune_module
from mtl_meniscus.commands.tune import SEARCH_SPACE, Param, run_tune
from mtl_meniscus.config import load_config
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.engine.trainer import TrainingDivergedError
from mtl_meniscus.errors import ConfigError, DataError, MeniscusError
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
    # the closing hint: the best validation score is optimistic, the test split gives the figure
    assert (
        "maximum over 5 completed trials" in done.stdout
        and f"train --config {out / 'best.yaml'}" in done.stdout
    )
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
        # in memory, the study would end with the process: a rerun could not add trials to it
        ("--storage", "sqlite://", "--storage sqlite://: an in-memory database"),
        ("--storage", "sqlite:///:memory:", "--storage sqlite:///:memory:: an in-memory database"),
    ],
)
def test_bad_options_are_named_without_a_traceback(tiny, tmp_path, phantom, option, value, named):
    args = ["tune", "--config", str(tiny), "--data", str(phantom), "--out", str(tmp_path / "t")]
    result = runner.invoke(app, [*args, option, value])
    assert result.exit_code == 1, result.output
    assert named in result.output and "Traceback" not in result.output
    assert "secret" not in result.output


def test_a_bad_wandb_mode_stops_tune_only_where_it_would_log(tiny, tmp_path, phantom, monkeypatch):
    """The tiny preset logs nothing (wandb.mode disabled): wandb's variable does not matter there.
    With --wandb offline it does, and stops the search before its study is created."""
    monkeypatch.setenv("WANDB_MODE", "bogus")
    args = ["tune", "--config", str(tiny), "--data", str(phantom), "--n-trials", "1"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "quiet")])
    assert result.exit_code == 0 and (tmp_path / "quiet" / "trials.csv").is_file(), result.output
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "logged"), "--wandb", "offline"])
    assert result.exit_code == 1 and "$WANDB_MODE: unknown wandb mode 'bogus'" in result.output, result.output
    assert not (tmp_path / "logged" / "study.db").exists()


def study_files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("study.db", "trials.csv", "best.yaml")}


def test_a_rerun_with_other_data_is_refused_naming_data_path(tiny, study_dir, tmp_path, phantom, data64):
    out = tmp_path / study_dir.name
    shutil.copytree(study_dir, out)
    before = study_files(out)
    args = ["tune", "--config", str(tiny), "--data", str(data64), "--out", str(out), "--n-trials", "1"]
    result = runner.invoke(app, args, terminal_width=1000)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert (
        f"holds trials of other settings (data.path (--data): '{phantom.resolve()}' -> '{data64.resolve()}')"
        in (result.output)
    )
    assert "another --out (or --study-name)" in result.output
    assert study_files(out) == before  # nothing trained, nothing rewritten


def test_a_search_of_another_study_in_the_folder_is_refused_and_changes_nothing(
    tiny, study_dir, tmp_path, phantom
):
    out = tmp_path / study_dir.name
    shutil.copytree(study_dir, out)
    before = study_files(out)
    args = ["tune", "--config", str(tiny), "--data", str(phantom), "--out", str(out), "--n-trials", "1"]
    result = runner.invoke(app, [*args, "--study-name", "other"], terminal_width=1000)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert (
        f"--out {out}: its study.db holds the study 'tiny-study', not 'other' (--study-name)" in result.output
    )
    assert "--study-name 'tiny-study' to add trials" in result.output
    assert study_files(out) == before  # no study 'other' in study.db, trials.csv not rewritten
    # another storage: the folder's trials/ are no trials of the study there
    storage = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    result = runner.invoke(app, [*args, "--storage", storage], terminal_width=1000)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"--out {out}: trials/ holds runs of another study (trial-0000, trial-0001, trial-0002)" in (
        result.output
    )
    assert study_files(out) == before and optuna.get_all_study_names(storage) == []


@pytest.mark.parametrize("name", ["q?x=1", "pc%41", "ha#sh"])
def test_an_out_folder_name_with_url_characters_keeps_its_study_inside(tiny, phantom, tmp_path, name):
    from sqlalchemy.engine import make_url  # SQLAlchemy comes with optuna

    out = tmp_path / name
    log = io.StringIO()
    run_tune(out, tiny, console=Console(file=log, width=1000), data_dir=phantom, n_trials=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written beside --out
    announced = log.getvalue().split(" in ", 1)[1].split(": 0 trials so far")[0]
    assert make_url(announced).database == str((out / "study.db").resolve())
    study = optuna.load_study(study_name=name, storage=announced)  # the announced URL is usable
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"overrides": {"data.exclude_double_tears": False}}, "data.exclude_double_tears: True -> False"),
        ({"mode": "separate"}, "model.name (--mode): 'shared' -> 'separate'"),
        ({"overrides": {"train.max_epochs": 3}}, "train.max_epochs: 2 -> 3"),  # the pruner's steps too
        ({"seed": 1}, "train.seed (--seed): 0 -> 1"),
    ],
)
def test_a_rerun_with_another_fixed_setting_is_refused(tiny, study_dir, tmp_path, phantom, change, named):
    out = tmp_path / study_dir.name
    shutil.copytree(study_dir, out)
    before = study_files(out)
    options = {"mode": "shared", "data_dir": phantom, "n_trials": 1} | change
    with pytest.raises(ConfigError, match="holds trials of other settings") as refused:
        run_tune(out, tiny, **options)
    assert f"({named})" in str(refused.value)
    assert study_files(out) == before


def test_a_search_whose_categorical_choices_changed_is_refused_before_a_trial(
    tiny, study_dir, tmp_path, phantom
):
    """train.weighting's choices are the registered weightings: a plug-in registered since the study
    began changes them, which Optuna refuses only inside a started trial. Refused by key up front."""
    out = tmp_path / study_dir.name
    shutil.copytree(study_dir, out)
    before = study_files(out)
    grown = tuple(
        Param(p.key, choices=(*p.choices, "half")) if p.key == "train.weighting" else p for p in SEARCH_SPACE
    )
    with pytest.raises(ConfigError, match="its trials searched train.weighting over fixed, uncertainty, this "
                       "search over fixed, uncertainty, half"):  # fmt: skip
        run_tune(out, tiny, mode="shared", data_dir=phantom, n_trials=1, space=grown)
    assert study_files(out) == before


def test_the_same_setup_spelled_otherwise_adds_trials(tiny, study_dir, tmp_path, phantom, monkeypatch):
    out = tmp_path / study_dir.name
    shutil.copytree(study_dir, out)
    monkeypatch.chdir(phantom.parent)
    # a relative --data naming the same folder; a setting of how trials run, not of what they learn
    options = {"data_dir": Path(phantom.name), "overrides": {"train.eval_batch_size": 16}}
    study = run_tune(out, tiny, mode="shared", n_trials=1, **options)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert study.user_attrs["fixed_config"]["data.path"] == str(phantom.resolve())
    assert "train.eval_batch_size" not in study.user_attrs["fixed_config"]


def test_a_study_without_a_recorded_setup_is_checked_on_its_mode_then_recorded(
    tiny, tmp_path, phantom, data64
):
    out = tmp_path / "legacy"
    out.mkdir()
    # what tune recorded before it recorded the fixed config: the mode and the epochs per network
    legacy = optuna.create_study(
        storage=f"sqlite:///{out / 'study.db'}", study_name="legacy", direction="maximize"
    )
    legacy.set_user_attr("mode", "shared")
    legacy.set_user_attr("epochs_per_network", 2)
    with pytest.raises(ConfigError, match=r"\(model.name \(--mode\): 'shared' -> 'separate'\)"):
        run_tune(out, tiny, mode="separate", data_dir=phantom, n_trials=1)
    assert "fixed_config" not in legacy.user_attrs  # a refused search records nothing
    study = run_tune(out, tiny, mode="shared", data_dir=phantom, n_trials=1, space=())
    assert len(study.trials) == 1 and study.user_attrs["fixed_config"]["data.path"] == str(phantom.resolve())
    with pytest.raises(ConfigError, match="data.path"):  # recorded: other data is refused from now on
        run_tune(out, tiny, mode="shared", data_dir=data64, n_trials=1, space=())


# two trials with nothing searched (space=()): optuna's importance plot has nothing to rank
@pytest.mark.filterwarnings("ignore:Target and region quantiles:UserWarning", "ignore:No artists:UserWarning")
def test_a_key_added_to_the_config_since_a_study_was_recorded_counts_as_its_default(tiny, tmp_path, phantom):
    # A newer version's config has a key the study's record lacks: its trials ran with the default.
    out = tmp_path / "older"
    run_tune(out, tiny, mode="shared", data_dir=phantom, n_trials=1, space=())
    study = optuna.load_study(storage=f"sqlite:///{out / 'study.db'}", study_name="older")
    recorded = dict(study.user_attrs["fixed_config"])
    del recorded["model.roi"]  # as if model.roi came after the study (its default: none)
    study.set_user_attr("fixed_config", recorded)
    assert len(run_tune(out, tiny, mode="shared", data_dir=phantom, n_trials=1, space=()).trials) == 2
    with pytest.raises(ConfigError, match=r"model.roi: 'none' -> 'classical'"):  # another value differs
        run_tune(
            out,
            tiny,
            mode="shared",
            data_dir=phantom,
            n_trials=1,
            space=(),
            overrides={"model.roi": "classical"},
        )


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


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_a_trial_error_that_is_not_ours_is_a_message_naming_the_trial(
    tiny, phantom, tmp_path, monkeypatch, n_jobs
):
    def crash(config, run_dir, **kwargs):  # as matplotlib failed when threads drew at once
        raise ValueError("\n$\\mathdefault{10^{-4}}$\n^\nParseException: Expected end of text")

    monkeypatch.setattr(tune_module, "train_run", crash)
    out = tmp_path / "crashed"
    args = ["tune", "--config", str(tiny), "--data", str(phantom), "--out", str(out), "--n-trials", "2"]
    result = runner.invoke(app, [*args, "--n-jobs", str(n_jobs)], terminal_width=1000)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    # with 2 jobs either trial may have failed first: the message names the one it reports
    named = re.search(r"error: trial (\d) failed \(ValueError: (.+?)\); its folder: (\S+)", result.output)
    assert named, result.output
    assert named[2] == "$\\mathdefault{10^{-4}}$ ^ ParseException: Expected end of text"
    assert named[3] == str(out / "trials" / f"trial-{int(named[1]):04d}")
    assert [row["state"] for row in read_trials(out)] == ["FAIL"] * (1 if n_jobs == 1 else 2)


def test_trials_in_threads_draw_their_training_curves_one_at_a_time(tmp_path):
    """Matplotlib's text rendering is not thread-safe: --n-jobs trials drawing their curves at once
    failed at random (a mathtext ParseException on the log-scale learning-rate axis)."""
    from mtl_meniscus.evaluation.plots import plot_training_curves

    history = [
        {"member": "shared", "epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "val_auc_fissure": 0.6}
        | {"val_score": 0.6, "lr": 1e-3 * 0.5**e}
        for e in (1, 2, 3)
    ]
    errors = []

    def draw(worker: int) -> None:
        try:
            for k in range(2):
                plot_training_curves(
                    history, tmp_path / f"curves-{worker}-{k}.png", {"shared": {"best_epoch": 2}}
                )
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=draw, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(list(tmp_path.glob("curves-*.png"))) == 8 and len(list(tmp_path.glob("curves-*.pdf"))) == 8


def test_parallel_trials_with_wandb_are_refused(tiny, phantom, tmp_path):
    with pytest.raises(ConfigError, match="--n-jobs 2 with wandb"):
        run_tune(tmp_path / "t", tiny, data_dir=phantom, n_trials=2, n_jobs=2, wandb_mode="offline")
    assert not (tmp_path / "t").exists()  # refused before --out and its study.db were made


def test_a_search_space_bound_the_preset_refuses_is_named_before_the_study(tiny, phantom, tmp_path):
    space = (Param("train.lr", 1e-4, 3e-3, log=True), Param("train.batch_size", choices=(8, 0)))
    with pytest.raises(ConfigError, match=r"search space: train.batch_size = 0 does not fit the preset"):
        run_tune(tmp_path / "t", tiny, data_dir=phantom, n_trials=1, space=space)
    assert not (tmp_path / "t").exists()


def test_a_data_folder_typo_is_named_before_the_study(tiny, phantom, tmp_path):
    """Nothing is made: the same command with the right --data is not refused as another study's."""
    with pytest.raises(DataError, match=r"--data .*nowhere: not a data folder"):
        run_tune(tmp_path / "t", tiny, data_dir=tmp_path / "nowhere", n_trials=1)
    assert not (tmp_path / "t").exists()


# --- pruning per network -----------------------------------------------------------------------


def segments(*networks: list[float], epochs: int) -> dict[int, float]:
    """Intermediate values at tune's steps: network k's epoch e at step k x epochs + e - 1."""
    return {k * epochs + e: value for k, values in enumerate(networks) for e, value in enumerate(values)}


def running_trial(values: dict[int, float]):
    return optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, intermediate_values=values)


def test_a_stuck_cascade_network_is_pruned_though_another_network_scored_high():
    epochs = 4
    study = optuna.create_study(direction="maximize")
    for _ in range(5):  # earlier trials: fissure to 0.85, orientation to 0.9, position to 0.8
        done = segments([0.6, 0.7, 0.8, 0.85], [0.6, 0.75, 0.85, 0.9], [0.7, 0.8, 0.8, 0.8], epochs=epochs)
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE, value=0.85, intermediate_values=done
            )
        )
    per_network = tune_module.PerNetworkMedianPruner(epochs, n_startup_trials=5, n_warmup_epochs=2)
    median = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    fissure = [0.9, 0.95, 0.97, 0.97]
    # the new trial's orientation network sits at chance, judged at its epoch 4 (step 7)
    stuck = running_trial(segments(fissure, [0.5, 0.5, 0.5, 0.5], epochs=epochs))
    assert not median.prune(study, stuck)  # the bug: its fissure network's 0.97 counts
    assert per_network.prune(study, stuck)  # the fix: orientation's best 0.50 < the median 0.9
    # its fissure network alone is above the others'; orientation's epoch 2 is still warm-up
    assert not per_network.prune(study, running_trial(segments(fissure, epochs=epochs)))
    assert not per_network.prune(study, running_trial(segments(fissure, [0.5, 0.5], epochs=epochs)))
    # fewer than n_startup_trials completed trials: nothing is pruned
    assert not tune_module.PerNetworkMedianPruner(epochs, n_startup_trials=6).prune(study, stuck)


def test_with_one_network_the_pruner_decides_as_optunas_median_pruner():
    rng = np.random.default_rng(0)
    epochs = 6
    study = optuna.create_study(direction="maximize")
    per_network = tune_module.PerNetworkMedianPruner(epochs, n_startup_trials=5, n_warmup_epochs=2)
    median = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    decisions = []
    for _ in range(14):
        n_epochs = int(rng.integers(1, epochs + 1))  # a run that stopped early reports fewer epochs
        values = [float("nan") if rng.random() < 0.05 else float(v) for v in rng.uniform(0.4, 1.0, n_epochs)]
        for last in range(1, n_epochs + 1):
            trial = running_trial(dict(enumerate(values[:last])))
            decisions.append(per_network.prune(study, trial))
            assert decisions[-1] == median.prune(study, trial), (values, last)
        state = optuna.trial.TrialState.COMPLETE if rng.random() < 0.7 else optuna.trial.TrialState.PRUNED
        value = float(np.nanmax(values)) if state == optuna.trial.TrialState.COMPLETE else None
        study.add_trial(
            optuna.trial.create_trial(state=state, value=value, intermediate_values=dict(enumerate(values)))
        )
    assert True in decisions and False in decisions  # both outcomes were compared


def test_the_warm_up_outlasts_the_documented_onsets():
    """WARMUP_EPOCHS is at least the latest onset of the shared preset in the floor table of
    docs/results.md plus one (its comment says so): a rerun of the table with a later onset shows
    up here."""
    page = (ROOT / "docs" / "results.md").read_text()
    table = page.split("<!-- floor-table:start -->")[1].split("<!-- floor-table:end -->")[0]
    onsets = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) > 3 and cells[1] == "preset":
            onsets += [int(epoch) for epoch in cells[3].split(",") if epoch.strip().isdigit()]
    assert onsets and tune_module.WARMUP_EPOCHS >= max(onsets) + 1


# --- batch size at a fixed number of images per epoch ------------------------------------------


def test_steps_per_epoch_keep_the_images_per_epoch():
    assert [tune_module.steps_at_fixed_images(b, 32 * 80) for b in (16, 32, 64)] == [160, 80, 40]
    assert tune_module.steps_at_fixed_images(48, 100) == 2  # 96 images: the nearest count
    assert tune_module.steps_at_fixed_images(64, 16) == 1  # never 0 steps


def test_a_larger_batch_trains_fewer_steps_on_the_same_images(tiny, phantom, tmp_path):
    settings = yaml.safe_load(tiny.read_text())
    settings["train"] |= {"max_epochs": 1, "batch_size": 16, "steps_per_epoch": 4}  # 64 images an epoch
    preset = tmp_path / "batch16x4.yaml"
    preset.write_text(yaml.safe_dump(settings))
    out = tmp_path / "batches"
    out.mkdir()
    queued = optuna.create_study(
        storage=f"sqlite:///{out / 'study.db'}", study_name="batches", direction="maximize"
    )
    for batch_size in (16, 64):
        queued.enqueue_trial({"train.batch_size": batch_size})
    space = (tune_module.Param("train.batch_size", choices=(16, 64)),)
    study = run_tune(out, preset, mode="shared", data_dir=phantom, n_trials=2, space=space)
    steps = [trial.user_attrs["train.steps_per_epoch"] for trial in study.trials]
    assert [t.params["train.batch_size"] for t in study.trials] == [16, 64] and steps == [4, 1]
    for trial, row in zip(study.trials, read_trials(out)):
        config = yaml.safe_load((Path(trial.user_attrs["run_dir"]) / "config.yaml").read_text())
        assert config["train"]["batch_size"] * config["train"]["steps_per_epoch"] == 64
        assert int(row["train.steps_per_epoch"]) == config["train"]["steps_per_epoch"]
    # the default pruner judges per network, with the warm-up, on the preset's epochs per network
    assert isinstance(study.pruner, tune_module.PerNetworkMedianPruner)
    assert (study.pruner.epochs_per_network, study.pruner.n_warmup_epochs) == (1, tune_module.WARMUP_EPOCHS)
    assert study.user_attrs["epochs_per_network"] == 1
    # the study's fixed config holds the images per epoch, not the searched batch size or its steps
    fixed = study.user_attrs["fixed_config"]
    assert fixed["train.batch_size x train.steps_per_epoch"] == 64
    assert "train.batch_size" not in fixed and "train.steps_per_epoch" not in fixed


# --- PostgreSQL: workers on one study, a killed worker's trial ------------------------------------


def postgres_binaries() -> Path | None:
    """Debian's server binaries (/usr/lib/postgresql/<version>/bin), the newest version."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own on 127.0.0.1 (a temporary cluster, trust authentication) and a
    database in it, as a SQLAlchemy URL naming its driver. The server runs as `nobody` when the
    tests run as root: postgres refuses to run as root."""
    psycopg = pytest.importorskip(
        "psycopg", reason="the PostgreSQL driver (the [tune] extra: psycopg[binary])"
    )
    binaries = postgres_binaries()
    if binaries is None:  # .ci/run installs them; a test never installs system packages itself
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin): apt-get install postgresql")
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="mtl-tune-pg-"))  # not under pytest's root-only tmp folders
    if as_user:
        shutil.chown(folder, "nobody", "nogroup")

    def server(*args: str) -> None:
        command = [*as_user, str(binaries / args[0]), *args[1:]]
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}{done.stderr}"

    port, data = free_port(), str(folder / "data")
    try:
        # UTF8: with the C locale's default SQL_ASCII, psycopg returns bytes and SQLAlchemy fails
        server(
            "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "--locale=C", "-E", "UTF8"
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -F"  # -F: no fsync
        server("pg_ctl", "-D", data, "-l", str(folder / "server.log"), "-w", "-o", options, "start")
        try:
            with psycopg.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
            ) as connection:
                connection.execute("CREATE DATABASE optuna")
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/optuna"
        finally:
            server("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_add_trials_to_one_postgresql_study(postgres_url, tiny, data64, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    options = ["--config", str(tiny), "--data", str(data64), "--study-name", "two-workers", "--n-trials", "1"]
    # worker b spells the URL without the driver: SQLAlchemy >= 2.1 then picks psycopg as well
    storages = {"a": postgres_url, "b": postgres_url.replace("postgresql+psycopg://", "postgresql://")}
    workers = {
        name: subprocess.Popen(
            [sys.executable, "cli.py", "tune", *options, "--storage", url, "--out", str(tmp_path / name)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, url in storages.items()
    }
    for worker in workers.values():
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output
    study = optuna.load_study(study_name="two-workers", storage=postgres_url)
    assert sorted(t.number for t in study.trials) == [0, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    folders = [Path(t.user_attrs["run_dir"]).parents[1].name for t in study.trials]
    assert sorted(folders) == ["a", "b"]  # one trial of the study from each worker


def test_a_killed_workers_trial_is_marked_failed(postgres_url, tiny, data64, tmp_path):
    out = tmp_path / "killed"
    request = {"data_dir": str(data64), "storage": postgres_url, "study_name": "killed", "n_trials": 1}
    request |= {"heartbeat_s": 1}
    # a training that lasts: the trial is still training when it is killed (the same setup as the
    # later call's, which the study would refuse otherwise)
    script = (
        "import sys, time; from pathlib import Path; from mtl_meniscus.commands import tune; "
        "tune.train_run = lambda *args, **kwargs: time.sleep(600); "
        f"tune.run_tune(Path(sys.argv[1]), Path(sys.argv[2]), **{request!r})"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    worker = subprocess.Popen([sys.executable, "-c", script, str(out), str(tiny)], cwd=ROOT, env=env)
    try:
        log = out / "trials" / "trial-0000" / "train.log"
        deadline = time.monotonic() + 120
        while not log.exists() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert log.exists(), "the worker did not start its trial"
        time.sleep(1.0)  # into training, with a heartbeat sent
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    killed_at = time.monotonic()
    study = optuna.load_study(study_name="killed", storage=postgres_url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING]  # nobody said otherwise
    time.sleep(max(0.0, killed_at + 3.5 - time.monotonic()))  # its grace period: 3 heartbeats of 1 s
    # a later call (a worker of the same study) fails the stale trial before it starts its own
    later = run_tune(
        tmp_path / "later",
        tiny,
        data_dir=data64,
        storage=postgres_url,
        study_name="killed",
        n_trials=1,
        heartbeat_s=1,
    )
    states = [t.state for t in later.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    rows = read_trials(tmp_path / "later")
    assert rows[0]["state"] == "FAIL" and "no heartbeat" in rows[0]["error"]


def test_a_storage_that_fails_under_the_search_is_a_message(tiny, tmp_path, phantom, monkeypatch):
    """A full disk under study.db: Optuna's own write of a trial's failure failed too, and its
    errors (OperationalError, StorageInternalError, an AssertionError) came out as tracebacks."""
    import optuna
    import sqlalchemy.exc

    def full_disk(self, *args, **kwargs):
        raise sqlalchemy.exc.OperationalError("INSERT INTO trials", {}, Exception("database or disk is full"))

    monkeypatch.setattr(optuna.study.Study, "optimize", full_disk)
    args = [
        "tune",
        "--config",
        str(tiny),
        "--data",
        str(phantom),
        "--n-trials",
        "1",
        "--out",
        str(tmp_path / "t"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "the study's storage sqlite:///" in result.output and "database or disk is full" in result.output
