"""Building blocks of meniscus segmentation (issue 29): Dice and IoU, label masks read with checks,
the two horns' boxes (from a mask, and by the classical pipeline) and the crops around them."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from support import _labels, _png

from mtl_meniscus.data.folder import read_labels
from mtl_meniscus.data.masks import read_masks, read_row_mask
from mtl_meniscus.data.roi import (
    POSTERIOR_IS_RIGHT,
    Box,
    crop_around,
    find_horns_classical,
    horn_boxes_from_mask,
    tear_coverage,
    tear_inside,
    window_around,
)
from mtl_meniscus.errors import DataError
from mtl_meniscus.evaluation.segmentation import (
    CLASSES,
    WHOLE_MENISCUS,
    WITH_BACKGROUND,
    image_scores,
    mean_score_ci,
    set_scores,
)
from mtl_meniscus.phantom.slices import phantom_settings, plan_cases, render_case

# --- Dice and IoU ---------------------------------------------------------------------------

TRUTH = np.array([[0, 1, 1, 0], [0, 1, 2, 0], [0, 0, 2, 0]])
PREDICTION = np.array([[0, 1, 1, 1], [0, 2, 2, 0], [0, 0, 0, 0]])
# meniscus (1): truth (0,1) (0,2) (1,1), prediction (0,1) (0,2) (0,3); both (0,1) (0,2)
#   Dice 2*2/(3+3) = 2/3, IoU 2/(3+3-2) = 1/2
# tear (2): truth (1,2) (2,2), prediction (1,1) (1,2); both (1,2)
#   Dice 2*1/(2+2) = 1/2, IoU 1/(2+2-1) = 1/3
# background (0): 7 in each, 6 in both (12 pixels less the 6 labelled in either)
#   Dice 2*6/14 = 6/7, IoU 6/(7+7-6) = 3/4
# whole meniscus (1 or 2): 5 in each, 4 in both ((0,1) (0,2) (1,1) (1,2)): Dice 4/5, IoU 4/6


def test_dice_and_iou_of_one_image_match_the_hand_computed_example():
    scores = image_scores(PREDICTION, TRUTH, WITH_BACKGROUND)
    assert scores["dice"] == pytest.approx({"background": 6 / 7, "meniscus": 2 / 3, "tear": 1 / 2})
    assert scores["iou"] == pytest.approx({"background": 3 / 4, "meniscus": 1 / 2, "tear": 1 / 3})
    whole = image_scores(PREDICTION, TRUTH, WHOLE_MENISCUS)
    assert whole["dice"]["meniscus"] == pytest.approx(4 / 5)
    assert whole["iou"]["meniscus"] == pytest.approx(4 / 6)


def test_a_class_in_neither_mask_is_nan_and_in_one_only_is_zero():
    empty = np.zeros((2, 2), int)
    tear_only = np.array([[2, 2], [0, 0]])
    assert all(math.isnan(v) for v in image_scores(empty, empty)["dice"].values())
    assert image_scores(empty, tear_only)["dice"]["tear"] == 0.0
    assert image_scores(tear_only, empty)["iou"]["tear"] == 0.0


def test_mean_over_images_and_pooled_pixels_differ_as_documented():
    # image 1: the example above; image 2: nothing in either (NaN, left out of the mean);
    # image 3: a 2-pixel tear missed (tear Dice 0, meniscus in neither: NaN)
    empty = np.zeros((2, 2), int)
    scores = set_scores([PREDICTION, empty, empty], [TRUTH, empty, np.array([[2, 2], [0, 0]])], CLASSES)
    tear = scores.per_image("dice")["tear"]
    assert tear[0] == pytest.approx(0.5) and math.isnan(tear[1]) and tear[2] == 0.0
    # mean over the 2 images where the tear is defined: (1/2 + 0) / 2
    assert scores.mean_over_images("dice") == pytest.approx({"meniscus": 2 / 3, "tear": 1 / 4})
    assert scores.defined_images() == {"meniscus": 1, "tear": 2}
    # pooled tear: both 1, predicted 2, true 2 + 2 = 4 -> Dice 2/6, IoU 1/(2 + 4 - 1)
    assert scores.pooled("dice") == pytest.approx({"meniscus": 2 / 3, "tear": 1 / 3})
    assert scores.pooled("iou") == pytest.approx({"meniscus": 1 / 2, "tear": 1 / 5})


def test_bootstrap_interval_of_the_mean_dice_resamples_the_defined_images():
    values = np.array([0.2, 0.4, np.nan, 0.6, 0.8])
    low, high = mean_score_ci(values, n_resamples=400, seed=1)
    assert 0.2 <= low < 0.5 < high <= 0.8
    assert mean_score_ci(values, n_resamples=400, seed=1) == (low, high)  # same seed, same interval
    assert mean_score_ci(np.full(6, 0.7), n_resamples=50) == pytest.approx((0.7, 0.7))
    assert all(math.isnan(v) for v in mean_score_ci(np.full(3, np.nan), n_resamples=50))
    # clustered: two patients, each with one value on all their slices; a resample's mean is 0.2,
    # 0.5 or 0.8, so the interval spans more than the slices' own spread would suggest
    clustered = mean_score_ci(np.array([0.2, 0.2, 0.2, 0.8, 0.8, 0.8]), 400, 0, groups=list("aaabbb"))
    assert clustered == pytest.approx((0.2, 0.8))


# --- masks read with checks -------------------------------------------------------------------


def _mask_png(path, pixels) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.asarray(pixels, np.uint8))


def test_every_bad_mask_is_named_by_row_and_file_in_one_error(tmp_path):
    good = np.zeros((64, 64), np.uint8)
    good[30:34, 10:20], good[31, 12:15] = 1, 2
    value_three = good.copy()
    value_three[0, 0] = 3
    # rows 2-7: a the wrong size (its image is 64x64), b a value other than 0, 1, 2, c bytes that are
    # no image, d removed after labels.csv was read, e fine, f no mask (partial supervision: no problem)
    for name in "abcdef":
        _png(tmp_path / "img" / f"{name}.png")
    for name, pixels in {"a": np.zeros((32, 64)), "b": value_three, "d": good, "e": good}.items():
        _mask_png(tmp_path / "masks" / f"{name}.png", pixels)
    (tmp_path / "masks" / "c.png").write_bytes(b"\x89PNG not really")
    # the masks with tear pixels (b, d, e) on rows labelled as tears, as a mask must agree with its label
    tear = ("1", "horizontal", "posterior")
    rows = [
        (
            f"img/{name}.png",
            *(tear if name in "bde" else ("0", "", "")),
            "" if name == "f" else f"masks/{name}.png",
        )
        for name in "abcdef"
    ]
    _labels(tmp_path, rows, header=("image", "fissure", "orientation", "position", "mask"))
    records = read_labels(tmp_path)
    (tmp_path / "masks" / "d.png").unlink()

    with pytest.raises(DataError) as info:
        read_masks(tmp_path, records)
    message, problems = str(info.value), info.value.problems
    assert str(tmp_path / "labels.csv") in message and "4 problem(s)" in message
    assert len(problems) == 4 and [p.split(",")[0] for p in problems] == ["row 2", "row 3", "row 4", "row 5"]
    assert all("column 'mask'" in p for p in problems)
    assert "masks/a.png: 32x64 (height x width), but its image img/a.png is 64x64" in problems[0]
    assert (
        "masks/b.png: value 3 (1 pixel)" in problems[1] and "0 background, 1 meniscus, 2 tear" in problems[1]
    )
    assert "masks/c.png" in problems[2] and "cannot decode" in problems[2]
    assert problems[3] == f"row 5, column 'mask': file not found: {tmp_path / 'masks' / 'd.png'}"

    masks = read_masks(tmp_path, records[4:])  # rows 6 and 7
    assert masks[1] is None and masks[0].dtype == np.uint8
    np.testing.assert_array_equal(masks[0], good)
    assert read_row_mask(tmp_path, records[4], (64, 64)) is not None
    with pytest.raises(DataError, match=r"row 2, column 'mask'.*32x64"):
        read_row_mask(tmp_path, records[0], (64, 64))


# --- horns and crops --------------------------------------------------------------------------


def _phantom_slices(difficulty: str, n: int, seed: int, tears_only: bool = False, size: int = 256):
    """(image, mask, case) of the first n regular phantom images (right size, not a double tear)."""
    cases = [
        c
        for c in plan_cases(n=max(20, 8 * n), seed=seed, size=size)
        if c.size == (size, size) and c.position != "both" and (c.fissure or not tears_only)
    ][:n]
    settings = phantom_settings(difficulty)
    return [(*render_case(case, seed, settings), case) for case in cases]


def test_the_posterior_horn_is_on_the_right_of_the_canonical_view():
    assert POSTERIOR_IS_RIGHT  # io/orientation.py: along a row, LPS +y (posterior)


def test_horn_boxes_from_a_mask_put_each_phantom_tear_in_the_horn_it_is_labelled_with():
    slices = _phantom_slices("realistic", 24, seed=4, tears_only=True)
    assert {case.position for _, _, case in slices} == {"anterior", "posterior"}
    for _, mask, case in slices:
        horns = horn_boxes_from_mask(mask)
        assert horns.anterior.center[0] < horns.posterior.center[0]
        labelled = horns.anterior if case.position == "anterior" else horns.posterior
        other = horns.posterior if case.position == "anterior" else horns.anterior
        assert tear_inside(mask, [labelled]) and tear_coverage(mask, [other]) == 0.0


def test_a_mask_without_two_meniscus_regions_has_no_horns():
    tear_boxes_only = np.zeros((64, 64), np.uint8)
    tear_boxes_only[10:14, 5:15] = tear_boxes_only[10:14, 40:50] = 2  # as the fastMRI+ import writes
    assert horn_boxes_from_mask(tear_boxes_only) is None
    assert horn_boxes_from_mask(np.zeros((64, 64), np.uint8)) is None


def _horn_pixels(mask: np.ndarray, box: Box) -> np.ndarray:
    """(H, W) uint8: 1 on the meniscus region (meniscus and tear pixels) whose bounding box is `box`."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    (region,) = [k for k in range(1, count) if Box(*stats[k, :2], *(stats[k, :2] + stats[k, 2:4])) == box]
    return (labels == region).astype(np.uint8)


