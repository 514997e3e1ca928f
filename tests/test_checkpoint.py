"""Checkpoints (engine/checkpoint.py): a damaged or foreign file is named, a pickle is never run,
and checkpoints saved with a setting the config now refuses still load."""

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
