"""The segmentation task (issue 29): a decoder on the shared trunk trained from labels.csv's masks
where a row has one, masked out where it has none; its data, loss, training, metrics and export."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from support import TINY

from mtl_meniscus.config import AugmentConfig, load_config
from mtl_meniscus.data.augment import augment_image, augment_with_labels
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.data.torch_dataset import NO_MASK, SliceDataset, collate_batch
from mtl_meniscus.errors import ConfigError
from mtl_meniscus.networks.losses import segmentation_loss
from mtl_meniscus.networks.models import ContiguousGroupNorm, SegmentationTraining, build_model, segments
from mtl_meniscus.phantom.slices import write_phantom

SEGMENTATION = {"model.segmentation": True}


def _without_mask_column(source: Path, target: Path, keep_every: int | None = None) -> Path:
    """A copy of a phantom folder's labels.csv (images shared by path) without masks: none at all,
    or with `keep_every`, a mask on every keep_every-th row only (partial supervision)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("images", "masks"):
        link = target / name
        if not link.exists():
            link.symlink_to(source / name)
    with (source / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in rows[0] if keep_every is not None or c != "mask"]
    with (target / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for k, row in enumerate(rows):
            if keep_every is not None and k % keep_every:
                row = {**row, "mask": ""}
            writer.writerow(row)
    return target


@pytest.fixture(scope="module")
def phantom64(tmp_path_factory) -> Path:
    """A 48-image 64-pixel phantom with masks/ and a mask column."""
    folder = tmp_path_factory.mktemp("seg64")
    write_phantom(folder, n=48, seed=7, size=64)
    return folder


# --- config -----------------------------------------------------------------------------------


def test_segmentation_is_off_by_default_and_refused_where_it_is_not_built():
    assert load_config(TINY).model.segmentation is False
    assert load_config(TINY, SEGMENTATION).model.segmentation is True
    assert load_config(TINY, {**SEGMENTATION, "model.trunk": "plain"}).model.segmentation
    with pytest.raises(ConfigError, match="model.segmentation.*resnet18"):
        load_config(TINY, {**SEGMENTATION, "model.trunk": "resnet18"})
    # the cascade's own segmentation network (tests/test_cascade_segmentation.py)
    assert load_config(TINY, {**SEGMENTATION, "model.name": "separate"}).model.segmentation
    with pytest.raises(ConfigError, match="train.task_weights"):
        load_config(TINY, {"train.task_weights": {"segmentation": 2.0}})
    weighted = load_config(TINY, {**SEGMENTATION, "train.task_weights": {"segmentation": 2.0}})
    assert weighted.train.task_weights == {"segmentation": 2.0}


# --- data ---------------------------------------------------------------------------------------


def test_masks_are_read_only_when_asked_and_resized_with_their_images(phantom64):
    config = load_config(TINY).data
    assert prepare_data(phantom64, config).masks is None  # the main job opens no mask
    data = prepare_data(phantom64, config, masks=True)
    assert len(data.masks) == len(data.records)
    assert all(m.dtype == np.uint8 and m.shape == (64, 64) for m in data.masks)
    first = cv2.imread(str(phantom64 / data.records[0].mask), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(data.masks[0], first)

    resized = prepare_data(
        phantom64, config.model_copy(update={"image_size": 32, "size_policy": "resize"}), masks=True
    )
    assert resized.masks[0].shape == (32, 32)
    assert set(np.unique(resized.masks[0])) <= {0, 1, 2}  # nearest neighbour: labels stay labels
    np.testing.assert_array_equal(
        resized.masks[0], cv2.resize(first, (32, 32), interpolation=cv2.INTER_NEAREST)
    )


def test_rows_without_a_mask_have_none(phantom64, tmp_path):
    partial = _without_mask_column(phantom64, tmp_path / "partial", keep_every=3)
    data = prepare_data(partial, load_config(TINY).data, masks=True)
    has = [m is not None for m in data.masks]
    assert has == [bool(r.mask) for r in data.records] and 0 < sum(has) < len(has)
    none = _without_mask_column(phantom64, tmp_path / "none")
    assert all(m is None for m in prepare_data(none, load_config(TINY).data, masks=True).masks)


def test_augmentation_moves_the_mask_with_its_image():
    # a mask drawn exactly where the image is bright stays exactly there after a random affine
    image = np.zeros((64, 64), np.float32)
    mask = np.zeros((64, 64), np.uint8)
    image[20:34, 12:40], mask[20:34, 12:40] = 1000.0, 1
    image[26:30, 22:30], mask[26:30, 22:30] = 2000.0, 2
    config = AugmentConfig(rotation_deg=40, translate_frac=0.15)
    for seed in range(10):
        moved_image, moved_mask, _ = augment_with_labels(
            image, config, np.random.default_rng(seed), mask=mask
        )
        # the same draws give augment_image's image: the image path does not change with a mask
        np.testing.assert_array_equal(moved_image, augment_image(image, config, np.random.default_rng(seed)))
        assert set(np.unique(moved_mask)) <= {0, 1, 2}  # nearest neighbour, border background
        assert moved_mask.any()
        # where the warped image is (nearly) fully bright, the mask says meniscus or tear; where it is
        # dark, background (pixels on an edge are blends under bilinear interpolation: left out)
        assert np.all(moved_mask[moved_image > 999] > 0)
        assert np.all(moved_mask[moved_image < 1] == 0)
        assert np.all(moved_mask[moved_image > 1999] == 2)


def test_a_batch_carries_masks_only_for_a_segmentation_dataset(phantom64, tmp_path):
    partial = _without_mask_column(phantom64, tmp_path / "partial", keep_every=2)
    data = prepare_data(partial, load_config(TINY).data, masks=True)
    plain = SliceDataset(data.images, data.targets, "sobel", AugmentConfig())
    assert len(plain[(0, 1)]) == 2
    inputs, targets = collate_batch([plain[(k, k)] for k in range(4)])  # as before: no mask element

    dataset = SliceDataset(data.images, data.targets, "sobel", AugmentConfig(), masks=data.masks)
    inputs_m, targets_m, masks = collate_batch([dataset[(k, k)] for k in range(4)])
    assert masks.shape == (4, 64, 64) and masks.dtype == torch.int64
    has = [m is not None for m in data.masks[:4]]
    for row, with_mask in enumerate(has):
        assert (masks[row] >= 0).all() if with_mask else (masks[row] == NO_MASK).all()
    # the same images and targets either way: a mask does not change the image's augmentation
    np.testing.assert_array_equal(inputs_m[0].numpy(), inputs[0].numpy())
    np.testing.assert_array_equal(targets_m.numpy(), targets.numpy())


# --- network ------------------------------------------------------------------------------------


@pytest.mark.parametrize("trunk", ["reference", "plain"])
def test_the_decoder_gives_logits_at_input_resolution_and_forward_keeps_its_contract(trunk):
    torch.manual_seed(0)
    plain = build_model(load_config(TINY, {"model.trunk": trunk}).model)
    assert not segments(plain) and not any(k.startswith("decoder.") for k in plain.state_dict())
    model = build_model(load_config(TINY, {**SEGMENTATION, "model.trunk": trunk}).model)
    assert segments(model)
    # the classification weights are named as without a decoder: only decoder.* is added
    assert {k for k in model.state_dict() if not k.startswith("decoder.")} == set(plain.state_dict())
    x = torch.randn(3, 2, 70, 70)  # not a power of two: the decoder follows the skips' sizes
    outputs, pixels = SegmentationTraining(model)(x)
    assert pixels.shape == (3, 3, 70, 70) and torch.isfinite(pixels).all()
    assert set(outputs) == {"fissure", "orientation", "position"}
    pixels.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    model.eval()
    with torch.no_grad():
        own = model(x)  # forward: the dict of (B,) logits as always, no decoder output
        both, _ = model.forward_with_segmentation(x)
    assert set(own) == set(both) and all(torch.equal(own[t], both[t]) for t in own)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_the_decoders_group_norm_is_torchs_in_either_memory_format(dtype, memory_format):
    """ContiguousGroupNorm (computed on an NCHW copy for speed) gives nn.GroupNorm's values and
    gradients, the input's included, and hands a channels_last map back in channels_last."""
    torch.manual_seed(0)
    ours, torchs = ContiguousGroupNorm(4, 16), torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        torchs.weight.uniform_(0.5, 1.5)
        torchs.bias.uniform_(-1, 1)
    ours.load_state_dict(torchs.state_dict())
    x = (torch.randn(2, 16, 12, 12) * 3 + 1).to(dtype).contiguous(memory_format=memory_format)
    x_ours, x_torchs = x.clone().requires_grad_(), x.contiguous().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        mine, expected = ours(x_ours), torchs(x_torchs)
    assert mine.is_contiguous(memory_format=memory_format) and mine.dtype == expected.dtype
    # torch's kernels for the two formats sum in their own order: equal up to the dtype's rounding
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(mine.float(), expected.float(), atol=tolerance)
    grads = torch.autograd.grad(mine.float().square().sum(), [x_ours, ours.weight, ours.bias])
    expected_grads = torch.autograd.grad(
        expected.float().square().sum(), [x_torchs, torchs.weight, torchs.bias]
    )
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(
            got.float(), want.float(), rtol=tolerance, atol=tolerance * want.abs().max().item()
        )


# --- loss ---------------------------------------------------------------------------------------


def test_segmentation_loss_of_a_hand_computed_example():
    # uniform logits: every class 1/3 on each of the 4 pixels of [[0, 1], [1, 2]]
    # CE: log 3 per pixel. meniscus: sum p 4/3, truth 2, overlap 2/3 -> Dice (4/3 + 1) / (4/3 + 2 + 1) = 7/13
    # tear: sum p 4/3, truth 1, overlap 1/3 -> Dice (2/3 + 1) / (4/3 + 1 + 1) = 1/2
    logits = torch.zeros(2, 3, 2, 2)
    masks = torch.tensor([[[0, 1], [1, 2]], [[-1, -1], [-1, -1]]])  # row 2: no mask
    expected = math.log(3) + 1 - (7 / 13 + 1 / 2) / 2
    assert float(segmentation_loss(logits, masks)) == pytest.approx(expected, rel=1e-6)


def test_a_class_absent_from_an_images_truth_has_no_dice_term():
    """An image without a tear: its loss is the cross-entropy plus 1 minus the meniscus Dice alone
    (an absent class's Dice would reward predicting none of it), and an image without any Dice
    class has the cross-entropy alone."""
    # uniform logits on [[0, 1], [1, 0]]: meniscus sum p 4/3, truth 2, overlap 2/3 -> Dice 7/13
    logits = torch.zeros(1, 3, 2, 2)
    no_tear = torch.tensor([[[0, 1], [1, 0]]])
    assert float(segmentation_loss(logits, no_tear)) == pytest.approx(math.log(3) + 1 - 7 / 13, rel=1e-6)
    background = torch.zeros(1, 2, 2, dtype=torch.long)
    assert float(segmentation_loss(logits, background)) == pytest.approx(math.log(3), rel=1e-6)
    # and its gradient is that of CE + 1 - meniscus Dice written out, on random logits
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    segmentation_loss(logits, no_tear).backward()
    by_hand = logits.detach().clone().requires_grad_()
    probs = torch.softmax(by_hand, 1)[0, 1]  # (2, 2) meniscus
    truth = (no_tear[0] == 1).float()
    dice = (2 * (probs * truth).sum() + 1) / (probs.sum() + truth.sum() + 1)
    (torch.nn.functional.cross_entropy(by_hand, no_tear) + 1 - dice).backward()
    assert torch.allclose(logits.grad, by_hand.grad, atol=1e-6)


def test_segmentation_loss_is_masked_per_row():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 8, 8, requires_grad=True)
    masks = torch.randint(0, 3, (4, 8, 8))
    masks[1] = masks[3] = NO_MASK
    segmentation_loss(logits, masks).backward()
    assert (logits.grad[[1, 3]] == 0).all() and (logits.grad[[0, 2]] != 0).any()
    # the loss of the rows with a mask alone: rows without one change nothing
    alone = segmentation_loss(logits[[0, 2]], masks[[0, 2]])
    assert segmentation_loss(logits, masks).item() == pytest.approx(alone.item())

    none = segmentation_loss(logits, torch.full_like(masks, NO_MASK))
    assert none.item() == 0.0 and none.requires_grad  # exactly zero, still in the graph
    logits.grad = None
    none.backward()
    assert (logits.grad == 0).all()


def test_rows_without_a_mask_give_the_decoder_no_gradient():
    torch.manual_seed(0)
    model = build_model(load_config(TINY, SEGMENTATION).model).train()
    x = torch.randn(4, 2, 64, 64)
    stages = [s.detach().requires_grad_() for s in model.trunk.forward_stages(x)]
    masks = torch.randint(0, 3, (4, 64, 64))
    masks[[1, 3]] = NO_MASK
    segmentation_loss(model.decoder(x, stages), masks).backward()
    for maps in stages:  # per-row normalisation (GroupNorm): nothing flows back to rows 1 and 3
        assert (maps.grad[[1, 3]] == 0).all() and (maps.grad[[0, 2]] != 0).any()

    model.zero_grad()
    masks[:] = NO_MASK  # a batch without any mask: the decoder's weights get exactly zero
    segmentation_loss(model.decoder(x, [s.detach() for s in stages]), masks).backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in model.decoder.parameters())


