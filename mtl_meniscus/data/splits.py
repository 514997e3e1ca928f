"""Seeded train/val/test splits, stratified on the joint label and grouped by patient."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

SPLIT_NAMES = ("train", "val", "test")
UNUSED = "unused"  # a training image left out by data.train_fraction (a learning curve's smaller point)


def stratified_group_split(
    strata: Sequence[str],
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> list[str]:
    """Assign each item to 'train', 'val' or 'test'.

    Items with the same group (patient) always share a split. Groups are stratified by the
    stratum of their first item; within each stratum, groups are shuffled (seeded) and each
    goes to the split furthest below its target share of that stratum, so every stratum is
    split in the given proportions up to one group.
    """
    n = len(strata)
    groups = list(groups) if groups is not None else [str(i) for i in range(n)]
    if len(groups) != n:
        raise ValueError("strata and groups must have the same length")
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    groups_by_stratum: dict[str, list[str]] = defaultdict(list)
    for group, indices in members.items():
        groups_by_stratum[strata[indices[0]]].append(group)

    rng = np.random.default_rng(seed)
    fractions = np.asarray(fractions, dtype=float)
    assignment = [""] * n
    global_counts = np.zeros(len(SPLIT_NAMES))
    for stratum in sorted(groups_by_stratum):
        stratum_groups = sorted(groups_by_stratum[stratum])
        rng.shuffle(stratum_groups)
        counts = np.zeros(len(SPLIT_NAMES))
        for group in stratum_groups:
            size = len(members[group])
            # Deficit of each split after adding this group; ties go to the split most behind overall.
            deficit = fractions * (counts.sum() + size) - counts
            global_deficit = fractions * (global_counts.sum() + size) - global_counts
            eligible = fractions > 0
            order = np.lexsort((-global_deficit, -deficit))
            choice = next(i for i in order if eligible[i])
            counts[choice] += size
            global_counts[choice] += size
            for index in members[group]:
                assignment[index] = SPLIT_NAMES[choice]
    return assignment


def nested_training_subset(
    splits: Sequence[str],
    strata: Sequence[str],
    fraction: float,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> list[str]:
    """`splits` with the training items outside a `fraction` of the training split marked UNUSED.

    The subset is stratified (each stratum of the training split keeps round(fraction x its
    groups), at least one) and patient-grouped (a group is kept or left out whole), and nested: the
    groups of each stratum are put in one seeded order that does not depend on `fraction`, and the
    first ones are kept, so the subset for 0.25 is inside the subset for 0.5. Validation and test
    items are never touched.
    """
    if fraction >= 1.0:
        return list(splits)
    groups = list(groups) if groups is not None else [str(i) for i in range(len(splits))]
    members: dict[str, list[int]] = defaultdict(list)
    for index, (split, group) in enumerate(zip(splits, groups)):
        if split == "train":
            members[group].append(index)
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for group, indices in members.items():
        by_stratum[strata[indices[0]]].append(group)
    rng = np.random.default_rng([seed, 7])  # 7: a stream of its own, apart from the split's
    result = list(splits)
    for stratum in sorted(by_stratum):
        ordered = sorted(by_stratum[stratum])
        rng.shuffle(ordered)
        keep = max(1, round(fraction * len(ordered)))
        for group in ordered[keep:]:
            for index in members[group]:
                result[index] = UNUSED
    return result


def split_leaks(groups: Sequence[str], splits: Sequence[str]) -> dict[str, dict[str, list[int]]]:
    """{group: {split: indices of its items in that split}} for every group whose items are in
    more than one split (a patient in train and test: their images are trained on and scored),
    groups and splits in order of first appearance. Empty when every group keeps to one split."""
    if len(groups) != len(splits):
        raise ValueError("groups and splits must have the same length")
    by_group: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index, (group, split) in enumerate(zip(groups, splits)):
        by_group[group][split].append(index)
    return {
        group: {split: indices for split, indices in by_split.items()}
        for group, by_split in by_group.items()
        if len(by_split) > 1
    }
