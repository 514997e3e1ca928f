"""What train and evaluate tell wandb: job types, one step axis per network, per-epoch task
weights, the model an evaluation scored, and the per-image table. wandb.init is replaced by a
recorder, so most tests see the calls without a server and without parsing offline files; those
about what real wandb writes (a resumed training's history) read the offline run's records."""

import csv
import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
import wandb
from rich.console import Console
from support import TINY, Killed, _clean, app, kill_after, runner

from mtl_meniscus.commands.evaluate import run_evaluation
from mtl_meniscus.config import load_config
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.engine.tracking import offline_folders
from mtl_meniscus.phantom.slices import write_phantom


class RecordedRun:
    starting_step = 0  # the steps a run holds when it starts: online, those of a resumed run

    def __init__(self, **init):
        self.init = init
        self.metrics, self.logged, self.config_updates, self.summary = [], [], {}, {}
        self.dir, self.id = init["dir"], init["id"]

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, values, step=None):
        self.logged.append(values)
        self.summary.update(values)  # as wandb's: a logged value is the summary's until replaced

    def log_artifact(self, artifact):
        pass

    def finish(self):
        pass

    @property
    def config(self):
        run = self

        class Config:
            def update(self, values, allow_val_change=False):
                run.config_updates.update(values)

        return Config()


@pytest.fixture
def recorded(monkeypatch):
    runs = []

    def init(**kwargs):
        runs.append(RecordedRun(**kwargs))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    return runs


def test_train_and_evaluate_runs_in_wandb(recorded, tmp_path):
    write_phantom(tmp_path / "data", n=80, seed=2, size=64)
    config = load_config(
        TINY,
        {
            "data.path": str(tmp_path / "data"),
            "model.name": "separate",
            "train.max_epochs": 2,
            "wandb.mode": "offline",
        },
    )
    trained = train_run(config, tmp_path / "run", console=Console(quiet=True))
    train = recorded[0]
    assert train.init["job_type"] == "train"
    for member in ("fissure", "orientation", "position"):  # one x-axis per network of the cascade
        assert (f"{member}/epoch", None) in train.metrics
        assert (f"{member}/*", f"{member}/epoch") in train.metrics
    epochs = [v for v in train.logged if "orientation/epoch" in v]
    assert [v["orientation/epoch"] for v in epochs] == [1, 2]
    assert epochs[0]["orientation/weight_orientation"] == 1.0  # the weights each epoch applied
    for member, best in trained["members"].items():  # the summary: best.pt's epoch, not the last one
        assert train.summary[f"{member}/val_score"] == best["val_score"]
        assert train.summary[f"{member}/best_epoch"] == best["best_epoch"]

    metrics = run_evaluation(
        tmp_path / "run",
        n_bootstrap=20,
        console=Console(quiet=True),
        wandb_mode="offline",
        cam_dir=tmp_path / "cams",
    )
    evaluation = recorded[1]
    assert evaluation.init["job_type"] == "evaluate"
    train_id = (tmp_path / "run" / "wandb_id.txt").read_text().strip()
    assert evaluation.config_updates["model_wandb_id"] == train_id
    assert evaluation.config_updates["model_checkpoint"] == str(tmp_path / "run" / "best.pt")
    table = next(v["predictions"] for v in evaluation.logged if "predictions" in v)
    assert table.columns[0] == "image" and table.columns[-1] == "fissure_saliency"
    with (tmp_path / "run" / "splits.csv").open(newline="") as handle:
        n_test = sum(row["split"] == "test" for row in csv.DictReader(handle))
    assert len(table.data) == n_test
    assert all(isinstance(row[-1], wandb.Image) for row in table.data)

    # grouped with its training run; settings in the config, numbers in the summary
    assert evaluation.init["group"] == train.init["group"] == "run"
    assert "tasks" not in evaluation.init["config"] and "challenge_score" not in evaluation.init["config"]
    assert evaluation.init["config"]["split"] == "test"
    assert evaluation.summary["fissure/auc"] == metrics["tasks"]["fissure"]["auc"]
    assert evaluation.summary["fissure/ece"] == metrics["tasks"]["fissure"]["calibration"]["ece"]
    assert evaluation.summary["fissure/auc_ci_low"] == metrics["tasks"]["fissure"]["auc_ci95"][0]
    logged = {key for values in evaluation.logged for key in values}
    assert {"fissure/roc", "fissure/pr", "fissure/confusion"} <= logged  # wandb's own charts
    assert {"figures/roc", "figures/pr", "figures/reliability", "figures/errors"} <= logged


