"""ROI-first classification (issue 29, model.roi): crops around the two meniscus horns, found from the
run's own decoder, the classical pipeline or the true mask, classified with the whole image; and
compare's third axis (--roi, --segmentation)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from support import TINY, _clean, app, runner

from mtl_meniscus.commands.compare import parse_on_off, plan_variants, variant_config
from mtl_meniscus.commands.compare.plan import Variant, baseline_group
from mtl_meniscus.commands.compare.settings import CompareConfig, load_compare_config
from mtl_meniscus.config import AugmentConfig, load_config, roi_crop_pixels
from mtl_meniscus.data.augment import affine_matrix, apply_affine, move_points, sample_affine
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.data.roi import Box, HornCentres, crop_around, horn_boxes_from_mask
from mtl_meniscus.data.torch_dataset import SliceDataset, collate_batch
from mtl_meniscus.engine.run import train_run
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import load_trained
from mtl_meniscus.errors import ConfigError, MeniscusError
from mtl_meniscus.networks.flops import flops_per_image
from mtl_meniscus.networks.models import (
    HORN_FALLBACK,
    build_model,
    horn_crops,
    predicted_horns,
    reset_roi_fallbacks,
    roi_fallback_counts,
)
from mtl_meniscus.phantom.slices import write_phantom

CROP = roi_crop_pixels(96, 64)  # the default crop at the tiny preset's 64 px: 24 px


@pytest.fixture(scope="module")
def phantom64(tmp_path_factory) -> Path:
    """A 48-image 64-pixel phantom with masks/ and a mask column."""
    folder = tmp_path_factory.mktemp("roi64")
    write_phantom(folder, n=48, seed=7, size=64)
    return folder


@pytest.fixture(scope="module")
def phantom256(tmp_path_factory) -> Path:
    """24 phantom images at the size the classical horn search was built for (on 64-pixel phantom
    images it finds both horns in about 60% only: 91 of 148 measured)."""
    folder = tmp_path_factory.mktemp("roi256")
    write_phantom(folder, n=24, seed=7, size=256)
    return folder


def _without_masks(source: Path, target: Path) -> Path:
    """A copy of a phantom folder's labels.csv without its mask column (images shared by path)."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "images").symlink_to(source / "images")
    with (source / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    with (target / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[c for c in rows[0] if c != "mask"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return target


def _horn_regions(mask: np.ndarray) -> list[np.ndarray]:
    """(H, W) bool of each horn of a mask (its two largest meniscus regions), anterior first."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    boxes = {Box(*stats[k, :2], *(stats[k, :2] + stats[k, 2:4])): k for k in range(1, count)}
    return [labels == boxes[box] for box in horn_boxes_from_mask(mask)]


# --- config -----------------------------------------------------------------------------------


def test_roi_is_off_by_default_and_refused_by_name_where_it_cannot_work():
    config = load_config(TINY)
    assert config.model.roi == "none" and not config.model.reads_masks
    assert load_config(TINY, {"model.roi": "truth"}).model.reads_masks
    with pytest.raises(ConfigError, match="model.roi.*predicted.*model.segmentation"):
        load_config(TINY, {"model.roi": "predicted"})
    assert load_config(TINY, {"model.roi": "predicted", "model.segmentation": True}).model.roi == "predicted"
    with pytest.raises(ConfigError, match="model.roi"):  # exams have no masks (classical: test_exam_training)
        load_config(TINY, {"model.roi": "truth", "data.layout": "mrnet", "data.path": "/x"})
    with pytest.raises(ConfigError, match="model.roi_crop.*at least 64"):  # 16 px at 64: 4 conv blocks
        load_config(TINY, {"model.roi": "classical", "model.roi_crop": 32})
    with pytest.raises(ConfigError, match="model.roi_crop.*plain"):  # five blocks need 32 px
        load_config(TINY, {"model.roi": "classical", "model.trunk": "plain"})


# --- the horns in the dataset -------------------------------------------------------------------


@pytest.mark.parametrize("source", ["truth", "classical"])
def test_the_datasets_crops_contain_the_masks_horns_on_phantom_images(phantom256, source):
    """Through the training path: each row's horns (found once on the image as stored) move with the
    image under augmentation, and the model's crops around them hold the whole horn of the augmented
    mask, the anterior horn in the first crop and the posterior in the second."""
    data = prepare_data(phantom256, load_config(None).data, masks=True)
    horns = HornCentres(source, data.images, data.masks)
    augment = AugmentConfig(rotation_deg=15, translate_frac=0.1)
    dataset = SliceDataset(data.images, data.targets, "sobel", augment, masks=data.masks, horns=horns)
    crop_size = roi_crop_pixels(96, 256)
    found, held = 0, []
    for k in range(len(data.images)):
        (x, centres), _, mask = collate_batch([dataset[(k, 100 + k)]], horns=True)
        assert x.shape == (1, 2, 256, 256) and centres.shape == (1, 2, 3) and mask.shape == (1, 256, 256)
        if not centres[0, 0, 2]:
            continue
        found += 1
        for side, region in enumerate(_horn_regions(mask[0].numpy())):  # anterior, then posterior
            pixels = torch.from_numpy(region.astype(np.float32))[None, None]  # (1, 1, H, W)
            crop = horn_crops(pixels, centres[:, side : side + 1, :2], crop_size)  # (1, 1, S, S)
            held.append(float(crop.sum()) == float(region.sum()))
    if source == "truth":
        assert found == len(data.images) and all(held)  # every phantom mask has both horns
    else:  # the classical pipeline: found in most images, then on target
        assert found >= 0.9 * len(data.images), f"horns found in {found} of {len(data.images)}"
        assert np.mean(held) >= 0.9, f"{sum(held)} of {len(held)} horns held"


def test_the_horns_are_found_once_per_image_and_shared_by_subsets(phantom64, monkeypatch):
    data = prepare_data(phantom64, load_config(TINY).data)
    calls = []
    import mtl_meniscus.data.roi as roi

    real = roi.find_horns_classical
    monkeypatch.setattr(roi, "find_horns_classical", lambda image: calls.append(1) or real(image))
    horns = HornCentres("classical", data.images)
    first = horns[3].copy()
    view = horns.subset([5, 3])
    np.testing.assert_array_equal(view[1], first)  # row 3, found once: the view shares it
    assert len(view) == 2 and len(calls) == 1
    view[0]
    assert len(calls) == 2 and 5 in horns._found
    with pytest.raises(MeniscusError, match="model.roi truth"):
        HornCentres("truth", data.images)  # no masks read


def test_augmentation_moves_the_horn_centres_with_the_image():
    """A point's pixel lands where move_points puts the point, under rotation and shift."""
    config = AugmentConfig(rotation_deg=40, translate_frac=0.15)
    for seed in range(10):
        image = np.zeros((64, 64), np.float32)
        image[20, 30] = 1.0  # pixel (row 20, column 30): its centre is (x, y) = (30.5, 20.5)
        params = sample_affine(config, 64, 64, np.random.default_rng(seed))
        moved = apply_affine(image, params)
        y, x = np.unravel_index(np.argmax(moved), moved.shape)
        point = move_points(np.array([[30.5, 20.5]]), params, 64, 64)[0]
        assert abs(point[0] - (x + 0.5)) <= 1 and abs(point[1] - (y + 0.5)) <= 1
        exact = affine_matrix(params, 64, 64) @ np.array([30.0, 20.0, 1.0])  # OpenCV's pixel centres
        np.testing.assert_allclose(point, exact + 0.5, atol=1e-4)


# --- the network --------------------------------------------------------------------------------


def test_roi_none_builds_exactly_the_model_it_always_was():
    torch.manual_seed(0)
    default = build_model(load_config(TINY).model)
    torch.manual_seed(0)
    none = build_model(load_config(TINY, {"model.roi": "none"}).model)
    assert all(k.startswith(("trunk.", "heads.")) for k in none.state_dict())
    assert default.state_dict().keys() == none.state_dict().keys()
    assert all(torch.equal(default.state_dict()[k], v) for k, v in none.state_dict().items())
    assert not hasattr(none, "crop_trunk") and none.roi == "none"
    # a ROI model adds the crop trunk only (its fallback counts are not saved)
    classical = build_model(load_config(TINY, {"model.roi": "classical"}).model)
    added = set(classical.state_dict()) - set(none.state_dict())
    assert added and all(k.startswith("crop_trunk.") for k in added)
    assert {k for k in classical.state_dict() if not k.startswith(("crop_trunk.", "heads."))} == {
        k for k in none.state_dict() if not k.startswith("heads.")
    }


def test_crops_are_the_data_layers_crops_and_a_missing_horn_takes_the_fallback_window():
    rng = np.random.default_rng(0)
    image = rng.random((64, 64)).astype(np.float32)
    x = torch.from_numpy(image)[None, None]
    centres = torch.tensor([[[3.5, 60.0], [40.0, 31.5]]])  # the first one reaches past two edges
    crops = horn_crops(x, centres, CROP)  # (2, 1, CROP, CROP)
    for crop, box in zip(crops, (Box(3, 59, 4, 61), Box(39, 31, 41, 32))):  # boxes with these centres
        np.testing.assert_array_equal(crop[0].numpy(), crop_around(image, box, CROP)[0])

    torch.manual_seed(0)
    model = build_model(load_config(TINY, {"model.roi": "classical"}).model).eval()
    x = torch.randn(1, 2, 64, 64).repeat(3, 1, 1, 1)  # one image three times
    found = torch.tensor([[[20.0, 30.0, 1.0], [45.0, 30.0, 1.0]]])
    fallback = torch.tensor(HORN_FALLBACK) * 64
    missing = torch.zeros(1, 2, 3)
    with torch.no_grad():
        out = model(x, torch.cat([found, missing, torch.cat([fallback, torch.ones(2, 1)], 1)[None]]))
    assert set(out) == {"fissure", "orientation", "position"} and all(v.shape == (3,) for v in out.values())
    for task in out:  # not found (row 1) is cropped exactly where the fallback windows are (row 2)
        assert torch.allclose(out[task][1], out[task][2])
    assert roi_fallback_counts(model) == (3, 1)
    reset_roi_fallbacks(model)
    assert roi_fallback_counts(model) == (0, 0)
    with pytest.raises(MeniscusError, match="model.roi classical.*model\\(x, horns\\)"):
        model(x)
    assert flops_per_image(model, 2, 64) > flops_per_image(build_model(load_config(TINY).model), 2, 64)
    assert roi_fallback_counts(model) == (0, 0)  # counting FLOPs is not a prediction


def test_predicted_horns_are_each_sides_centroid_of_the_meniscus():
    logits = torch.zeros(2, 3, 64, 64)
    logits[:, 0] = 1.0  # background everywhere ...
    logits[0, 1, 30:34, 10:20] = 2.0  # ... but two meniscus wedges in image 0
    logits[0, 2, 28:30, 44:52] = 2.0  # (one of them a tear)
    horns = predicted_horns(logits)
    assert horns.shape == (2, 2, 3)
    np.testing.assert_allclose(horns[0].numpy(), [[15.0, 32.0, 1.0], [48.0, 29.0, 1.0]])
    assert (horns[1, :, 2] == 0).all()  # nothing found in image 1: the fallback windows

    torch.manual_seed(0)
    config = load_config(TINY, {"model.roi": "predicted", "model.segmentation": True}).model
    model = build_model(config).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, 64, 64))  # forward runs the decoder for its horns
        both, pixels = model.forward_with_segmentation(torch.randn(2, 2, 64, 64))
    assert set(out) == set(both) and pixels.shape == (2, 3, 64, 64)
    assert roi_fallback_counts(model)[0] == 4


# --- training and scoring -----------------------------------------------------------------------


def _history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def roi_runs(phantom64, tmp_path_factory) -> dict[str, Path]:
    """A shared model with classical and one with true horn crops, two tiny epochs each."""
    runs = {}
    for roi in ("classical", "truth"):
        run = tmp_path_factory.mktemp(f"roi-{roi}") / "run"
        config = load_config(TINY, {"model.roi": roi, "data.path": str(phantom64), "train.max_epochs": 2})
        train_run(config, run, console=Console(quiet=True))
        runs[roi] = run
    return runs


@pytest.mark.parametrize("roi", ["classical", "truth"])
def test_a_roi_model_trains_and_reports_its_fallbacks(roi_runs, roi):
    run = roi_runs[roi]
    history = _history(run)
    assert len(history) == 2 and all(0 <= float(row["roi_fallbacks"]) <= 1 for row in history)
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test", "test_tta"):
        entry = metrics[key]["roi"]
        assert entry["horns"] == roi and 0 <= entry["fallbacks"] <= entry["images"]
    assert metrics["test"]["roi"]["images"] == metrics["test"]["n_images"]  # each test image once
    assert metrics["test_tta"]["roi"]["images"] == 2 * metrics["test"]["n_images"]  # tiny: 1 TTA copy
    if roi == "truth":
        assert metrics["test"]["roi"]["fallbacks"] == 0  # every phantom mask has both horns
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["roi"] == roi and config["model"]["roi_crop"] == 96


def test_a_classical_roi_model_is_evaluated_and_predicts_new_images(roi_runs, phantom64, tmp_path):
    run = roi_runs["classical"]
    result = runner.invoke(app, ["evaluate", str(run), "--out", str(tmp_path / "eval"), "--bootstrap", "20"])
    _clean(result)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_images"] > 0
    trained = load_trained(run, resolve_runtime("fp32", "cpu"))
    images = prepare_data(phantom64, trained.config.data).images[:3]
    probs = trained.predict(list(images), resolve_runtime("fp32", "cpu"))  # horns found by itself
    assert all(p.shape == (3,) and np.isfinite(p).all() for p in probs.values())
    export = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "m.onnx")])
    assert export.exit_code == 1 and "export of ROI models" in export.output


