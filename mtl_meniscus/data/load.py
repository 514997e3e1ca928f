"""One entry to every data set layout: picks the reader that data.layout names."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from mtl_meniscus.config import DataConfig
from mtl_meniscus.data.folder import prepare_folder
from mtl_meniscus.data.mrnet import prepare_mrnet
from mtl_meniscus.data.records import PreparedData
from mtl_meniscus.data.splits import nested_training_subset


def prepare_data(
    data_dir: str | Path,
    config: DataConfig,
    report_dir: str | Path | None = None,
    on_row: Callable[[int, int], None] | None = None,
    masks: bool = False,
) -> PreparedData:
    """The data set in `data_dir`, read by the reader of `config.layout` ('labels-csv' or 'mrnet').

    `report_dir` receives labels_problems.txt when labels.csv has more problems than the error shows;
    `on_row(done, total)` is called as the rows of labels.csv are read (a progress display).
    With data.train_fraction < 1 the training split is cut to its nested subset (the rest: 'unused').
    `masks` (model.segmentation) reads labels.csv's mask column too; otherwise no mask is opened.
    """
    if config.layout == "mrnet":
        data = prepare_mrnet(Path(data_dir), config)
    else:
        data = prepare_folder(data_dir, config, report_dir, on_row, masks)
    return with_train_fraction(data, config.train_fraction, config.split_seed)


def with_train_fraction(data: PreparedData, fraction: float, seed: int) -> PreparedData:
    """`data` itself when fraction is 1, else a copy whose training split is cut to its nested,
    stratified, patient-grouped subset (splits.nested_training_subset; the rest is 'unused')."""
    if fraction >= 1.0:
        return data
    strata = [record.stratum for record in data.records]
    patients = data.patients(range(len(data.records)))
    return dataclasses.replace(
        data, splits=nested_training_subset(data.splits, strata, fraction, seed, patients)
    )