def test_crops_around_the_true_horns_hold_the_whole_horns():
    for image, mask, _ in _phantom_slices("realistic", 10, seed=5):
        for box in horn_boxes_from_mask(mask):
            crop, window = crop_around(image, box, 96)
            assert crop.shape == (96, 96) and window.width == window.height == 96
            assert window.x0 >= 0 and window.y0 >= 0  # here inside the image: the crop is its pixels
            np.testing.assert_array_equal(crop, image[window.y0 : window.y1, window.x0 : window.x1])
            horn = _horn_pixels(mask, box)
            held, _ = crop_around(horn, box, 96, padding="zeros")
            assert held.sum() == horn.sum()


def test_crops_past_the_edge_are_padded_as_asked_and_map_back():
    image = np.arange(1, 101, dtype=np.float32).reshape(10, 10)
    before = image.copy()
    crop, window = crop_around(image, Box(0, 0, 2, 2), 6)
    assert window == Box(-2, -2, 4, 4) and crop.shape == (6, 6)
    assert crop[2, 2] == image[0, 0] and crop[0, 0] == image[0, 0]  # "edge": the border repeated
    assert crop[5, 5] == image[window.y0 + 5, window.x0 + 5]
    zeros, _ = crop_around(image, Box(8, 8, 10, 10), (4, 6), padding="zeros")
    assert zeros.shape == (4, 6) and zeros[:3, :4].min() > 0 and zeros[3:, :].max() == 0
    assert zeros[:, 4:].max() == 0
    np.testing.assert_array_equal(image, before)  # the input is not changed


