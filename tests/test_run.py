"""A training run end to end (engine/run.py) on a tiny 64-pixel phantom with the tiny preset (seconds
per run): the run folder, kill and resume, damaged run files named on resume, empty splits named
before training or warned about."""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from support import Killed, _clean, _copy_run, _split_folder, app, kill_after, runner

from mtl_meniscus.config import load_config
from mtl_meniscus.engine.checkpoint import load_checkpoint, model_from_checkpoint
from mtl_meniscus.engine.run import start_run, train_network, train_run
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.phantom.slices import write_phantom

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def phantom64(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("phantom64")
    write_phantom(folder, n=120, seed=11, size=64)
    return folder


def _config(phantom64, **overrides):
    return load_config(TINY, {"data.path": str(phantom64), **overrides})


def _quiet():
    return Console(quiet=True)


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_run_folder_contents(phantom64, tmp_path, mode):
    run = tmp_path / mode
    metrics = train_run(_config(phantom64, **{"model.name": mode}), run, console=_quiet())
    for name in (
        "config.yaml",
        "splits.csv",
        "exclusions.csv",
        "history.csv",
        "best.pt",
        "metrics.json",
        "training_curves.png",
    ):
        assert (run / name).is_file(), name
    assert (
        json.loads((run / "metrics.json").read_text())["test"]["auc"].keys() == metrics["test"]["auc"].keys()
    )
    with (run / "exclusions.csv").open() as handle:
        reasons = {row["reason"].split(":")[0] for row in csv.DictReader(handle)}
    assert reasons == {"double tear", "wrong size"}
    payload = load_checkpoint(run / "best.pt")  # weights_only=True inside
    assert payload["model_name"] == mode and payload["tasks"] == ["fissure", "orientation", "position"]
    assert payload["preprocess"] == {"edge_filter": "sobel", "image_size": 64}
    model, config = model_from_checkpoint(payload)
    out = model(torch.zeros(2, 2, 64, 64))
    assert set(out) == {"fissure", "orientation", "position"}
    if mode == "separate":
        with (run / "history.csv").open() as handle:
            members = {row["member"] for row in csv.DictReader(handle)}
        assert members == {"fissure", "orientation", "position"}
        assert (run / "members" / "orientation" / "last.pt").is_file()
        # a network of the package's own cascade loads alone (a one-task model); its last.pt, which
        # records the run's config, is one network of the cascade, not a model of its own
        images = torch.rand(2, 2, 64, 64, generator=torch.Generator().manual_seed(0))
        for task in ("fissure", "orientation"):  # fissure's network has fewer blocks than the others
            alone, config = model_from_checkpoint(load_checkpoint(run / "members" / task / "best.pt"))
            assert config.model.tasks == (task,)
            with torch.no_grad():  # the same network as the cascade's, alone
                torch.testing.assert_close(alone(images)[task], model(images)[task])
        last = run / "members" / "fissure" / "last.pt"
        with pytest.raises(MeniscusError, match="is the fissure network of a cascade run"):
            model_from_checkpoint(load_checkpoint(last), last)
    else:
        assert (run / "last.pt").is_file()


def test_member_training_data_follows_the_reference(phantom64, tmp_path):
    """Orientation and position networks train and validate on tear images only."""
    from mtl_meniscus.data.load import prepare_data
    from mtl_meniscus.engine.members import plan_members

    config = _config(phantom64, **{"model.name": "separate"})
    data = prepare_data(phantom64, config.data)
    members = {m.name: m for m in plan_members(config, data, tmp_path)}
    assert len(members["fissure"].train_indices) == len(data.indices("train"))
    for task in ("orientation", "position"):
        assert (data.targets[members[task].train_indices, 0] == 1).all()
        assert (data.targets[members[task].val_indices, 0] == 1).all()
        assert len(members[task].train_indices) == int(data.targets[data.indices("train"), 0].sum())


def test_tiny_training_lowers_the_loss(phantom64, tmp_path):
    config = _config(
        phantom64,
        **{
            "train.max_epochs": 8,
            "train.steps_per_epoch": 8,
            "train.batch_size": 16,
            "train.lr": 0.005,
            "train.early_stopping_patience": 10,
            "train.lr_patience": 10,
            "augment.rotation_deg": 0.0,
            "augment.translate_frac": 0.0,
            "model.conv_dropout": 0.0,
            "model.dense_dropout": 0.0,
        },
    )
    train_run(config, tmp_path / "run", console=_quiet())
    with (tmp_path / "run" / "history.csv").open() as handle:
        losses = [float(row["train_loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses


# the cascade with a segmentation network resumes after it finished: the classifiers' horns come
# from its restored best epoch, as they did in the uninterrupted run
CASCADE_PREDICTED = {"model.segmentation": True, "model.roi": "predicted"}


@pytest.mark.parametrize(
    "mode,crash_at,extra",
    [
        ("shared", ("shared", 2), {}),
        ("separate", ("orientation", 1), {}),
        ("separate", ("fissure", 1), CASCADE_PREDICTED),
    ],
)
def test_kill_and_resume_matches_an_uninterrupted_run(phantom64, tmp_path, mode, crash_at, extra):
    overrides = {"model.name": mode, "train.max_epochs": 4, "train.early_stopping_patience": 10, **extra}
    full = train_run(_config(phantom64, **overrides), tmp_path / "full", console=_quiet())

    with pytest.raises(Killed):
        train_run(
            _config(phantom64, **overrides),
            tmp_path / "killed",
            console=_quiet(),
            on_epoch_end=kill_after(crash_at[1], member=crash_at[0]),
        )
    assert not (tmp_path / "killed" / "metrics.json").exists()
    resumed = train_run(None, tmp_path / "killed", resume=True, console=_quiet())
    for key in ("test", "test_tta"):
        for task, value in full[key]["auc"].items():
            other = resumed[key]["auc"][task]
            assert (math.isnan(value) and math.isnan(other)) or value == other, (key, task)
    assert full["members"] == resumed["members"]
    a = load_checkpoint(tmp_path / "full" / "best.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "killed" / "best.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_networks_trained_alone_give_the_cascade_trained_in_turn(phantom64, tmp_path):
    """compare --jobs: start_run, then each network alone (here in reverse order, in one process),
    then train_run(resume=True) assembles and scores the same cascade as train_run in one go."""
    overrides = {"model.name": "separate", "train.max_epochs": 2}
    full = train_run(_config(phantom64, **overrides), tmp_path / "full", console=_quiet())
    run = tmp_path / "alone"
    start_run(_config(phantom64, **overrides), run, console=_quiet())
    assert (run / "config.yaml").is_file() and not (run / "members").exists()  # nothing trained yet
    for network in ("position", "orientation", "fissure"):
        train_network(run, network, console=_quiet())
        assert (run / "members" / network / "last.pt").is_file() and not (run / "metrics.json").exists()
    assembled = train_run(None, run, resume=True, console=_quiet())
    assert assembled["members"] == full["members"]
    assert json.dumps(assembled["test"]["auc"]) == json.dumps(full["test"]["auc"])  # NaN: undefined AUC
    with (tmp_path / "full" / "history.csv").open() as a, (run / "history.csv").open() as b:
        columns = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
        assert columns(csv.DictReader(a)) == columns(csv.DictReader(b))


def test_a_cascade_network_another_process_trains_is_not_trained_again_by_resume(phantom64, tmp_path):
    """compare --jobs trains a cascade's networks in worker processes, each holding its network's
    folder; `train --resume` on the variant meanwhile trained the same network into the same folder
    (both writing its last.pt and best.pt). It is refused, naming the folder, and nothing it would
    have written is there."""
    from mtl_meniscus.io.runlock import FolderInUseError, RunLock

    run = tmp_path / "cascade"
    start_run(_config(phantom64, **{"model.name": "separate", "train.max_epochs": 1}), run, console=_quiet())
    worker = RunLock(run / "members" / "fissure", "network folder")  # the worker training fissure
    try:
        with pytest.raises(FolderInUseError, match=r"members/fissure is in use by another process"):
            train_run(None, run, resume=True, console=_quiet())
    finally:
        worker.release()
    assert not (run / "members" / "fissure" / "last.pt").exists()
    train_run(None, run, resume=True, console=_quiet())  # free again: the cascade trains
    assert (run / "members" / "fissure" / "last.pt").is_file() and (run / "metrics.json").is_file()


def test_a_network_alone_is_refused_outside_a_started_cascade(phantom64, tmp_path):
    with pytest.raises(MeniscusError, match="no config.yaml"):
        train_network(tmp_path / "none", "fissure", console=_quiet())
    start_run(_config(phantom64), tmp_path / "shared", console=_quiet())
    with pytest.raises(MeniscusError, match="only a cascade"):
        train_network(tmp_path / "shared", "fissure", console=_quiet())
    start_run(_config(phantom64, **{"model.name": "separate"}), tmp_path / "cascade", console=_quiet())
    with pytest.raises(MeniscusError, match="no network named 'meniscus'"):
        train_network(tmp_path / "cascade", "meniscus", console=_quiet())
    with pytest.raises(MeniscusError, match="already holds a run"):
        start_run(_config(phantom64, **{"model.name": "separate"}), tmp_path / "cascade", console=_quiet())


def test_refuses_to_overwrite_a_run_and_to_resume_a_non_run(phantom64, tmp_path):
    config = _config(phantom64, **{"train.max_epochs": 1})
    train_run(config, tmp_path / "run", console=_quiet())
    with pytest.raises(MeniscusError, match="already holds a run"):
        train_run(config, tmp_path / "run", console=_quiet())
    with pytest.raises(MeniscusError, match="no config.yaml"):
        train_run(None, tmp_path / "empty", resume=True, console=_quiet())


def test_uncertainty_weighting_trains_its_log_variances(phantom64, tmp_path):
    config = _config(phantom64, **{"train.weighting": "uncertainty", "train.max_epochs": 2})
    train_run(config, tmp_path / "run", console=_quiet())
    state = load_checkpoint(tmp_path / "run" / "last.pt")["training_state"]["weighting"]
    assert set(state) == {"log_vars.fissure", "log_vars.orientation", "log_vars.position"}
    assert all(float(v) != 0.0 for v in state.values())  # moved from their initial 0
    # the weights each epoch applied are in the history, and they moved: exp(-s) != 1
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for task in ("fissure", "orientation", "position"):
        weights = [float(r[f"weight_{task}"]) for r in rows]
        assert all(w > 0 for w in weights) and weights[1] != 1.0
    fixed = tmp_path / "fixed"
    train_run(_config(phantom64, **{"train.max_epochs": 1}), fixed, console=_quiet())
    row = next(csv.DictReader((fixed / "history.csv").open()))
    assert [float(row[f"weight_{t}"]) for t in ("fissure", "orientation", "position")] == [1.0, 1.0, 1.0]


def test_wandb_offline_writes_a_run_folder(phantom64, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = _config(phantom64, **{"train.max_epochs": 1, "wandb.mode": "offline"})
    train_run(config, tmp_path / "run", console=_quiet())
    folders = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(folders) == 1
    assert list(folders[0].glob("*.wandb")), "offline run log missing"


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_the_plain_floor_trains_and_reloads_in_both_modes(phantom64, tmp_path, mode):
    from mtl_meniscus.networks.models import PlainTrunk

    run = tmp_path / mode
    metrics = train_run(
        _config(phantom64, **{"model.name": mode, "model.trunk": "plain"}), run, console=_quiet()
    )
    assert set(metrics["test"]["auc"]) == {"fissure", "orientation", "position"}
    model, config = model_from_checkpoint(load_checkpoint(run / "best.pt"))
    assert config.model.trunk == "plain"
    trunks = [m for m in model.modules() if isinstance(m, PlainTrunk)]
    assert len(trunks) == (1 if mode == "shared" else 3)
    # the summary's test AUCs come with their bootstrap intervals around them
    low, high = metrics["test_tta"]["auc_ci95"]["fissure"]
    assert low <= metrics["test_tta"]["auc"]["fissure"] <= high


def test_result_reading_names_the_data_the_interval_and_the_reference():
    from mtl_meniscus.engine.run import result_reading

    test = {"score": 0.9123, "score_ci95": [0.861, 0.952], "n_images": 112, "unit": "images"}
    line = result_reading(test, "the realistic phantom")
    assert line == (
        "test score 0.91 [0.86, 0.95] with TTA on the realistic phantom (112 images, 95% bootstrap CI); "
        "the reference reported 0.892 on real scans"
    )
    assert result_reading({**test, "score": math.nan}, "x") is None  # no score: nothing to read


def test_an_empty_training_set_is_named_before_training(tmp_path):
    _split_folder(tmp_path / "d1", ["test"] * 8)
    config = load_config(TINY, {"data.path": str(tmp_path / "d1")})
    with pytest.raises(
        MeniscusError, match=r"the train split is empty: the 'split' column .* \(train 0, val 0, test 8\)"
    ):
        train_run(config, tmp_path / "r1", console=_quiet())
    assert not (tmp_path / "r1" / "last.pt").exists()

    _split_folder(tmp_path / "d2", ["train"] * 6 + ["val"] * 2 + ["test"] * 2, tears=False)
    config = load_config(TINY, {"data.path": str(tmp_path / "d2"), "model.name": "separate"})
    with pytest.raises(MeniscusError, match="the orientation network has no training image"):
        train_run(config, tmp_path / "r2", console=_quiet())


def test_empty_val_and_test_splits_are_warned_and_recorded(tmp_path):
    _split_folder(tmp_path / "d", ["train"] * 8)
    config = load_config(TINY, {"data.path": str(tmp_path / "d"), "train.max_epochs": 1})
    console = Console(record=True, width=200)
    metrics = train_run(config, tmp_path / "r", console=console)
    text = console.export_text()
    assert "warning: [shared] no validation image (the val split is empty)" in text
    assert "warning: the test split is empty" in text
    assert "val loss undefined  AUC undefined" in text  # no validation image: no loss either (0.0000 before)
    assert "test: no test scores, the test split is empty" in text and "test + TTA" not in text
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["warnings"] == metrics["warnings"]
    # _split_folder's tears are all vertical and posterior: those two tasks train on one class
    one_class = [w for w in saved["warnings"] if "the network trains this task on one class" in w]
    assert [w.split(":")[0] for w in one_class] == ["[shared] orientation", "[shared] position"]
    assert len(saved["warnings"]) == 2 + len(one_class)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "r"), "--youden", "--bootstrap", "0"])
    _clean(result)
    assert result.exit_code == 1 and "--youden picks the threshold on the val split" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "r"), "--bootstrap", "0"])
    _clean(result)
    assert result.exit_code == 1 and "test split of" in result.output
    assert (
        "is empty (train 8 (4 tears), val 0 (0 tears), test 0 (0 tears)): choose another with --split"
        in result.output
    )


