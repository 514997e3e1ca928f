"""The cascade's own segmentation network (issue 29, separate mode): with model.segmentation the
reference cascade gets a fourth network, trained first on the images with a mask, whose horns its
classifiers crop around with model.roi predicted."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from support import TINY

from mtl_meniscus.config import load_config
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.data.preprocess import make_input
from mtl_meniscus.data.roi import HornCentres
from mtl_meniscus.engine.inference import predicted_horn_centres
from mtl_meniscus.engine.members import plan_members, run_networks
from mtl_meniscus.engine.run import start_run, train_network, train_run
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import load_trained
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.networks.models import SeparateCascade, needs_horns, predicted_horns, roi_of, segments
from mtl_meniscus.phantom.slices import write_phantom

CASCADE = {"model.name": "separate", "model.segmentation": True}
PREDICTED = {**CASCADE, "model.roi": "predicted"}
FP32 = resolve_runtime("fp32", "cpu")


@pytest.fixture(scope="module")
def phantom64(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cascade-seg64")
    write_phantom(folder, n=48, seed=7, size=64)
    return folder


def _with_masks_on(source: Path, target: Path, every: int | None) -> Path:
    """labels.csv of `source` with a mask on every `every`-th row only (None: on no row)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("images", "masks"):
        (target / name).symlink_to(source / name)
    with (source / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (target / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for k, row in enumerate(rows):
            writer.writerow(row if every is not None and k % every == 0 else {**row, "mask": ""})
    return target


def _history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_segmentation_network_comes_first_and_trains_on_the_rows_with_a_mask(phantom64, tmp_path):
    folder = _with_masks_on(phantom64, tmp_path / "partial", every=3)
    config = load_config(TINY, {**PREDICTED, "data.path": str(folder)})
    data = prepare_data(folder, config.data, masks=True)
    members = plan_members(config, data, tmp_path)
    assert [m.name for m in members] == ["segmentation", "fissure", "orientation", "position"]
    segmentation, fissure = members[0], members[1]
    assert segmentation.tasks == () and segmentation.folder == tmp_path / "members" / "segmentation"
    train, val = data.indices("train"), data.indices("val")
    with_mask = [i for i in train if data.masks[i] is not None]
    assert 0 < len(with_mask) < len(train)
    np.testing.assert_array_equal(segmentation.train_indices, with_mask)
    np.testing.assert_array_equal(segmentation.val_indices, [i for i in val if data.masks[i] is not None])
    np.testing.assert_array_equal(fissure.train_indices, train)  # the classifiers' images are as ever
    # compare counts its FLOPs with the others'; the classifiers carry no decoder
    networks = dict(run_networks(config.model))
    assert list(networks) == ["segmentation", "fissure", "orientation", "position"]
    assert segments(networks["segmentation"]) and roi_of(networks["segmentation"]) == "none"
    assert not segments(networks["fissure"]) and roi_of(networks["fissure"]) == "predicted"


def test_a_cascade_segmentation_network_without_any_mask_is_refused_by_name(phantom64, tmp_path):
    folder = _with_masks_on(phantom64, tmp_path / "none", every=None)
    config = load_config(TINY, {**CASCADE, "data.path": str(folder), "train.max_epochs": 1})
    with pytest.raises(MeniscusError, match="segmentation network trains on the rows .* with a mask"):
        train_run(config, tmp_path / "run", console=Console(quiet=True))
    assert not (tmp_path / "run" / "members").exists()


@pytest.fixture(scope="module")
def predicted_run(phantom64, tmp_path_factory) -> tuple[Path, dict[str, HornCentres | None]]:
    """A cascade with roi predicted, two tiny epochs per network, and the horns each of its
    networks' trainers was given ({network: HornCentres or None})."""
    import mtl_meniscus.engine.run as run_module

    given: dict[str, HornCentres | None] = {}

    class Recording(run_module.MemberTrainer):
        def __init__(self, member, *args, **kwargs):
            super().__init__(member, *args, **kwargs)
            given[member.name] = self.horns

    run = tmp_path_factory.mktemp("cascade-predicted") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "MemberTrainer", Recording)
        train_run(_predicted_run_config(phantom64), run, console=Console(quiet=True))
    return run, given


def _predicted_run_config(phantom64: Path):
    overrides = {**PREDICTED, "data.path": str(phantom64), "train.max_epochs": 2, "train.eval_batch_size": 5}
    # fp32 as the checks below: under bf16 (auto on an AMX CPU) a pixel on the edge of the mask can
    # flip between the run's batched pass and a check's fp32 one, moving a horn by a fraction of a pixel
    overrides["train.precision"] = "fp32"
    return load_config(TINY, overrides)


def test_networks_trained_alone_give_the_predicted_cascade_trained_in_turn(
    predicted_run, phantom64, tmp_path
):
    """compare --jobs with roi predicted: the segmentation network alone first, then its classifiers
    (here in reverse order), each cropping around the finished segmentation network's horns; then
    train_run(resume=True) assembles and scores the cascade that train_run gave in one go."""
    quiet = Console(quiet=True)
    run = tmp_path / "alone"
    start_run(_predicted_run_config(phantom64), run, console=quiet)
    with pytest.raises(MeniscusError, match="segmentation network has not finished training"):
        train_network(run, "fissure", console=quiet)
    train_network(run, "segmentation", console=quiet)
    for network in ("position", "orientation", "fissure"):
        train_network(run, network, console=quiet)
    train_run(None, run, resume=True, console=quiet)
    assembled, full = (
        json.loads((folder / "metrics.json").read_text()) for folder in (run, predicted_run[0])
    )
    for key in ("members", "test", "test_tta"):
        assert assembled[key] == full[key]
    without_seconds = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert without_seconds(_history(run)) == without_seconds(_history(predicted_run[0]))


def test_the_segmentation_network_is_scored_by_its_mean_dice(predicted_run):
    run, _ = predicted_run
    history = _history(run)
    assert [row["member"] for row in history] == [
        "segmentation", "segmentation", "fissure", "fissure", "orientation", "orientation",
        "position", "position",
    ]  # fmt: skip
    for row in history[:2]:
        dice = [float(row["val_dice_meniscus"]), float(row["val_dice_tear"])]
        defined = [d for d in dice if not math.isnan(d)]
        assert float(row["val_score"]) == pytest.approx(np.mean(defined))
        assert math.isnan(float(row["val_loss"])) and math.isnan(float(row["val_auc_fissure"]))
        assert row["roi_fallbacks"] == ""  # it crops nothing; the classifiers' rows have the share
    assert all(0 <= float(row["roi_fallbacks"]) <= 1 for row in history[2:])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["members"]["segmentation"]["learned"] is None  # no chance bar: not a classifier's question
    assert metrics["test"]["segmentation"]["n_images"] > 0
    assert metrics["test"]["roi"]["horns"] == "predicted"
    assert metrics["test"]["roi"]["images"] == metrics["test"]["n_images"]


def test_the_cascades_classifiers_crop_around_its_segmentation_networks_horns(predicted_run):
    model = load_trained(predicted_run[0], FP32).model.eval()
    assert isinstance(model, SeparateCascade) and model.tasks == ("fissure", "orientation", "position")
    segmenter = model.networks["segmentation"]
    assert segments(model) and segments(segmenter) and not len(segmenter.heads)
    assert not any(segments(network) for network in model.classifiers)
    # a classifier alone is called with horns; the cascade finds them itself
    assert all(needs_horns(network) for network in model.classifiers) and not needs_horns(model)
    torch.manual_seed(0)
    x = torch.randn(3, 2, 64, 64)
    with torch.no_grad():
        out = model(x)
        horns = predicted_horns(segmenter.segment(x))
        for task, network in zip(model.tasks, model.classifiers):
            assert torch.equal(out[task], network(x, horns)[task])
        logits, pixels = model.forward_with_segmentation(x)
    assert torch.equal(pixels, segmenter.segment(x)) and all(torch.equal(logits[t], out[t]) for t in out)


def test_the_classifiers_trained_on_the_trained_segmentation_networks_horns(predicted_run, phantom64):
    """Every classifier's trainer was given each row's horns as the finished segmentation network
    (its restored best epoch, the one in best.pt) finds them on the row's image; image by image,
    whatever the batch."""
    run, given = predicted_run
    assert given["segmentation"] is None  # it crops nothing
    horns = given["fissure"]
    assert horns is given["orientation"] is given["position"] and horns.source == "predicted"
    trained = load_trained(run, FP32)
    segmenter = trained.model.networks["segmentation"].eval()
    edge_filter = trained.config.preprocess.edge_filter
    images = prepare_data(phantom64, trained.config.data).images
    assert len(horns) == len(images)
    for k in (0, 4, len(images) - 1):
        x = torch.from_numpy(make_input(images[k], edge_filter))[None]
        with torch.no_grad():
            one = predicted_horns(segmenter.segment(x))[0].numpy()
        np.testing.assert_allclose(horns[k], one, atol=1e-4)
    assert horns.not_found() == sum(not horns[k][:, 2].all() for k in range(len(images)))
    centres = predicted_horn_centres(segmenter, images[:7], edge_filter, FP32, batch_size=3)  # 3 batches
    view = HornCentres.found_by_network(images[:7], centres).subset([2, 5])
    np.testing.assert_allclose(view[1], horns[5], atol=1e-4)
    with pytest.raises(ValueError, match="6 horn centres for 7 images"):
        HornCentres.found_by_network(images[:7], centres[:6])


def test_validating_the_segmentation_network_predicts_masks_only(phantom64, monkeypatch):
    from mtl_meniscus.config import SEGMENTATION
    from mtl_meniscus.engine import validation
    from mtl_meniscus.networks.models import build_single_task

    config = load_config(TINY, {**CASCADE, "data.path": str(phantom64)})
    data = prepare_data(phantom64, config.data, masks=True)
    network = build_single_task(config.model, SEGMENTATION)

    def no_tasks_to_classify(*args, **kwargs):
        raise AssertionError("a network without a task was asked for task probabilities")

    monkeypatch.setattr(validation, "predict_probs", no_tasks_to_classify)
    result = validation.validate(network, data, data.indices("val"), config, FP32)
    assert result["finite"] and result["auc"] == {} and math.isnan(result["loss"])
    assert result["score"] == pytest.approx(np.nanmean(list(result["dice"].values())))


def test_a_network_without_a_task_has_no_task_denominators_under_torchrun():
    from mtl_meniscus.engine.distributed import Distributed
    from mtl_meniscus.labels import DEFAULT_TASKS

    two = Distributed(rank=0, world=2)  # no process group is needed for a network without a task
    assert two.active and two.loss_denominators(torch.zeros(4, 3), [], DEFAULT_TASKS, "per-image") == {}


def test_still_improving_is_the_classifiers_question():
    from mtl_meniscus.commands.compare.statistics import still_improving

    ended = {"epochs": 10, "best_epoch": 4}
    rising = {"epochs": 10, "best_epoch": 10}
    result = {"max_epochs": 10, "best": {"segmentation": rising, "fissure": ended, "position": ended}}
    assert not still_improving(result)  # a Dice still rising says nothing about classification
    assert still_improving({**result, "best": {**result["best"], "position": rising}})


def test_a_cascade_with_a_segmentation_network_exports_its_masks(phantom64, tmp_path):
    from mtl_meniscus.commands.export import PARITY_TOLERANCE, export_onnx

    run = tmp_path / "run"
    config = load_config(TINY, {**CASCADE, "data.path": str(phantom64), "train.max_epochs": 1})
    train_run(config, run, console=Console(quiet=True))
    report = export_onnx(run, tmp_path / "m.onnx")
    assert report.outputs[-1] == "p_segmentation" and report.max_abs_difference <= PARITY_TOLERANCE