def test_the_scored_model_is_recorded_in_the_offline_run_files(tmp_path):
    """Without the stand-in: a real offline evaluate run's log file names the training run's wandb
    id and the checkpoint it scored (offline wandb refuses use_artifact; the config carries it)."""
    write_phantom(tmp_path / "data", n=60, seed=3, size=64)
    config = load_config(
        TINY, {"data.path": str(tmp_path / "data"), "train.max_epochs": 1, "wandb.mode": "offline"}
    )
    train_run(config, tmp_path / "run", console=Console(quiet=True))
    console = Console(record=True, width=400)
    run_evaluation(tmp_path / "run", n_bootstrap=10, console=console, wandb_mode="offline")
    (log,) = (tmp_path / "run" / "eval-test" / "wandb").glob("offline-run-*/run-*.wandb")
    assert f"(upload: wandb sync {log.parent})" in console.export_text()  # as train says it
    training_id = (tmp_path / "run" / "wandb_id.txt").read_text().strip().encode()
    # wandb's service process writes the log; on a loaded machine it was seen to hold only its
    # header right after finish() returned (CI of 2026-11-29, beside a training job): wait for it
    deadline = time.monotonic() + 60
    while training_id not in (recorded := log.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert training_id in recorded
    assert str(tmp_path / "run" / "best.pt").encode() in recorded and b"model_wandb_id" in recorded


def test_only_a_resumed_training_continues_the_wandb_run_of_its_folder(recorded, tmp_path):
    """evaluate writes into the same folder each time (eval-test/), where wandb_id.txt names the
    last evaluation's run: a new evaluation is a run of its own, not a rewrite of that one."""
    from mtl_meniscus.config import WandbConfig
    from mtl_meniscus.engine.tracking import RunLogger

    config = WandbConfig(mode="offline", group="run", job_type="evaluate")
    for _ in range(2):  # as evaluate calls it
        RunLogger(config, tmp_path, "eval-run-test", {}).finish()
    first, second = (run.init for run in recorded)
    assert first["id"] != second["id"]
    RunLogger(config, tmp_path, "run", {}, resume=True).finish()  # as train --resume calls it
    resumed = recorded[2].init
    assert resumed["id"] == second["id"]
    assert (first["resume"], second["resume"], resumed["resume"]) == (None, None, "allow")
    assert (tmp_path / "wandb_id.txt").read_text() == second["id"]


def test_a_resumed_online_run_gets_the_restored_steps_the_server_lacks(recorded, tmp_path, monkeypatch):
    """Online, a resumed run continues on the server after the steps it received before the kill
    (starting_step): of the restored epochs, only those after them are logged again."""
    from mtl_meniscus.config import WandbConfig
    from mtl_meniscus.engine.tracking import RunLogger

    monkeypatch.setattr(RecordedRun, "starting_step", 2)
    logger = RunLogger(WandbConfig(mode="online"), tmp_path, "run", {}, resume=True)
    for epoch in (1, 2, 3):
        logger.log_restored({"shared/epoch": epoch})
    logger.log({"shared/epoch": 4})
    assert [values["shared/epoch"] for values in recorded[0].logged] == [3, 4]


def test_wandb_online_that_cannot_start_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    from mtl_meniscus.config import WandbConfig
    from mtl_meniscus.engine.tracking import RunLogger
    from mtl_meniscus.errors import MeniscusError

    def no_key(**kwargs):  # what wandb raises without an API key (or a CommError without a network)
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    with pytest.raises(
        MeniscusError, match=r"wandb online: the run could not start \(UsageError: No API key"
    ):
        RunLogger(WandbConfig(mode="online"), tmp_path, "run", {})
    with pytest.raises(wandb.errors.UsageError):  # offline failures are not online's to explain
        RunLogger(WandbConfig(mode="offline"), tmp_path, "run", {})


def test_wandb_online_waits_for_its_server_a_bounded_time(recorded, tmp_path, monkeypatch):
    """Without a network wandb's own 90 s (and 10 more) kept a run silent, Ctrl-C unheard; 20 s
    now, unless $WANDB_INIT_TIMEOUT says otherwise (wandb reads it when nothing overrides it)."""
    from mtl_meniscus.config import WandbConfig
    from mtl_meniscus.engine.tracking import INIT_TIMEOUT_SECONDS, RunLogger

    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    RunLogger(WandbConfig(mode="online"), tmp_path, "run", {})
    assert recorded[-1].init["settings"].init_timeout == INIT_TIMEOUT_SECONDS == 20
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "45")
    RunLogger(WandbConfig(mode="online"), tmp_path, "run", {})
    assert "init_timeout" not in recorded[-1].init["settings"].model_fields_set