# --- training -----------------------------------------------------------------------------------

# Long enough for the decoder to find the meniscus (on this phantom validation Dice ~0.55 after 3
# epochs and ~0.75 after 8, measured), with the learning-rate schedule and early stopping held off
# so that the classification score's ups and downs do not end it first.
LEARNING = {
    **SEGMENTATION,
    "train.max_epochs": 8,
    "train.steps_per_epoch": 10,
    "train.lr_patience": 20,
    "train.early_stopping_patience": 20,
}


def _history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def segmentation_run(phantom64, tmp_path_factory) -> Path:
    """A shared model with segmentation trained on the phantom's masks (the tiny preset)."""
    from rich.console import Console

    from mtl_meniscus.engine.run import train_run

    run = tmp_path_factory.mktemp("segrun") / "run"
    config = load_config(TINY, {**LEARNING, "data.path": str(phantom64)})
    train_run(config, run, console=Console(quiet=True))
    return run


def test_a_shared_model_learns_to_segment_the_meniscus(segmentation_run):
    import json

    history = _history(segmentation_run)
    dice = [float(row["val_dice_meniscus"]) for row in history]
    assert dice[0] < 0.3 and max(dice) > 0.5, dice  # it rises from nothing within a few epochs
    assert "val_dice_tear" in history[0] and "weight_segmentation" in history[0]
    assert float(history[0]["weight_segmentation"]) == 1.0  # the fixed weighting's default
    # the run's test metrics score best.pt: the best epoch by the classification score, which
    # segmentation does not move (on this phantom an early epoch, before the decoder learned)
    test = json.loads((segmentation_run / "metrics.json").read_text())["test"]["segmentation"]
    assert test["n_images"] > 0 and set(test["classes"]) == {"meniscus", "tear"}
    assert {"dice", "dice_ci95", "iou", "iou_ci95"} <= set(test["classes"]["meniscus"])