def test_a_broken_config_yaml_on_resume_is_named(run64, tmp_path):
    run = _copy_run(run64, tmp_path)
    for content in ("model: [unclosed\n", "- a list\n", "model:\n  widths: many\n"):
        (run / "config.yaml").write_text(content)
        result = runner.invoke(app, ["train", "--resume", str(run)])
        _clean(result)
        assert result.exit_code == 1 and "config.yaml" in result.output, content


def test_a_broken_splits_csv_on_resume_is_named(run64, tmp_path):
    run = _copy_run(run64, tmp_path)
    (run / "splits.csv").write_text("name,set\na.png,train\n")
    result = runner.invoke(app, ["train", "--resume", str(run)])
    _clean(result)
    assert result.exit_code == 1 and "splits.csv: damaged" in result.output


def test_a_run_whose_splits_csv_is_gone_is_not_split_again_on_resume(run64, tmp_path):
    """Without splits.csv the data was split anew, unchecked: changed data could put the run's
    training images into its test split."""
    run = _copy_run(run64, tmp_path)
    (run / "splits.csv").unlink()
    checkpoint = (run / "last.pt").read_bytes()
    result = runner.invoke(app, ["train", "--resume", str(run)])
    _clean(result)
    assert result.exit_code == 1 and "its splits.csv is gone" in result.output
    assert (run / "last.pt").read_bytes() == checkpoint and not (run / "splits.csv").exists()