def test_tear_inside_the_windows_is_the_roi_hit():
    mask = np.zeros((20, 20), np.uint8)
    mask[5, 5:9] = 2
    assert tear_inside(mask, [window_around(Box(4, 4, 8, 8), 8)]) is True
    assert tear_coverage(mask, [Box(0, 0, 7, 20)]) == 0.5 and tear_inside(mask, [Box(0, 0, 7, 20)]) is False
    assert tear_inside(mask, [Box(0, 0, 7, 20), Box(7, 0, 20, 20)]) is True
    assert tear_inside(np.zeros((4, 4), np.uint8), [Box(0, 0, 4, 4)]) is None


def _horns_found(found, mask) -> bool:
    """Both horns found: each box holds its true horn's centroid and overlaps its box (IoU >= 0.3)."""
    truth = horn_boxes_from_mask(mask)
    if found is None:
        return False
    for box, true_box in zip(found, truth):
        ys, xs = np.nonzero(mask[true_box.y0 : true_box.y1, true_box.x0 : true_box.x1])
        if not box.contains(xs.mean() + true_box.x0, ys.mean() + true_box.y0) or box.iou(true_box) < 0.3:
            return False
    return True


def test_the_classical_pipeline_finds_both_horns_on_clean_phantom_images():
    slices = _phantom_slices("easy", 50, seed=11)
    found = [_horns_found(find_horns_classical(image), mask) for image, mask, _ in slices]
    assert np.mean(found) >= 0.9, f"both horns found in {sum(found)} of {len(found)} images"