def test_a_truth_roi_model_is_refused_where_no_mask_comes_with_the_images(roi_runs, tmp_path):
    result = runner.invoke(app, ["evaluate", str(roi_runs["truth"]), "--out", str(tmp_path / "eval")])
    _clean(result)
    assert result.exit_code == 1 and "model.roi truth" in " ".join(result.output.split())


def test_roi_truth_and_predicted_on_data_without_masks_are_refused_by_name(phantom64, tmp_path):
    folder = _without_masks(phantom64, tmp_path / "data")
    for overrides in ({"model.roi": "truth"}, {"model.roi": "predicted", "model.segmentation": True}):
        config = load_config(TINY, {**overrides, "data.path": str(folder), "train.max_epochs": 1})
        with pytest.raises(MeniscusError, match=f"model.roi {overrides['model.roi']}: no row"):
            train_run(config, tmp_path / overrides["model.roi"], console=Console(quiet=True))
        assert not (tmp_path / overrides["model.roi"] / "last.pt").exists()


def test_the_cascade_crops_too(phantom64, tmp_path):
    overrides = {"model.name": "separate", "model.roi": "classical", "data.path": str(phantom64)}
    config = load_config(TINY, {**overrides, "train.max_epochs": 1})
    metrics = train_run(config, tmp_path / "run", console=Console(quiet=True))
    assert metrics["test"]["roi"]["images"] == metrics["test"]["n_images"]
    assert {row["member"] for row in _history(tmp_path / "run")} == {"fissure", "orientation", "position"}
    trained = load_trained(tmp_path / "run", resolve_runtime("fp32", "cpu"))
    assert all(hasattr(network, "crop_trunk") for network in trained.model.networks.values())