def test_a_run_without_its_last_pt_is_not_started_over(run64, tmp_path):
    run = _copy_run(run64, tmp_path)
    (run / "last.pt").unlink()
    payload = torch.load(run / "best.pt", weights_only=True)
    payload["best_epoch"] = 2  # a best.pt of a later epoch: last.pt was lost, not yet written
    torch.save(payload, run / "best.pt")
    best = (run / "best.pt").read_bytes()
    result = runner.invoke(app, ["train", "--resume", str(run)])
    _clean(result)
    assert result.exit_code == 1 and "last.pt is missing, but best.pt shows that it trained" in result.output
    assert (run / "best.pt").read_bytes() == best and not (run / "last.pt").exists()


def test_a_run_stopped_between_its_first_best_pt_and_last_pt_resumes(data64, tmp_path, monkeypatch):
    """Ctrl-C (or a kill) after epoch 1's best.pt and before its last.pt left a run that --resume
    refused ('last.pt is missing, but best.pt shows that it trained'), though it had printed
    'continue with: train --resume'. That best.pt is epoch 1's: the run starts over, to the same end."""
    from mtl_meniscus.engine.training_state import MemberCheckpoints

    config = load_config(TINY, {"data.path": str(data64), "train.max_epochs": 2})
    train_run(config, tmp_path / "whole", console=Console(quiet=True))

    def interrupted(self, state, config):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(MemberCheckpoints, "save_last", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_run(config, tmp_path / "cut", console=Console(quiet=True))
    assert (tmp_path / "cut" / "best.pt").is_file() and not (tmp_path / "cut" / "last.pt").exists()
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "cut")])
    _clean(result)
    assert result.exit_code == 0, result.output
    for name in ("history.csv", "metrics.json"):
        assert _without_seconds(tmp_path / "cut" / name) == _without_seconds(tmp_path / "whole" / name), name