@pytest.mark.parametrize(
    "env,mode",
    [
        ("OFFLINE", "offline"),
        (" Online ", "online"),
        ("Disabled", "disabled"),
        ("dryrun", "offline"),
        ("RUN", "online"),
    ],
)
def test_wandb_mode_from_the_environment_in_any_case(recorded, tmp_path, monkeypatch, env, mode):
    """wandb's own values of $WANDB_MODE in any case, and its old names; the variable is respelt as
    wandb wants it, since wandb reads it too and refuses 'OFFLINE'."""
    from mtl_meniscus.config import WandbConfig
    from mtl_meniscus.engine.tracking import RunLogger, resolve_wandb_mode

    monkeypatch.setenv("WANDB_MODE", env)
    assert resolve_wandb_mode(WandbConfig()) == mode
    assert resolve_wandb_mode(WandbConfig(mode="disabled")) == "disabled"  # the config's mode first
    logger = RunLogger(WandbConfig(), tmp_path, "run", {})
    if mode != "disabled":
        assert recorded[0].init["mode"] == mode
        assert os.environ["WANDB_MODE"] in ("online", "offline", "disabled")
    logger.finish()


def test_an_upper_case_wandb_mode_starts_a_real_offline_run(tmp_path, monkeypatch):
    from mtl_meniscus.config import WandbConfig
    from mtl_meniscus.engine.tracking import RunLogger

    monkeypatch.setenv("WANDB_MODE", "OFFLINE")  # wandb alone stops on it with a ValidationError
    logger = RunLogger(WandbConfig(), tmp_path, "run", {})
    assert logger.mode == "offline" and logger.folder.name.startswith("offline-run-")
    logger.finish()


