"""The networks a run trains ("members"): one for all tasks, or the cascade's one per task.

A model of one network per task (registered with per_task=True, the reference's cascade) trains
each network on its own images: fissure on all, a gated task (orientation, position) on the true
tears only, and with model.segmentation its segmentation network first, on the images with a mask.
Every other model is one member, JOINT, trained on all images and tasks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from mtl_meniscus.config import SEGMENTATION, Config, ModelConfig, config_from_dict
from mtl_meniscus.data.records import PreparedData
from mtl_meniscus.engine.stopping import chance_bar
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.evaluation.metrics import monitor_weights
from mtl_meniscus.labels import DEFAULT_TASKS, TaskTable
from mtl_meniscus.networks.models import MODELS, build_model, build_network, cascade_networks, trains_per_task

JOINT = "shared"  # the member name of a one-network model (its folder is the run folder)


@dataclass
class Member:
    """One network to train: its name, tasks, folder and the images it trains and validates on
    (the cascade's segmentation network: no task)."""

    name: str
    tasks: tuple[str, ...]
    folder: Path
    train_indices: np.ndarray
    val_indices: np.ndarray

    def build(self, config: Config) -> nn.Module:
        return build_member_network(config.model, self.name)


def build_member_network(model: ModelConfig, name: str) -> nn.Module:
    """The network `name` of a run of `model`: a per_task model's network of that name (its own
    builder's), or the one network of every other model (JOINT)."""
    return build_network(model, name) if trains_per_task(model.name) else build_model(model)


def plan_members(config: Config, data: PreparedData, run_dir: Path) -> list[Member]:
    """One network for all tasks: one member on all images. The cascade (one network per task):
    its segmentation network (model.segmentation) on the images with a mask, then fissure on all
    images, the others on tears."""
    train, val = data.indices("train"), data.indices("val")
    if not trains_per_task(config.model.name):
        return [Member(JOINT, config.model.tasks, run_dir, train, val)]
    members = []
    for name in cascade_networks(config.model):
        folder = run_dir / "members" / name
        if name == SEGMENTATION:
            members.append(Member(name, (), folder, data.rows_with_mask(train), data.rows_with_mask(val)))
            continue
        rows = data.tasks.scored_rows(data.targets, name)  # all images for fissure, true tears for the others
        members.append(Member(name, (name,), folder, train[rows[train]], val[rows[val]]))
    return members


def check_members(members: list[Member], data: PreparedData, model: ModelConfig | None = None) -> list[str]:
    """Refuse a member with no training image, naming the split and the member, before anything
    trains; return warnings for members without validation images and for an empty test split.
    With `model`, also what its segmentation decoder or horn crops lack (_roi_warnings)."""
    by_column = bool(data.records) and all(r.split for r in data.records)
    if data.layout == "mrnet":
        origin = "MRNet's train folder (its readable exams; valid/ is the test split)"
    elif by_column:
        origin = "the 'split' column of labels.csv"
    else:
        origin = "the automatic split (data.split_fractions)"
    counts = ", ".join(f"{name} {len(data.indices(name))}" for name in ("train", "val", "test"))
    warnings = []
    for member in members:
        # a gated task's network trains on the rows where its gate is positive (true tears)
        only_tears = member.name in data.tasks and data.tasks[member.name].gated_by is not None
        if member.name == SEGMENTATION and not len(member.train_indices):
            raise MeniscusError(
                "model.segmentation: the cascade's segmentation network trains on the rows of the train "
                "split with a mask (labels.csv's mask column), and there is none; give masks, or train "
                "without model.segmentation"
            )
        if not len(member.train_indices):
            if only_tears and len(data.indices("train")):
                raise MeniscusError(
                    f"the {member.name} network has no training image: separate mode trains it on the "
                    f"true tears of the train split, and the train split has none ({data.split_summary()})"
                )
            raise MeniscusError(
                f"the train split is empty: {origin} puts none of the {len(data.records)} kept images "
                f"there ({counts}); nothing to train on"
            )
        if not len(member.val_indices):
            what = (
                "the val split has no tear"
                if only_tears and len(data.indices("val"))
                else "the val split is empty"
            )
            if member.name == SEGMENTATION:
                what = "no row of the val split has a mask"
            warnings.append(
                f"[{member.name}] no validation image ({what}): the run has no validation score to pick "
                "its best epoch or to stop early"
            )
    if model is not None and model.roi != "none":
        warnings += _roi_warnings(model.roi, data)
    if data.masks is not None and (model is None or model.segmentation):
        warnings += _mask_warnings(data)
    _check_root_classes(data)  # after the members': a missing network's own message says more
    if not len(data.indices("test")):
        warnings.append(f"the test split is empty ({counts}): the run ends without test metrics")
    return warnings


def _mask_warnings(data: PreparedData) -> list[str]:
    """What a segmentation run lacks when the train or val split has no row with a mask."""
    warnings = []
    if not len(data.rows_with_mask(data.indices("train"))):
        warnings.append(
            "model.segmentation: no row of the train split has a mask (labels.csv's mask column): the "
            "segmentation loss is absent and the decoder stays untrained; the classification heads train"
        )
    if not len(data.rows_with_mask(data.indices("val"))):
        warnings.append("model.segmentation: no row of the val split has a mask: no validation Dice")
    return warnings


def _roi_warnings(roi: str, data: PreparedData) -> list[str]:
    """Refuse a ROI model whose horns cannot come from anywhere: roi truth on data without any mask,
    roi predicted without a mask in the train split (its decoder could not learn); warn about the
    truth model's rows without a mask (cropped at the fallback windows)."""
    train = data.indices("train")
    if roi == "truth":
        with_mask = len(data.rows_with_mask(range(len(data.records))))
        if not with_mask:
            raise MeniscusError(
                f"model.roi truth: no row of {data.data_dir} has a mask (labels.csv's mask column), and the "
                "true horns come from the masks; give masks, or use model.roi classical"
            )
        if with_mask < len(data.records):
            return [
                f"model.roi truth: {len(data.records) - with_mask} of {len(data.records)} {data.unit} have "
                "no mask: they are cropped at the fallback windows (counted in history.csv, roi_fallbacks)"
            ]
    if roi == "predicted" and not len(data.rows_with_mask(train)):
        raise MeniscusError(
            "model.roi predicted: no row of the train split has a mask (labels.csv's mask column), so the "
            "segmentation decoder that finds the horns cannot learn; give masks, or use model.roi classical"
        )
    return []


def _check_root_classes(data: PreparedData) -> None:
    """Refuse a train split whose root task (fissure) has one class only: no model, shared or
    separate, can learn a tear from images that all have one, or all have none."""
    root = data.tasks.root
    train = data.indices("train")
    labels = data.targets[train, data.tasks.index(root.name)]
    positives, negatives = int(np.sum(labels == 1)), int(np.sum(labels == 0))
    if len(train) and not (positives and negatives):
        which = "no" if not positives else "only"
        raise MeniscusError(
            f"the train split has {which} {root.noun}s ({positives} of {len(train)} {data.unit} with "
            f"{root.name} = 1): nothing can learn to tell a {root.noun} from its absence; "
            f"check the {root.name} column ({data.split_summary()})"
        )


def member_config(config: Config, member: Member) -> Config:
    """The config a member's best.pt records. A network of the package's own cascade is a one-task
    'shared' model, which predict can load alone (its segmentation network one of no task with a
    decoder, cropping nothing; its classifiers have no decoder). A one-network model's is the run's;
    so is a plug-in cascade's network's: only the plug-in's builder knows its networks, and the
    loader refuses such a network alone (checkpoint.model_from_checkpoint: the run assembles it)."""
    if not trains_per_task(config.model.name) or MODELS.plugin_module(config.model.name) is not None:
        return config
    own = config_from_dict(config.to_dict(), source="run config")
    own.model = own.model.model_copy(update={"name": "shared", "tasks": member.tasks})
    segmentation = member.name == SEGMENTATION
    update = {"segmentation": segmentation} | ({"roi": "none"} if segmentation else {})
    if member.name == "fissure":  # fewer blocks: the network takes the first widths, one per block
        kernels = config.model.fissure_kernels
        update |= {"kernels": kernels, "widths": config.model.widths[: len(kernels)]}
    own.model = own.model.model_copy(update=update)
    return own


def run_networks(model: ModelConfig) -> Iterator[tuple[str, nn.Module]]:
    """(network, the network) for each network a run of `model` trains, built as its member builds
    it, one at a time, without data: what compare counts the FLOPs of. The one network of a shared
    run; a per_task model's by its own builder (a plug-in's are its own)."""
    names = cascade_networks(model) if trains_per_task(model.name) else (JOINT,)
    for name in names:
        yield name, build_member_network(model, name)


def tasks_without_labels(names: tuple[str, ...], data: PreparedData) -> dict[str, int]:
    """{gated task: the train split's gate positives (tears)} for the tasks whose label is unknown on
    every one of them (MRNet, fastMRI+): nothing to learn from, so the run leaves them out rather
    than predict with an untrained head. A train split without any tear is check_members' error."""
    train, tasks = data.indices("train"), data.tasks
    out = {}
    for name in names:
        gate = tasks[name].gated_by
        if gate is None:
            continue
        gated = int(np.sum(data.targets[train, tasks.index(gate)] == 1))
        if gated and not tasks.scored_rows(data.targets[train], name).any():
            out[name] = gated
    return out


def class_counts(targets: np.ndarray, name: str, tasks: TaskTable) -> tuple[int, int]:
    """(positives, negatives) of task `name` among the rows of `targets` it is scored on."""
    labels = targets[tasks.scored_rows(targets, name), tasks.index(name)]
    return int(np.sum(labels == 1)), int(np.sum(labels == 0))


def member_chance_bars(
    val_targets: np.ndarray, names: tuple[str, ...], tasks: TaskTable = DEFAULT_TASKS
) -> dict[str, float]:
    """{task: validation AUC that counts as above chance} for the tasks of the score this network
    monitors, each from its own scored validation rows (stopping.py); a task with too few rows to
    tell is left out."""
    weights = monitor_weights(names, tasks)  # a task of weight 0 does not move the monitored score
    bars = {}
    for name in names:
        if weights[name] <= 0:
            continue
        bar = chance_bar(*class_counts(val_targets, name, tasks))
        if bar is not None:
            bars[name] = bar
    return bars
