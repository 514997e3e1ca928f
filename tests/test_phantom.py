import hashlib

import cv2
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mtl_meniscus.phantom import (
    MASK_MENISCUS,
    MASK_TEAR,
    plan_cases,
    render_case,
    summarize_cases,
    write_phantom,
)


def _digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path):
    write_phantom(tmp_path / "a", n=24, seed=5)
    write_phantom(tmp_path / "b", n=24, seed=5)
    write_phantom(tmp_path / "c", n=24, seed=6)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert len(a) == 2 * 24 + 1  # images, masks, labels.csv
    assert a["images/knee_00000.png"] != c["images/knee_00000.png"]


def test_default_label_mix_matches_reference():
    summary = summarize_cases(plan_cases(n=1128, seed=0))
    assert summary["images"] == 1128
    assert summary["wrong_size"] >= 3 and summary["double_tear"] >= 3  # exclusion rules get exercised
    usable = summary["usable"]
    assert usable == 1128 - summary["wrong_size"] - summary["double_tear"]
    assert abs(summary["tear"] / usable - 0.25) < 0.005
    assert abs(summary["horizontal"] / summary["tear"] - 0.60) < 0.01
    assert abs(summary["anterior"] / summary["tear"] - 0.09) < 0.01
    assert summary["horizontal"] + summary["vertical"] == summary["tear"]
    assert summary["anterior"] + summary["posterior"] == summary["tear"]


def test_written_files_are_16_bit_with_masks(small_phantom):
    rows = (small_phantom / "labels.csv").read_text().splitlines()
    assert rows[0] == "image,fissure,orientation,position,mask"
    tear_row = next(r.split(",") for r in rows[1:] if r.split(",")[1] == "1" and r.split(",")[3] != "both")
    image = cv2.imread(str(small_phantom / tear_row[0]), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(small_phantom / tear_row[4]), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint16 and image.max() > 255
    assert set(np.unique(mask)) <= {0, MASK_MENISCUS, MASK_TEAR}
    assert (mask == MASK_TEAR).sum() > 0


def test_tear_lies_inside_the_labelled_horn():
    cases = [c for c in plan_cases(n=200, seed=1) if c.size == (256, 256)]
    for case in cases[:60]:
        _, mask = render_case(case, seed=1)
        tear = np.argwhere(mask == MASK_TEAR)
        if not case.fissure:
            assert tear.size == 0
            continue
        assert tear.size > 0
        meniscus_x = np.argwhere(mask >= MASK_MENISCUS)[:, 1]
        middle = (meniscus_x.min() + meniscus_x.max()) / 2
        tear_x = tear[:, 1].mean()
        if case.position == "anterior":  # anterior is on the left of the image
            assert tear_x < middle
        elif case.position == "posterior":
            assert tear_x > middle


def test_tear_direction_matches_orientation():
    """Principal axis of the tear pixels: near the plateau direction (horizontal) or across it."""
    cases = [
        c for c in plan_cases(n=300, seed=2) if c.fissure and c.position != "both" and c.size == (256, 256)
    ]
    agree = 0
    for case in cases:
        _, mask = render_case(case, seed=2)
        ys, xs = np.nonzero(mask == MASK_TEAR)
        cov = np.cov(np.stack([xs, ys]).astype(float))
        eigvals, eigvecs = np.linalg.eigh(cov)
        major = eigvecs[:, -1]
        angle = np.degrees(np.arctan2(abs(major[1]), abs(major[0])))  # 0 = horizontal, 90 = vertical
        agree += (angle < 45) == (case.orientation == "horizontal")
    assert agree / len(cases) > 0.9  # short tears of a few pixels can be ambiguous


def test_not_trivially_solvable_by_logistic_regression_on_small_pixels():
    cases = [c for c in plan_cases(n=480, seed=7) if c.size == (256, 256) and c.position != "both"]
    features, labels = [], []
    for case in cases:
        image, _ = render_case(case, seed=7)
        image = image.astype(np.float32)
        image = (image - image.mean()) / image.std()
        features.append(cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA).ravel())
        labels.append(case.fissure)
    features, labels = np.array(features), np.array(labels)
    train, test = slice(0, 320), slice(320, None)
    best = 0.0
    for c in (0.01, 0.1, 1.0, 10.0):
        model = LogisticRegression(C=c, max_iter=3000).fit(features[train], labels[train])
        best = max(best, roc_auc_score(labels[test], model.predict_proba(features[test])[:, 1]))
    assert best < 0.75