@pytest.mark.parametrize("env", ["bogus", "shared"])  # shared: wandb's, not one we support
def test_a_bad_wandb_mode_stops_train_and_evaluate_before_any_work(run64, data64, tmp_path, monkeypatch, env):
    monkeypatch.setenv("WANDB_MODE", env)
    message = f"$WANDB_MODE: unknown wandb mode '{env}' (allowed, in any case: online, offline, disabled"
    # the tiny preset and its run64 log nothing (wandb.mode disabled): --wandb offline logs
    train = ["train", "--config", str(TINY), "--data", str(data64), "--out", str(tmp_path / "run")]
    evaluate = ["evaluate", str(run64), "--out", str(tmp_path / "eval")]
    for args in ([*train, "--wandb", "offline"], [*evaluate, "--wandb", "offline"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output
        _clean(result)
    assert not (tmp_path / "run").exists()
    # evaluate checks first that it can write into --out (a marker file), then wrote nothing
    assert not {"metrics.json", "predictions.csv"} & {path.name for path in (tmp_path / "eval").iterdir()}
    # disabled, wandb never starts: its variable does not matter
    result = runner.invoke(app, [*evaluate[:-1], str(tmp_path / "quiet"), "--tta", "0"])
    assert result.exit_code == 0 and (tmp_path / "quiet" / "metrics.json").is_file(), result.output


def _wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file. wandb >= 0.31 has no reader of its own (it
    dropped wandb.sdk.internal.datastore); the format is LevelDB's log: a 7-byte header, then 32 KiB
    blocks of chunks, each a 7-byte header (crc, length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, head = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", path
    records, pos, pending = [], head, b""
    while pos + head <= len(data):
        if block - pos % block < head:  # a block's last bytes are padding when no header fits
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + head])
        chunk, pos = data[pos + head : pos + head + length], pos + head + length
        if kind == 0:  # the rest of the block is zeros
            pos += -pos % block
        elif kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def _offline_run(folder: Path) -> tuple[list[tuple[int, dict]], dict]:
    """(history as [(step, {key: value})], summary as wandb ends with it) of an offline run folder,
    waiting for wandb's service to finish writing it (it may still after finish() returned)."""
    (path,) = folder.glob("run-*.wandb")
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(path)):
        assert time.monotonic() < deadline, f"{path}: no exit record after 60 s"
        time.sleep(0.5)

    def values(items) -> dict:  # "shared/epoch" comes as the nested key ("shared", "epoch")
        return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}

    history, summary = [], {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append((record.history.step.num, values(record.history.item)))
            summary.update(history[-1][1])  # wandb's summary: the last value logged, unless updated since
        elif kind == "summary":
            summary.update(values(record.summary.update))
    return history, summary


def test_offline_folders_of_a_run_id_are_found_oldest_first_with_same_second_suffixes(tmp_path):
    """wandb appends -1, -2, ... to a folder whose second is taken (a resume right after a kill);
    such folders are older starts too, and -10 comes after -2."""
    names = [
        "offline-run-20261130_151019-abc-10",
        "offline-run-20261130_151019-abc-2",
        "offline-run-20261130_151020-abc",
        "offline-run-20261130_151019-abc",
        "offline-run-20261130_151019-abcd",  # another run id that starts with this one
        "offline-run-20261130_151019-xyz",
        "run-20261130_151019-abc",  # an online run's folder
    ]
    for name in names:
        (tmp_path / name).mkdir()
    assert [folder.name for folder in offline_folders(tmp_path, "abc")] == [
        "offline-run-20261130_151019-abc",
        "offline-run-20261130_151019-abc-2",
        "offline-run-20261130_151019-abc-10",
        "offline-run-20261130_151020-abc",
    ]


def test_a_resumed_training_logs_its_whole_history_into_its_new_offline_run(data64, tmp_path):
    """Offline, wandb cannot continue a run: a resumed training writes a new folder of the same id
    (the killed run's folder may lack the last epochs, not yet written when it was killed). The new
    folder holds every epoch once, the restored ones first, at increasing steps, and the summary
    holds the best epoch's score; train names the folder to sync."""
    overrides = {"data.path": str(data64), "train.max_epochs": 3, "train.early_stopping_patience": 10}
    config = load_config(TINY, overrides | {"wandb.mode": "offline"})

    with pytest.raises(Killed):
        train_run(config, tmp_path / "run", console=Console(quiet=True), on_epoch_end=kill_after(1))
    console = Console(record=True, width=400)
    metrics = train_run(None, tmp_path / "run", resume=True, console=console)
    old, new = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "run" / "wandb_id.txt").read_text()
    # wandb appends -1 to the second folder when both starts fall in the same second
    assert old.name.endswith(run_id) and re.search(f"-{run_id}(-1)?$", new.name)
    history, summary = _offline_run(new)
    epochs = [(step, values) for step, values in history if "shared/epoch" in values]
    assert [values["shared/epoch"] for _, values in epochs] == [1, 2, 3]
    steps = [step for step, _ in history]
    assert steps == sorted(set(steps))  # each step once, increasing
    with (tmp_path / "run" / "history.csv").open(newline="") as handle:
        assert [float(row["val_score"]) for row in csv.DictReader(handle)] == [
            values["shared/val_score"] for _, values in epochs
        ]
    best = metrics["members"]["shared"]  # the summary: the best epoch's score, not the last one's
    assert summary["shared/val_score"] == best["val_score"]
    assert summary["shared/best_epoch"] == best["best_epoch"]
    printed = " ".join(console.export_text().split())
    assert f"wandb sync {new} alone:" in printed
    assert f"the older folder of this run id, {old.name}, written before --resume" in printed