# --- compare's axes -----------------------------------------------------------------------------


def test_compare_plans_the_roi_and_segmentation_axes():
    compare = CompareConfig(
        rois=("none", "classical", "predicted"), segmentation=(False, True), seeds=(0,)
    ).validate()
    names = [v.name for v in plan_variants(compare)]
    assert names == [
        "separate-reference-seed0",
        "shared-reference-seed0",
        "shared-reference-seg-seed0",  # the cascade has no decoder: planned once, without it
        "separate-reference-roi_classical-seed0",
        "shared-reference-roi_classical-seed0",
        "shared-reference-roi_classical-seg-seed0",
        # predicted trains what finds its horns: the shared model's decoder, the cascade's own network
        "separate-reference-roi_predicted-seg-seed0",
        "shared-reference-roi_predicted-seg-seed0",
    ]
    variants = plan_variants(compare)
    assert baseline_group(variants) == "separate-reference"
    # the default comparison is what it always was
    assert [v.name for v in plan_variants(CompareConfig(seeds=(0,)).validate())] == [
        "separate-reference-seed0",
        "shared-reference-seed0",
    ]
    alone = plan_variants(CompareConfig(modes=("separate",), rois=("predicted",), seeds=(0,)).validate())
    assert [v.name for v in alone] == ["separate-reference-roi_predicted-seg-seed0"]
    with pytest.raises(ConfigError, match="rois"):
        load_compare_config(None, {"rois": ["sideways"]})
    assert parse_on_off("off, on", "--segmentation") == [False, True]
    with pytest.raises(ConfigError, match="--segmentation"):
        parse_on_off("yes", "--segmentation")


