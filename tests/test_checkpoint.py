"""Checkpoints (engine/checkpoint.py): a damaged or foreign file is named, a pickle is never run,
and checkpoints saved with a setting the config now refuses still load."""

import hashlib
import json

import onnx
import torch
from support import _clean, _predict, app, runner


def test_checkpoints_trained_with_the_ignored_setting_still_load(run64, data64, tmp_path):
    payload = torch.load(run64 / "best.pt", weights_only=True)
    payload["config"]["model"].update(pretrained="/old/weights.pth", freeze_backbone=True)
    torch.save(payload, tmp_path / "old.pt")
    image = next((data64 / "images").glob("*.png"))
    result = _predict(tmp_path / "old.pt", image, out=tmp_path / "p.csv")
    assert result.exit_code == 0, result.output


def test_checkpoints_with_missing_keys_or_mismatched_weights_are_named(run64, data64, tmp_path):
    image = next((data64 / "images").glob("*.png"))
    payload = torch.load(run64 / "best.pt", weights_only=True)
    torch.save({"format_version": 1, "config": payload["config"]}, tmp_path / "keys.pt")
    result = _predict(tmp_path / "keys.pt", image, out=tmp_path / "p.csv")
    _clean(result)
    assert result.exit_code == 1 and "keys.pt: damaged checkpoint: missing state_dict" in result.output

    weights = dict(payload["state_dict"])
    name = next(k for k in weights if k.endswith("weight"))
    weights[name] = torch.zeros(3, 3)
    torch.save({**payload, "state_dict": weights}, tmp_path / "shape.pt")
    result = _predict(tmp_path / "shape.pt", image, out=tmp_path / "p.csv")
    _clean(result)
    assert result.exit_code == 1 and "shape.pt: damaged checkpoint: its weights do not fit" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "shape.pt"), "--data", str(data64)])
    _clean(result)
    assert result.exit_code == 1 and "shape.pt: damaged checkpoint" in result.output


def test_a_refused_pickle_is_not_a_checkpoint_and_no_advice_to_disable_the_safeguard(data64, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"format_version": 1, "x": Payload()}, tmp_path / "evil.pt")
    result = _predict(tmp_path / "evil.pt", next((data64 / "images").glob("*.png")), out=tmp_path / "p.csv")
    _clean(result)
    assert result.exit_code == 1 and "evil.pt: not a checkpoint of this package" in result.output
    assert "weights_only" not in result.output and "this must never run" not in result.output


def test_a_file_or_folder_that_is_not_a_run_is_called_what_it_is(data64, tmp_path):
    image = next((data64 / "images").glob("*.png"))
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04 not all of it")
    (tmp_path / "empty").mkdir()
    for run, named in (
        (image, "is a zip archive; this is another kind of file"),  # a scan given as RUN
        (data64 / "labels.csv", "is a zip archive; this is another kind of file"),
        (tmp_path / "truncated.pt", "is a zip archive; this is another kind of file, or a damaged one"),
        (data64, "is a data folder (labels.csv), not a run"),
        (tmp_path / "empty", "not a run folder (no best.pt, no config.yaml)"),
    ):
        result = _predict(run, image, out=tmp_path / "p.csv")
        _clean(result)
        assert result.exit_code == 1 and named in result.output, (run, result.output)
        assert "for safety" not in result.output and "--resume" not in result.output


def test_predict_and_evaluate_say_when_the_run_did_not_learn(run64, data64, tmp_path):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run64, run)
    metrics = json.loads((run / "metrics.json").read_text())
    image = next((data64 / "images").glob("*.png"))
    for learned, warned in ((False, True), (True, False)):
        (run / "metrics.json").write_text(json.dumps(metrics | {"learned": learned}))
        result = _predict(run, image, out=tmp_path / "p.csv")
        _clean(result)
        assert result.exit_code == 0 and ("did not learn" in result.output) == warned, result.output
    # evaluate repeats what the training warned of (here: a task trained on one class)
    warning = "[shared] position: no anterior among the 4 tears of the train split"
    (run / "metrics.json").write_text(json.dumps(metrics | {"learned": True, "warnings": [warning]}))
    args = ["evaluate", str(run), "--bootstrap", "0", "--tta", "0", "--out", str(tmp_path / "e")]
    result = runner.invoke(app, args)
    _clean(result)
    assert result.exit_code == 0 and f"warning (from training): {warning}" in result.output, result.output
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["training_warnings"] == [warning]


def test_a_checkpoint_that_cannot_be_written_is_named_and_the_training_resumes(data64, tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError ('unexpected pos ...'), which ended train
    in a traceback; the message now names the file and how to go on."""
    from support import TINY

    saves = []
    real_save = torch.save

    def disk_full_at_the_third(payload, path):  # epoch 1 writes best.pt and last.pt; then full
        saves.append(path)
        if len(saves) == 3:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 262912 vs 262800")
        real_save(payload, path)

    monkeypatch.setattr(torch, "save", disk_full_at_the_third)
    command = ["train", "--config", str(TINY), "--data", str(data64), "--out", str(tmp_path / "run")]
    result = runner.invoke(app, [*command, "--max-epochs", "2"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    output = " ".join(result.output.split())
    assert f"cannot access {tmp_path / 'run'}" in output and "the write failed" in output
    assert "train --resume RUN" in output
    assert not list((tmp_path / "run").glob("*.tmp"))
    monkeypatch.undo()
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "resumed after epoch 1" in result.output


def test_predict_evaluate_and_export_say_when_a_training_is_still_writing_the_run(run64, data64, tmp_path):
    import shutil
    import subprocess

    run = tmp_path / "run"
    shutil.copytree(run64, run)
    image = next((data64 / "images").glob("*.png"))
    trainer = subprocess.Popen(["sleep", "60"])  # a live process other than this one holds the lock
    try:
        (run / ".lock").write_text(str(trainer.pid))  # as RunLock writes its holder's pid
        result = _predict(run, image, out=tmp_path / "p.csv")
        _clean(result)
        assert result.exit_code == 0 and f"a training (pid {trainer.pid}) is still writing" in result.output
        args = ["evaluate", str(run), "--bootstrap", "0", "--tta", "0", "--out", str(tmp_path / "e")]
        assert f"a training (pid {trainer.pid}) is still writing" in runner.invoke(app, args).output
        # export says so too, and its .json names the bytes it exported
        result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "m.onnx")])
        assert result.exit_code == 0 and f"a training (pid {trainer.pid}) is still writing" in result.output
        sidecar = json.loads((tmp_path / "m.onnx.json").read_text())
        assert f"pid {trainer.pid}" in sidecar["note"]
        digest = hashlib.sha256((run / "best.pt").read_bytes()).hexdigest()
        metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
        assert sidecar["checkpoint_sha256"] == metadata["checkpoint_sha256"] == digest
        (run / "best.pt").unlink()  # before its first epoch
        result = _predict(run, image, out=tmp_path / "p.csv")
        _clean(result)
        assert result.exit_code == 1 and "no best.pt yet: a training" in result.output
    finally:
        trainer.kill()
        trainer.wait()
    (run / "best.pt").write_bytes((run64 / "best.pt").read_bytes())
    result = _predict(run, image, out=tmp_path / "p.csv")  # the lock file of a process gone: no note
    assert result.exit_code == 0 and "still writing" not in result.output