def _without_seconds(path: Path) -> object:
    """A run's history.csv rows or metrics.json without what the clock measures."""
    if path.suffix == ".csv":
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(path.open())]
    timed = ("seconds", "train_seconds", "wall_seconds", "images_per_s")
    return {k: v for k, v in json.loads(path.read_text()).items() if not any(t in k for t in timed)}


def test_last_pt_without_training_state_is_named(run64, tmp_path):
    run = _copy_run(run64, tmp_path)
    shutil.copy(run / "best.pt", run / "last.pt")
    result = runner.invoke(app, ["train", "--resume", str(run)])
    _clean(result)
    assert result.exit_code == 1 and "last.pt: holds no training state" in result.output
    payload = torch.load(run64 / "last.pt", weights_only=True)
    del payload["training_state"]["optimizer"]
    torch.save(payload, run / "last.pt")
    result = runner.invoke(app, ["train", "--resume", str(run)])
    _clean(result)
    assert result.exit_code == 1 and "last.pt: damaged training state" in result.output


def test_an_undefined_score_says_why():
    from mtl_meniscus.engine.run import undefined_reasons
    from mtl_meniscus.labels import DEFAULT_TASKS

    nan = float("nan")
    targets = np.array([[1, 1, 0], [1, 0, 0], [0, nan, nan], [0, nan, nan]], np.float32)  # no anterior tear
    probs = {"fissure": np.array([0.9, 0.8, 0.1, 0.2]), "orientation": np.array([0.7, 0.2, 0.5, 0.5])}
    aucs = {"fissure": 1.0, "orientation": 1.0, "position": nan}
    assert undefined_reasons(aucs, probs, targets, DEFAULT_TASKS) == ["position: not predicted by this model"]
    probs["position"] = np.array([0.1, 0.2, 0.5, 0.5])
    assert undefined_reasons(aucs, probs, targets, DEFAULT_TASKS) == [
        "position: no 'anterior' among the 2 tears it is scored on"
    ]
    # each class as a reader says it, not its label: fissure's were '0' and '1' ("no 1 among ...")
    aucs = {"fissure": nan, "orientation": nan, "position": nan}
    healthy = np.array([[0, nan, nan], [0, nan, nan]], np.float32)
    assert undefined_reasons(aucs, {t: np.array([0.2, 0.3]) for t in probs}, healthy, DEFAULT_TASKS) == [
        "fissure: no 'tear' among the 2 images it is scored on",
        "orientation: no tear to score it on",
        "position: no tear to score it on",
    ]
    # an empty split is said as such, not as tasks "not predicted by this model"
    assert undefined_reasons(aucs, {}, np.zeros((0, 3), np.float32), DEFAULT_TASKS) == [
        "no image in the split"
    ]