def test_compare_variants_train_with_their_roi_and_segmentation_on_the_same_data():
    compare = CompareConfig(rois=("none", "truth"), segmentation=(False, True), seeds=(0, 1)).validate()
    configs = {
        v: variant_config(compare, v, {"separate": TINY, "shared": TINY}, "/d", None, "g")
        for v in plan_variants(compare)
    }
    assert len({json.dumps(c.to_dict()["data"]) for c in configs.values()}) == 1  # same splits
    for variant, config in configs.items():
        assert (config.model.roi, config.model.segmentation) == (variant.roi, variant.segmentation)
        assert config.train.seed == variant.seed
    assert (
        Variant("shared", "reference", 0, 0.5, "truth", True).group
        == "shared-reference-roi_truth-seg-train0.5"
    )


def test_cli_compare_takes_the_new_axes(tmp_path):
    result = runner.invoke(app, ["compare", "--roi", "none,sideways", "--out", str(tmp_path / "c")])
    _clean(result)
    assert result.exit_code == 1 and "rois" in result.output
    result = runner.invoke(app, ["compare", "--segmentation", "maybe", "--out", str(tmp_path / "c")])
    _clean(result)
    assert result.exit_code == 1 and "--segmentation" in result.output


def test_a_variant_trained_before_the_roi_keys_existed_is_not_other_settings(tmp_path):
    """A comparison folder of an earlier version: its variants' config.yaml lack model.roi and
    model.roi_crop, which then have their defaults, as when that run resumes."""
    from mtl_meniscus.commands.compare.plan import variant_status

    compare = CompareConfig(seeds=(0,)).validate()
    variant = plan_variants(compare)[1]
    config = variant_config(compare, variant, {"separate": TINY, "shared": TINY}, "/d", None, "g")
    saved = config.to_dict()
    del saved["model"]["roi"], saved["model"]["roi_crop"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert variant_status(tmp_path, config) == "started"
    saved["model"]["roi_crop"] = 64
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(MeniscusError, match="model.roi_crop: 64 -> 96"):
        variant_status(tmp_path, config)