def test_evaluate_reports_dice_and_iou_with_intervals(segmentation_run, tmp_path):
    import json

    from support import _clean, app, runner

    out = tmp_path / "eval"
    last = segmentation_run / "last.pt"  # the last epoch's decoder (best.pt: see the test above)
    args = ["evaluate", str(last), "--split", "val", "--bootstrap", "50", "--tta", "0"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    _clean(result)
    assert result.exit_code == 0, result.output
    assert "segmentation" in result.output and "IoU" in result.output
    summary = json.loads((out / "metrics.json").read_text())["segmentation"]
    assert set(summary["classes"]) == {"meniscus", "tear"}
    for entry in summary["classes"].values():
        assert {"dice", "dice_ci95", "iou", "iou_ci95", "pooled_dice", "n_images"} <= set(entry)
    assert summary["classes"]["meniscus"]["dice"] > 0.3


def test_onnx_export_of_a_segmentation_model_matches_pytorch(segmentation_run, phantom64, tmp_path):
    import onnxruntime

    from mtl_meniscus.commands.export import PARITY_TOLERANCE, export_onnx
    from mtl_meniscus.data.preprocess import make_input
    from mtl_meniscus.engine.runtime import resolve_runtime
    from mtl_meniscus.engine.trained import load_trained

    report = export_onnx(segmentation_run, tmp_path / "m.onnx")
    assert report.outputs[-1] == "p_segmentation" and report.max_abs_difference <= PARITY_TOLERANCE
    data = prepare_data(phantom64, load_config(TINY).data)
    x = np.stack([make_input(image, "sobel") for image in data.images[:5]])  # (5, 2, 64, 64)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    *probs, pixels = session.run(list(report.outputs), {"x": x})
    trained = load_trained(segmentation_run, resolve_runtime("fp32", "cpu"))
    model = trained.model.to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        logits, expected = model.forward_with_segmentation(torch.from_numpy(x))
    assert pixels.shape == (5, 3, 64, 64)
    np.testing.assert_allclose(pixels, torch.softmax(expected, 1).numpy(), atol=PARITY_TOLERANCE, rtol=0)
    for task, p in zip(report.tasks, probs):
        np.testing.assert_allclose(p, torch.sigmoid(logits[task]).numpy(), atol=PARITY_TOLERANCE, rtol=0)
    # the pipeline graph (raw slices of any size) keeps its classification outputs only
    pipeline = export_onnx(segmentation_run, tmp_path / "p.onnx", pipeline=True)
    assert "p_segmentation" not in pipeline.outputs


def test_a_run_without_masks_trains_its_classification_heads(phantom64, tmp_path):
    from rich.console import Console

    from mtl_meniscus.engine.run import train_run

    folder = _without_mask_column(phantom64, tmp_path / "data")
    config = load_config(TINY, {**SEGMENTATION, "data.path": str(folder), "train.max_epochs": 2})
    metrics = train_run(config, tmp_path / "run", console=Console(quiet=True))
    assert any("no row of the train split has a mask" in w for w in metrics["warnings"])
    history = _history(tmp_path / "run")
    assert len(history) == 2 and "weight_segmentation" not in history[0]  # the loss is absent
    assert all(math.isfinite(float(row["train_loss"])) for row in history)
    assert metrics["test"].get("segmentation") is None  # nothing to score it on


def test_a_decoder_without_training_masks_is_frozen_so_torchrun_accepts_it(phantom64, tmp_path):
    """DDP (find_unused_parameters off) refuses parameters that never get a gradient: a decoder with
    no mask to learn from is frozen, and the rest of the network trains."""
    from rich.console import Console

    from mtl_meniscus.engine.members import plan_members
    from mtl_meniscus.engine.runtime import resolve_runtime
    from mtl_meniscus.engine.tracking import RunLogger
    from mtl_meniscus.engine.trainer import MemberTrainer

    folder = _without_mask_column(phantom64, tmp_path / "data")
    config = load_config(TINY, {**SEGMENTATION, "data.path": str(folder)})
    data = prepare_data(folder, config.data, masks=True)
    member = plan_members(config, data, tmp_path)[0]
    logger = RunLogger(config.wandb, tmp_path, "run", config.to_dict())
    trainer = MemberTrainer(member, config, data, resolve_runtime("fp32", "cpu"), logger, Console(quiet=True))
    model = trainer.state.model
    assert segments(model) and not trainer.segmenting
    assert not any(p.requires_grad for p in model.decoder.parameters())
    assert all(p.requires_grad for name, p in model.named_parameters() if not name.startswith("decoder."))


def test_partial_masks_train_with_the_uncertainty_weighting(phantom64, tmp_path):
    from rich.console import Console

    from mtl_meniscus.engine.run import train_run

    folder = _without_mask_column(phantom64, tmp_path / "data", keep_every=3)
    overrides = {
        **SEGMENTATION,
        "data.path": str(folder),
        "train.max_epochs": 2,
        "train.weighting": "uncertainty",
    }
    train_run(load_config(TINY, overrides), tmp_path / "run", console=Console(quiet=True))
    history = _history(tmp_path / "run")
    assert float(history[-1]["weight_segmentation"]) != 1.0  # its learnable weight moved
    assert all(math.isfinite(float(row["train_loss"])) for row in history)


def test_the_main_path_builds_no_decoder_and_its_batches_carry_no_mask(phantom64, tmp_path):
    from rich.console import Console

    from mtl_meniscus.engine.members import plan_members
    from mtl_meniscus.engine.runtime import resolve_runtime
    from mtl_meniscus.engine.tracking import RunLogger
    from mtl_meniscus.engine.trainer import MemberTrainer

    config = load_config(TINY, {"data.path": str(phantom64)})
    data = prepare_data(phantom64, config.data)
    assert data.masks is None
    member = plan_members(config, data, tmp_path)[0]
    logger = RunLogger(config.wandb, tmp_path, "run", config.to_dict())
    trainer = MemberTrainer(member, config, data, resolve_runtime("fp32", "cpu"), logger, Console(quiet=True))
    assert not trainer.segmenting and trainer.net is trainer.state.model  # no SegmentationTraining view
    assert not segments(trainer.state.model)
    assert set(trainer.state.weighting.current_weights()) == set(config.model.tasks)
    trainer.sampler.set_epoch(1)
    batch = next(iter(trainer.sampler))
    assert len(collate_batch([trainer.dataset[key] for key in batch])) == 2  # (inputs, targets)


# --- bad masks ----------------------------------------------------------------------------------


def test_bad_masks_are_named_per_row_when_training(phantom64, tmp_path):
    from support import _clean, app, runner

    folder = _without_mask_column(phantom64, tmp_path / "data", keep_every=1)
    (folder / "masks").unlink()  # its own masks folder, to spoil some of them
    bad = folder / "masks"
    bad.mkdir()
    with (folder / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        (bad / Path(row["mask"]).name).write_bytes((phantom64 / row["mask"]).read_bytes())
    cv2.imwrite(str(folder / rows[0]["mask"]), np.zeros((32, 32), np.uint8))  # wrong size
    three = np.zeros((64, 64), np.uint8)
    three[5, 5] = 3
    cv2.imwrite(str(folder / rows[1]["mask"]), three)  # a value other than 0, 1, 2
    (folder / rows[2]["mask"]).write_bytes(b"not an image")  # unreadable

    args = ["train", "--config", str(TINY), "--data", str(folder), "--set", "model.segmentation=true"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run"), "--max-epochs", "1"])
    _clean(result)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())  # the terminal wraps long lines
    assert "3 problem(s)" in text
    assert "row 2, column 'mask'" in text and "32x32 (height x width), but its image" in text
    assert "row 3, column 'mask'" in text and "value 3 (1 pixel)" in text
    assert "row 4, column 'mask'" in text
    assert not (tmp_path / "run" / "last.pt").exists()

    # a missing mask file is labels.csv's own problem, reported with or without segmentation
    (folder / rows[3]["mask"]).unlink()
    missing = runner.invoke(app, [*args, "--out", str(tmp_path / "missing"), "--max-epochs", "1"])
    _clean(missing)
    assert missing.exit_code == 1 and "row 5, column 'mask': file not found" in " ".join(
        missing.output.split()
    )
    cv2.imwrite(str(folder / rows[3]["mask"]), np.zeros((64, 64), np.uint8))

    # without segmentation no mask is opened: the same folder trains
    plain = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(TINY),
            "--data",
            str(folder),
            "--out",
            str(tmp_path / "plain"),
            "--max-epochs",
            "1",
        ],
    )
    assert plain.exit_code == 0, plain.output


@pytest.mark.slow  # torchrun with two training processes (~20 s on 2 cores)
def test_two_processes_train_a_segmenting_model_like_one(phantom64, tmp_path):
    """The segmentation loss's denominator is the global batch's count of rows with a mask and
    validation Dice is gathered over the processes: 2 processes' losses within 5% of 1 process's."""
    import os
    import subprocess
    import sys

    from support import ROOT

    settings = ["--set", "train.batch_size=16", "--set", "model.segmentation=true", "--max-epochs", "3"]
    args = ["train", "--config", str(TINY), "--data", str(phantom64), *settings]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for out, prefix in ((tmp_path / "one", [sys.executable]), (tmp_path / "two", command)):
        result = subprocess.run(
            [*prefix, str(ROOT / "cli.py"), *args, "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) <= 0.05 * float(a["train_loss"])
        assert "val_dice_meniscus" in b
