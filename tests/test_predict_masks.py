"""`predict --masks` and evaluate's ROI hit rate (issue 29): masks at the input's own size and in its
own geometry (a mirrored DICOM gets a mirrored mask and mirrored boxes), horn boxes in the output,
overlays, exams per slice, classical boxes from a run without a decoder, and the hit rate of the
horn windows counted by hand."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from support import TINY, _clean, app, runner
from test_orientation import DICOM_VARIANTS, _series, write_dicom

from mtl_meniscus.config import load_config
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.data.roi import (
    Box,
    HornBoxes,
    find_horns_classical,
    horn_boxes_from_mask,
    tear_inside,
    window_around,
)
from mtl_meniscus.engine.horns import ROI_WINDOW_AT_256, roi_hit_rates, roi_window
from mtl_meniscus.engine.inference import predict_label_maps
from mtl_meniscus.engine.runtime import resolve_runtime
from mtl_meniscus.engine.trained import load_trained
from mtl_meniscus.io.orientation import SliceGeometry, nifti_canonical
from mtl_meniscus.phantom.exams import write_phantom_exams
from mtl_meniscus.phantom.slices import write_phantom

# As tests/test_segmentation_training.py: long enough for the decoder to find the meniscus.
LEARNING = {
    "model.segmentation": True,
    "train.max_epochs": 8,
    "train.steps_per_epoch": 10,
    "train.lr_patience": 20,
    "train.early_stopping_patience": 20,
}


@pytest.fixture(scope="module")
def phantom64(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("masks64")
    write_phantom(folder, n=48, seed=7, size=64)
    return folder


@pytest.fixture(scope="module")
def segmenting(phantom64, tmp_path_factory) -> Path:
    """The last checkpoint of a tiny shared model with a segmentation decoder (best.pt may be an
    epoch before the decoder learned: the best epoch is chosen by the classification score)."""
    from rich.console import Console

    from mtl_meniscus.engine.run import train_run

    run = tmp_path_factory.mktemp("maskrun") / "run"
    train_run(load_config(TINY, {**LEARNING, "data.path": str(phantom64)}), run, console=Console(quiet=True))
    return run / "last.pt"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _box(cell: str) -> Box:
    return Box(*(int(v) for v in cell.split()))


def _mask(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def _predict_masks(run: Path, inputs: list[Path], out: Path, masks: Path, *extra: str):
    args = ["predict", str(run), *map(str, inputs), "--out", str(out), "--tta", "0", "--masks", str(masks)]
    result = runner.invoke(app, [*args, *extra])
    _clean(result)
    assert result.exit_code == 0, result.output
    return result


def _phantom_image(phantom64: Path, k: int = 1) -> np.ndarray:
    return cv2.imread(str(phantom64 / "images" / f"knee_{k:05d}.png"), cv2.IMREAD_UNCHANGED)


# --- geometry -----------------------------------------------------------------------------------


def test_undo_inverts_every_transpose_and_flip_for_pixels_and_boxes():
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 100, (5, 8))
    for transpose, rows, columns in itertools.product((False, True), repeat=3):
        geometry = SliceGeometry("sagittal", transpose, rows, columns)
        canonical = geometry.apply(stored)
        np.testing.assert_array_equal(geometry.undo(canonical), stored)
        box = (1, 2, 4, 3)  # x0, y0, x1, y1 on the canonical slice
        marked = np.zeros(canonical.shape, bool)
        marked[box[1] : box[3], box[0] : box[2]] = True
        ys, xs = np.nonzero(geometry.undo(marked))
        expected = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert geometry.undo_box(box, canonical.shape) == expected, (transpose, rows, columns)


def test_a_nifti_slice_geometry_undoes_every_axis_order_and_flip():
    # canonical (slices, rows, columns) run right, inferior, posterior: RAS +x, -z, -y
    directions = (np.array([3.0, 0, 0]), np.array([0, 0, -0.5]), np.array([0, -0.5, 0]))
    canonical = np.random.default_rng(1).random((3, 6, 9)).astype(np.float32)
    for order in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            stored = np.transpose(canonical, order)
            for axis, flip in enumerate(flips):
                stored = np.flip(stored, axis) if flip else stored
            affine = np.eye(4)
            affine[:3, :3] = np.column_stack(
                [-directions[a] if f else directions[a] for a, f in zip(order, flips)]
            )
            volume, geometry = nifti_canonical(np.ascontiguousarray(stored), affine)
            np.testing.assert_array_equal(volume, canonical)
            axis = order.index(0)  # the stored slice axis; a stored slice keeps the other two in order
            for k in range(3):
                one = np.take(stored, 2 - k if flips[axis] else k, axis=axis)
                np.testing.assert_array_equal(geometry.undo(canonical[k]), one, err_msg=f"{order} {flips}")


# --- predict --masks ----------------------------------------------------------------------------


def test_masks_have_the_input_size_and_label_values_and_the_boxes_are_written(
    segmenting, phantom64, tmp_path
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = _phantom_image(phantom64)
    cv2.imwrite(str(inputs / "model_size.png"), image)
    # another size (and not square): resized to 64x64 for the model, its mask resized back
    cv2.imwrite(str(inputs / "larger.png"), cv2.resize(image, (96, 80), interpolation=cv2.INTER_LINEAR))
    masks = tmp_path / "masks"
    _predict_masks(segmenting, [inputs], tmp_path / "p.csv", masks)
    rows = {Path(row["image"]).stem: row for row in _rows(tmp_path / "p.csv")}
    assert list(next(iter(rows.values())))[-6:] == [
        "mask",
        "anterior_box",
        "posterior_box",
        "boxes_from",
        "error",
        "note",
    ]
    for name, shape in (("model_size", (64, 64)), ("larger", (80, 96))):
        mask = _mask(masks / f"{name}.png")
        assert mask.shape == shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1, 2} and (mask == 1).any()
        assert rows[name]["mask"] == str(masks / f"{name}.png") and rows[name]["boxes_from"] == "mask"
        anterior, posterior = _box(rows[name]["anterior_box"]), _box(rows[name]["posterior_box"])
        # the boxes are the predicted mask's horns, anterior on the left in this canonical view
        assert horn_boxes_from_mask(mask) == HornBoxes(anterior, posterior) and anterior.x1 <= posterior.x0
        overlay = cv2.imread(str(masks / "overlays" / f"{name}.png"))
        assert overlay.shape == (*shape, 3)

    # the larger input's mask is the model-size label map resized back, nearest neighbour
    trained = load_trained(segmenting, resolve_runtime("fp32", "cpu"))
    resized = cv2.resize(
        cv2.imread(str(inputs / "larger.png"), cv2.IMREAD_UNCHANGED), (64, 64), interpolation=cv2.INTER_AREA
    )
    (label_map,) = predict_label_maps(
        trained.model, [resized.astype(np.float32)], "sobel", resolve_runtime("fp32", "cpu")
    )
    expected = cv2.resize(label_map, (96, 80), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(_mask(masks / "larger.png"), expected)


def test_a_mirrored_or_transposed_dicom_gets_its_mask_and_boxes_in_its_own_geometry(
    segmenting, phantom64, tmp_path
):
    # wider than tall, so that a transpose shows; the same canonical pixels stored four ways
    canonical = np.pad(_phantom_image(phantom64), ((0, 0), (0, 16)), mode="edge")
    for variant, (stored, orientation) in DICOM_VARIANTS.items():
        write_dicom(tmp_path / "in" / f"{variant.replace(' ', '_')}.dcm", stored(canonical), orientation)
    masks = tmp_path / "masks"
    _predict_masks(segmenting, [tmp_path / "in"], tmp_path / "p.json", masks, "--json")
    rows = {
        Path(row["image"]).stem: row
        for row in map(json.loads, (tmp_path / "p.json").read_text().splitlines())
    }
    standard = rows["standard"]
    reference = _mask(masks / "standard.png")
    assert reference.shape == (64, 80) and standard["anterior_box"] and standard["posterior_box"]

    mirrored = rows["columns_reversed"]  # ImageOrientationPatient: rows run anterior, not posterior
    width = 80
    for horn in ("anterior_box", "posterior_box"):
        x0, y0, x1, y1 = standard[horn]
        assert mirrored[horn] == [width - x1, y0, width - x0, y1]  # x0' = W - x1, x1' = W - x0
    np.testing.assert_array_equal(_mask(masks / "columns_reversed.png"), reference[:, ::-1])

    for variant, (stored, _) in DICOM_VARIANTS.items():
        name = variant.replace(" ", "_")
        np.testing.assert_array_equal(_mask(masks / f"{name}.png"), stored(reference))
        assert cv2.imread(str(masks / "overlays" / f"{name}.png")).shape[:2] == stored(reference).shape
        for horn in ("anterior_box", "posterior_box"):
            x0, y0, x1, y1 = standard[horn]
            marked = np.zeros(reference.shape, bool)
            marked[y0:y1, x0:x1] = True
            ys, xs = np.nonzero(stored(marked))
            assert rows[name][horn] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], (variant, horn)


def test_a_run_without_a_decoder_gives_classical_boxes_and_no_mask(run64, phantom64, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(phantom64 / "images" / "knee_00001.png", inputs / "knee.png")
    masks = tmp_path / "masks"
    result = _predict_masks(run64, [inputs], tmp_path / "p.csv", masks)
    assert "no segmentation head" in result.output and "model.segmentation=true" in result.output
    (row,) = _rows(tmp_path / "p.csv")
    assert row["mask"] == "" and row["boxes_from"] == "classical" and not (masks / "knee.png").exists()
    found = find_horns_classical(
        cv2.imread(str(inputs / "knee.png"), cv2.IMREAD_UNCHANGED).astype(np.float32)
    )
    assert found is not None
    assert (_box(row["anterior_box"]), _box(row["posterior_box"])) == tuple(found)
    assert (masks / "overlays" / "knee.png").is_file()


def test_exams_get_a_mask_per_slice_in_their_own_geometry_and_the_same_answer(segmenting, tmp_path):
    folder = tmp_path / "exams"
    write_phantom_exams(folder, n=20, n_slices=3, seed=3, size=64, fmt="dicom-series")
    series = sorted(p for p in folder.iterdir() if p.is_dir())[0]
    standard = _series(tmp_path / "standard", series, "standard")
    mirrored = _series(tmp_path / "mirrored", series, "columns reversed")
    masks = tmp_path / "masks"
    _predict_masks(segmenting, [standard, mirrored], tmp_path / "p.csv", masks, "--exams", "--slices")
    rows = _rows(tmp_path / "p.csv")
    exam_rows = [row for row in rows if row["slice"] == ""]
    assert [row["mask"] for row in exam_rows] == [str(masks / "standard"), str(masks / "mirrored")]
    for index in range(3):
        reference = _mask(masks / "standard" / f"{index:03d}.png")
        assert reference.shape == (64, 64) and set(np.unique(reference)) <= {0, 1, 2}
        np.testing.assert_array_equal(_mask(masks / "mirrored" / f"{index:03d}.png"), reference[:, ::-1])
        assert (masks / "overlays" / "standard" / f"{index:03d}.png").is_file()
    slice_rows = [row for row in rows if row["exam"] == str(standard) and row["slice"] != ""]
    assert [row["mask"] for row in slice_rows] == [str(masks / "standard" / f"{k:03d}.png") for k in range(3)]
    top = int(exam_rows[0]["top_slice"])
    assert exam_rows[0]["anterior_box"] == slice_rows[top]["anterior_box"]  # the top slice's boxes

    # the pooled answer is the one predict gives without --masks
    args = ["predict", str(segmenting), str(standard), str(mirrored), "--exams", "--tta", "0"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "plain.csv")]).exit_code == 0
    plain = _rows(tmp_path / "plain.csv")
    for with_masks, without in zip(exam_rows, plain):
        assert {k: with_masks[k] for k in without} == without


# --- evaluate: the ROI hit rate ------------------------------------------------------------------


def test_the_hit_rate_counts_a_tear_inside_both_windows_as_a_hit():
    mask = np.zeros((64, 64), np.uint8)
    mask[30:34, 10:20] = 1  # anterior horn
    mask[30:34, 40:52] = 1  # posterior horn
    inside, outside = mask.copy(), mask.copy()
    inside[31, 12:15] = 2  # a tear in the anterior horn
    outside[31, 12:15] = 2
    outside[5, 5] = 2  # and a pixel far from either horn
    entry = roi_hit_rates(
        [np.zeros((64, 64), np.float32)] * 3,
        [inside, outside, mask],
        24,
        predicted=[inside, outside, mask],
        n_resamples=0,
    )
    assert entry["n_tears"] == 2 and entry["window_px"] == 24
    found = entry["predicted_mask"]
    assert (found["hits"], found["rate"], found["no_horns"]) == (1, 0.5, 0)
    assert found["mean_coverage"] == pytest.approx((1 + 3 / 4) / 2)
    assert (
        entry["classical"]["no_horns"] == 2 and entry["classical"]["hits"] == 0
    )  # a blank image has no horns
    assert roi_window(256) == ROI_WINDOW_AT_256 and roi_window(64) == 24


def test_a_roi_models_hit_rate_window_is_its_own_crop():
    """evaluate's windows are the crops a ROI model classifies (model.roi_crop), not the default 96."""
    from mtl_meniscus.config import ModelConfig

    assert roi_window(256, ModelConfig(roi="classical", roi_crop=64)) == 64
    assert roi_window(64, ModelConfig(roi="classical", roi_crop=64)) == 16
    assert roi_window(256, ModelConfig()) == ROI_WINDOW_AT_256  # a model that crops nothing


