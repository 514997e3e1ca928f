"""Where a run's images come from: the configured folder, or the built-in phantom when none is given.

The choice is the caller's (training, tune, compare): the readers in mtl_meniscus.data only read.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from mtl_meniscus.config import DataConfig
from mtl_meniscus.engine.progress import counted_progress
from mtl_meniscus.phantom.slices import ensure_phantom


def resolve_data_dir(data: DataConfig, console: Console | None = None) -> Path:
    """The configured data folder, or the built-in phantom (generated into the cache on first use,
    with a progress bar on `console`'s terminal: it takes a few seconds)."""
    if data.path:
        return Path(data.path)
    with counted_progress(console or Console(soft_wrap=True), "generating the built-in phantom") as on_image:
        return ensure_phantom(
            data.phantom_n,
            data.phantom_seed,
            difficulty=data.phantom_difficulty,
            on_image=on_image,
            size=data.image_size,  # drawn at the model's size: none of it excluded as the wrong size
        )