def test_the_end_of_train_names_the_files_and_the_next_commands(data64, tmp_path):
    from support import TINY, app, runner

    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", "--config", str(TINY), "--data", str(data64), "--out", str(out), "--max-epochs", "1"]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: best.pt, config.yaml" in result.output and "metrics.json" in result.output
    for command in (f"evaluate {out}", f"predict {out} IMAGES", f"export {out} --out model.onnx"):
        assert command in result.output


def test_resume_names_what_changed_in_the_data(tmp_path):
    """With a split column, relabelled images keep their splits: the resumed run would have gone
    on with other labels than it began with, unsaid. An image that became unreadable is named
    with its reason (the refusal named nothing: restoring the file is the fix)."""
    data = _split_folder(tmp_path / "data", ["train"] * 24 + ["val"] * 8 + ["test"] * 8)
    config = load_config(TINY, {"data.path": str(data), "train.max_epochs": 1})
    train_run(config, tmp_path / "run", console=_quiet())
    labels = (data / "labels.csv").read_text()
    (data / "labels.csv").write_text(
        labels.replace("img/0.png,0,,,train", "img/0.png,1,vertical,anterior,train")
    )
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run")])
    _clean(result)
    assert (
        result.exit_code == 1
        and "the data changed since the run started (1 relabelled (e.g. img/0.png);" in result.output
    )
    (data / "labels.csv").write_text(labels)
    png = (data / "img" / "5.png").read_bytes()
    (data / "img" / "5.png").write_bytes(png[:100])
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run")])
    _clean(result)
    assert result.exit_code == 1
    assert "1 of the run no longer kept (e.g. img/5.png: unreadable: " in result.output
    (data / "img" / "5.png").write_bytes(png)
    assert runner.invoke(app, ["train", "--resume", str(tmp_path / "run")]).exit_code == 0