def test_evaluate_reports_the_hit_rate_counted_by_hand(segmenting, phantom64, tmp_path):
    out = tmp_path / "eval"
    args = [
        "evaluate",
        str(segmenting),
        "--split",
        "all",
        "--bootstrap",
        "20",
        "--tta",
        "0",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    _clean(result)
    assert result.exit_code == 0, result.output
    assert "ROI hit rate" in result.output
    entry = json.loads((out / "metrics.json").read_text())["roi_hit_rate"]

    data = prepare_data(phantom64, load_config(TINY).data, masks=True)
    tears = [k for k, mask in enumerate(data.masks) if mask is not None and (mask == 2).any()]
    trained = load_trained(segmenting, resolve_runtime("fp32", "cpu"))
    maps = predict_label_maps(
        trained.model, [data.images[k] for k in tears], "sobel", resolve_runtime("fp32", "cpu")
    )
    window = round(96 * 64 / 256)

    def hand_count(boxes_of) -> int:
        hits = 0
        for j, k in enumerate(tears):
            boxes = boxes_of(j, k)
            hits += bool(boxes) and tear_inside(data.masks[k], [window_around(b, window) for b in boxes])
        return hits

    assert entry["window_px"] == window and entry["n_tears"] == len(tears) > 0
    assert entry["classical"]["hits"] == hand_count(lambda j, k: find_horns_classical(data.images[k]))
    assert entry["predicted_mask"]["hits"] == hand_count(lambda j, k: horn_boxes_from_mask(maps[j]))
    for source in ("classical", "predicted_mask"):
        found = entry[source]
        assert found["rate"] == pytest.approx(found["hits"] / len(tears))
        low, high = found["rate_ci95"]
        assert low <= found["rate"] <= high


def test_evaluate_without_masks_has_no_hit_rate_and_a_plain_run_has_the_classical_one(
    run64, data64, tmp_path
):
    plain = tmp_path / "plain"
    args = ["evaluate", str(run64), "--split", "all", "--bootstrap", "0", "--tta", "0", "--out", str(plain)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    entry = json.loads((plain / "metrics.json").read_text())["roi_hit_rate"]
    assert "classical" in entry and "predicted_mask" not in entry  # no decoder: the classical horns only

    unmasked = tmp_path / "unmasked"
    unmasked.mkdir()
    for name in ("images", "masks"):
        (unmasked / name).symlink_to(data64 / name)
    rows = _rows(data64 / "labels.csv")
    with (unmasked / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[c for c in rows[0] if c != "mask"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "eval"
    args = [
        "evaluate",
        str(run64),
        "--data",
        str(unmasked),
        "--split",
        "all",
        "--bootstrap",
        "0",
        "--tta",
        "0",
    ]
    result = runner.invoke(app, [*args, "--out", str(out)])
    _clean(result)
    assert result.exit_code == 0, result.output
    assert "roi_hit_rate" not in json.loads((out / "metrics.json").read_text())
    assert "ROI hit rate" not in result.output


def test_an_exam_whose_top_slice_has_no_horns_says_so_in_its_row(run64, tmp_path):
    """The exam's row takes its top slice's boxes; when they are empty it says why, as the slice's
    row does (docs/cli.md: empty, with a note, when there are no two horns)."""
    np.save(tmp_path / "blank.npy", np.zeros((3, 64, 64), np.float32))  # no horns on any slice
    _predict_masks(
        run64, [tmp_path / "blank.npy"], tmp_path / "p.csv", tmp_path / "masks", "--exams", "--slices"
    )
    rows = _rows(tmp_path / "p.csv")
    exam, slices = rows[0], rows[1:]
    top = slices[int(exam["top_slice"])]
    assert exam["anterior_box"] == "" and top["note"]
    assert f"top slice: {top['note']}" in exam["note"]
