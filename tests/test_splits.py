from collections import Counter

import numpy as np
import pytest

from mtl_meniscus.data.splits import split_leaks, stratified_group_split


def _strata(n_per_stratum):
    return [s for s, n in n_per_stratum.items() for _ in range(n)]


def test_proportions_per_stratum():
    strata = _strata(
        {
            "0||": 780,
            "1|horizontal|posterior": 150,
            "1|vertical|posterior": 100,
            "1|horizontal|anterior": 14,
            "1|vertical|anterior": 10,
        }
    )
    splits = stratified_group_split(strata, (0.7, 0.2, 0.1), seed=0)
    total = Counter(splits)
    assert abs(total["train"] / len(strata) - 0.7) < 0.005
    assert abs(total["val"] / len(strata) - 0.2) < 0.005
    assert abs(total["test"] / len(strata) - 0.1) < 0.005
    for stratum in set(strata):
        counts = Counter(sp for st, sp in zip(strata, splits) if st == stratum)
        n = sum(counts.values())
        for name, fraction in (("train", 0.7), ("val", 0.2), ("test", 0.1)):
            assert abs(counts[name] - fraction * n) <= 1, (stratum, counts)


def test_seeded_and_seed_dependent():
    strata = _strata({"a": 50, "b": 50})
    assert stratified_group_split(strata, seed=1) == stratified_group_split(strata, seed=1)
    assert stratified_group_split(strata, seed=1) != stratified_group_split(strata, seed=2)


def test_groups_never_cross_splits():
    rng = np.random.default_rng(0)
    groups = [f"P{rng.integers(0, 60)}" for _ in range(300)]
    strata = [("1" if rng.random() < 0.25 else "0") for _ in range(300)]
    splits = stratified_group_split(strata, (0.7, 0.2, 0.1), seed=0, groups=groups)
    by_group = {}
    for group, split in zip(groups, splits):
        assert by_group.setdefault(group, split) == split
    fractions = Counter(splits)
    assert abs(fractions["train"] / 300 - 0.7) < 0.08  # groups make proportions approximate


def test_zero_fraction_split_stays_empty():
    splits = stratified_group_split(_strata({"a": 30, "b": 10}), (0.8, 0.2, 0.0), seed=0)
    assert "test" not in splits and Counter(splits)["val"] == 8


def test_mismatched_groups_are_refused():
    with pytest.raises(ValueError):
        stratified_group_split(["a", "b"], groups=["g"])


def test_groups_in_more_than_one_split_are_found():
    groups = ["P1", "P2", "P1", "P3", "P2", "P1", "P4"]
    splits = ["train", "val", "test", "test", "val", "train", "val"]
    # P1 in train (items 0, 5) and test (2); P2 twice in val and P3, P4 once: no leak
    assert split_leaks(groups, splits) == {"P1": {"train": [0, 5], "test": [2]}}
    assert split_leaks(["a", "a", "b"], ["val", "val", "train"]) == {}
    with pytest.raises(ValueError):
        split_leaks(["a"], [])


def test_blank_lines_in_labels_csv_do_not_move_the_automatic_split(tmp_path):
    """Rows without a patient_id are grouped by their place among the data rows, not by their line:
    blank lines moved every later row's group, and so the split (and blocked train --resume)."""
    import shutil

    from mtl_meniscus.config import DataConfig
    from mtl_meniscus.data.load import prepare_data
    from mtl_meniscus.phantom.slices import write_phantom

    write_phantom(tmp_path / "a", n=60, seed=2, size=64)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    lines = (tmp_path / "a" / "labels.csv").read_text().splitlines()
    blank = [line + "\n" if k % 7 else line + "\n\n" for k, line in enumerate(lines)]
    (tmp_path / "b" / "labels.csv").write_text("".join(blank))
    config = DataConfig(image_size=64)
    plain, spaced = prepare_data(tmp_path / "a", config), prepare_data(tmp_path / "b", config)
    assert [r.row for r in spaced.records] != [r.row for r in plain.records]  # the lines did move
    assert [r.key for r in spaced.records] == [r.key for r in plain.records]
    assert spaced.splits == plain.splits