def test_resume_deletes_a_checkpoints_temporary_file_left_by_a_killed_process(run64, data64, tmp_path):
    """A kill during a checkpoint's save left RUN/last.pt.<pid>.tmp (as large as a checkpoint) for
    good; a live process's temporary file is its own and stays."""
    import subprocess
    import sys

    run = _copy_run(run64, tmp_path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / f"last.pt.{int(dead.stdout)}.tmp").write_bytes(b"half a checkpoint")
        (run / f"metrics.json.{live.pid}.tmp").write_text("being written")
        result = runner.invoke(app, ["train", "--resume", str(run)])
        _clean(result)
        assert result.exit_code == 0 and f"deleted last.pt.{int(dead.stdout)}.tmp" in result.output
        assert not (run / f"last.pt.{int(dead.stdout)}.tmp").exists()
        assert (run / f"metrics.json.{live.pid}.tmp").read_text() == "being written"
        # a cascade's run folder holds its assembled best.pt, its networks' folders their own:
        # the run folder's temporary file was left after a resume that cleaned only the networks'
        cascade = tmp_path / "cascade"
        args = ["train", "--mode", "separate", "--config", str(TINY), "--data", str(data64)]
        assert runner.invoke(app, [*args, "--out", str(cascade), "--max-epochs", "1"]).exit_code == 0
        (cascade / f"best.pt.{int(dead.stdout)}.tmp").write_bytes(b"half a checkpoint")
        result = runner.invoke(app, ["train", "--resume", str(cascade)])
        _clean(result)
        assert result.exit_code == 0 and f"deleted best.pt.{int(dead.stdout)}.tmp" in result.output
        assert not (cascade / f"best.pt.{int(dead.stdout)}.tmp").exists()
    finally:
        live.kill()
        live.wait()


