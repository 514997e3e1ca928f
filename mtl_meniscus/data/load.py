"""One entry to every data set layout: picks the reader that data.layout names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mtl_meniscus.config import DataConfig
from mtl_meniscus.data.folder import prepare_folder
from mtl_meniscus.data.mrnet import prepare_mrnet
from mtl_meniscus.data.records import PreparedData


def prepare_data(
    data_dir: str | Path,
    config: DataConfig,
    report_dir: str | Path | None = None,
    on_row: Callable[[int, int], None] | None = None,
) -> PreparedData:
    """The data set in `data_dir`, read by the reader of `config.layout` ('labels-csv' or 'mrnet').

    `report_dir` receives labels_problems.txt when labels.csv has more problems than the error shows;
    `on_row(done, total)` is called as the rows of labels.csv are read (a progress display).
    """
    if config.layout == "mrnet":
        return prepare_mrnet(Path(data_dir), config)
    return prepare_folder(data_dir, config, report_dir, on_row)