def test_an_image_with_negative_values_has_its_horns_found_whatever_its_offset_and_scale():
    """A z-scored slice, or one stored with a negative intercept, has no 0 meaning "no signal": the
    finder measures its darkness from its darkest pixel. Taken from 0, no such copy had horns."""
    slices = _phantom_slices("easy", 20, seed=3)
    found = []
    for image, mask, _ in slices:
        image = image.astype(np.float32)
        zscored = (image - image.mean()) / image.std()
        horns = find_horns_classical(zscored)
        found.append(_horns_found(horns, mask))
        for copy in (3 * zscored - 7, zscored - 1000, image - image.max()):
            assert find_horns_classical(copy) == horns
    assert np.mean(found) >= 0.9, f"both horns found in {sum(found)} of {len(found)} z-scored images"


def test_the_classical_pipeline_says_not_found_on_an_image_without_a_knee():
    rng = np.random.default_rng(0)
    assert find_horns_classical(rng.normal(1000, 30, (128, 128)).astype(np.float32)) is None
    assert find_horns_classical(np.zeros((64, 64), np.float32)) is None


def test_a_png_mask_of_a_mirrored_or_transposed_dicom_is_read_in_its_images_view(tmp_path):
    """A mask drawn on a DICOM file's stored pixels (as predict --masks writes it, as annotation
    tools draw it) is turned with its image: it lands on the same canonical pixels for every way the
    slice is stored. Before, it was taken as if drawn on the canonical view: mirrored, its tear lay
    on the other horn without a word."""
    from test_orientation import DICOM_VARIANTS, canonical_slice, write_dicom

    pixels = canonical_slice(64)[:, :48]  # (64, 48): a transposed slice is stored 48x64
    truth = np.zeros((64, 48), np.uint8)
    truth[30:34, 5:20] = 1  # a meniscus band, its tear at one end: every flip moves it
    truth[31:33, 5:9] = 2
    rows = []
    for k, (stored, orientation) in enumerate(DICOM_VARIANTS.values()):
        write_dicom(tmp_path / f"img/{k}.dcm", stored(pixels), orientation)
        (tmp_path / "masks").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / f"masks/{k}.png"), np.ascontiguousarray(stored(truth)))
        rows.append((f"img/{k}.dcm", "1", "horizontal", "posterior", f"masks/{k}.png"))
    _labels(tmp_path, rows, header=("image", "fissure", "orientation", "position", "mask"))
    records = read_labels(tmp_path)
    for mask in read_masks(tmp_path, records):
        np.testing.assert_array_equal(mask, truth)

    # the size is checked against the stored image, and said in its terms
    cv2.imwrite(str(tmp_path / "masks/3.png"), truth)  # the canonical 64x48 for a file stored 48x64
    with pytest.raises(
        DataError, match=r"masks/3\.png: 64x48 \(height x width\), but its image img/3\.dcm is 48x64"
    ):
        read_masks(tmp_path, records)