def test_resume_after_the_data_moved_says_how_to_point_the_run_at_it(data64, tmp_path):
    """The run reads its data from data.path in its config.yaml; `labels.csv: not found` did not
    say so, and --data is refused with --resume."""
    shutil.copytree(data64, tmp_path / "data")
    config = load_config(TINY, {"data.path": str(tmp_path / "data"), "train.max_epochs": 1})
    train_run(config, tmp_path / "run", console=_quiet())
    (tmp_path / "data").rename(tmp_path / "moved")
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run")])
    _clean(result)
    assert (
        result.exit_code == 1 and "is gone (moved?)" in result.output and "set data.path in" in result.output
    )
    saved = (tmp_path / "run" / "config.yaml").read_text()
    (tmp_path / "run" / "config.yaml").write_text(
        saved.replace(str(tmp_path / "data"), str(tmp_path / "moved"))
    )
    assert runner.invoke(app, ["train", "--resume", str(tmp_path / "run")]).exit_code == 0  # as it says


def test_train_out_refuses_a_folder_whose_files_a_run_would_replace(data64, tmp_path):
    """A finished run without its last.pt (shared without its training state) is not trained over;
    a folder holding only hidden files (.DS_Store) is as good as empty."""
    train = ["train", "--config", str(TINY), "--data", str(data64), "--max-epochs", "1", "--out"]
    run = tmp_path / "run"
    assert runner.invoke(app, [*train, str(run)]).exit_code == 0
    (run / "last.pt").unlink()
    kept = (run / "best.pt").read_bytes()
    result = runner.invoke(app, [*train, str(run)])
    _clean(result)
    assert result.exit_code == 1 and "would replace or sit beside (best.pt, metrics.json," in result.output
    assert (run / "best.pt").read_bytes() == kept
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".DS_Store").write_bytes(b"Finder's")
    assert runner.invoke(app, [*train, str(hidden)]).exit_code == 0


def test_a_run_folder_deleted_while_training_stops_it(data64, tmp_path):
    """rm -rf of the run folder after epoch 1: every later write made it anew, and the run ended
    'wrote RUN: best.pt, ...' without its config.yaml or splits.csv, so nothing could read it."""
    import shutil

    config = load_config(TINY, {"data.path": str(data64), "train.max_epochs": 3})

    def delete_after_first(member: str, epoch: int) -> None:
        if epoch == 1:
            shutil.rmtree(tmp_path / "run")

    with pytest.raises(
        MeniscusError, match=r"run: the run folder is gone \(deleted or moved while training\?\)"
    ):
        train_run(config, tmp_path / "run", console=_quiet(), on_epoch_end=delete_after_first)
    assert not (tmp_path / "run").exists()
