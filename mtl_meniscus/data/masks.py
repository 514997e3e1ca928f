"""Label masks of labels.csv's optional `mask` column, read with checks: one label image per row,
the size of the row's image, values 0 background, 1 meniscus, 2 tear.

A row without a mask has none (None): partial supervision, not a problem. A folder's masks are
checked at once, and every bad row is reported in one DataError, as read_labels reports labels.csv.
A mask must also agree with its row's label: no tear pixels
on a row labelled no tear. A tear row without tear pixels is fine: its mask may outline the
meniscus only.
A mask file without an orientation of its own (PNG, TIFF, .npy; a NIfTI without qform/sform) is in
its image file's stored pixel grid, as predict --masks writes masks and as annotation tools draw on
a file's pixel array: it is turned to the canonical view (io/orientation.py) with its image's
geometry, so that a mirrored DICOM's mask stays on its tear. A DICOM or NIfTI mask with an
orientation of its own is turned by it, as every such file is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from mtl_meniscus.data.records import Record, problems_error
from mtl_meniscus.errors import ImageReadError
from mtl_meniscus.io.imageio import read_image
from mtl_meniscus.io.orientation import AS_STORED, SliceGeometry
from mtl_meniscus.labels import DEFAULT_TASKS

# The phantom (phantom/slices.py) and the fastMRI+ import (data/fastmri.py) write these values.
MASK_BACKGROUND, MASK_MENISCUS, MASK_TEAR = 0, 1, 2
MASK_VALUES = {MASK_BACKGROUND: "background", MASK_MENISCUS: "meniscus", MASK_TEAR: "tear"}
_ALLOWED = ", ".join(f"{value} {name}" for value, name in MASK_VALUES.items())
_SHOWN_VALUES = 5  # bad values named in a problem line
MASK_VOLUME_HINT = "a mask is one 2D label image per row, of that row's slice"
TEAR_TASK = DEFAULT_TASKS.root  # fissure: the label that MASK_TEAR pixels draw


def read_masks(
    data_dir: str | Path,
    records: Sequence[Record],
    images: Sequence[tuple[tuple[int, int], SliceGeometry]] | None = None,
    report_dir: str | Path | None = None,
    max_pixels: int | None = None,
) -> list[np.ndarray | None]:
    """Each row's mask as uint8 (H, W) in its image's canonical view, None where the row has none;
    one DataError listing every bad row (file missing or unreadable, size not its image's, values
    other than 0, 1, 2, tear pixels on a row whose fissure is 0).

    `images` (one per record: its image's (H, W) as read and the SliceGeometry that read it) saves
    reading the images again; without it each image is read for its size and geometry.
    `report_dir` receives the full list when the message shows only part of it (as for labels.csv).
    """
    data_dir = Path(data_dir)
    problems: list[str] = []
    last_volume: dict = {}  # rows naming slices of one volume decode it once (read_image)
    masks = []
    for k, record in enumerate(records):
        image = images[k] if images is not None else None
        if record.mask and image is None:
            image = _image_view(data_dir, record, problems, last_volume, max_pixels)
        mask = _row_mask(data_dir, record, image, problems, max_pixels) if record.mask else None
        if mask is not None and not _agrees(data_dir, record, mask, problems):
            mask = None
        masks.append(mask)
    if problems:
        raise problems_error(data_dir / "labels.csv", problems, report_dir)
    return masks


def resized_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """`mask` at size x size, each pixel the label of its nearest source pixel (labels stay labels),
    as data.size_policy resize does to its image."""
    if mask.shape == (size, size):
        return mask
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)


def read_row_mask(
    data_dir: str | Path,
    record: Record,
    image_shape: tuple[int, int],
    image_geometry: SliceGeometry = AS_STORED,
    max_pixels: int | None = None,
) -> np.ndarray | None:
    """One row's mask as uint8 (H, W) in its image's canonical view (`image_shape` (H, W) as read,
    `image_geometry` the SliceGeometry that read it), None when the row has none; a DataError naming
    the row and file."""
    problems: list[str] = []
    image = (image_shape, image_geometry)
    mask = _row_mask(Path(data_dir), record, image, problems, max_pixels) if record.mask else None
    if problems:
        raise problems_error(Path(data_dir) / "labels.csv", problems)
    return mask


def _image_view(
    data_dir: Path,
    record: Record,
    problems: list[str],
    last_volume: dict,
    max_pixels: int | None,
) -> tuple[tuple[int, int], SliceGeometry] | None:
    """The (H, W) of the row's image as read and the geometry that read it, or None after adding a
    problem: a mask's size is checked against it, and a mask without geometry takes the image's."""
    geometry: list[SliceGeometry] = []
    try:
        image = read_image(
            data_dir / record.image,
            record.slice,
            max_pixels=max_pixels,
            last_volume=last_volume,
            geometry=geometry,
        )
    except ImageReadError as err:
        problems.append(f"row {record.row}, column 'image': {err} (its mask's size cannot be checked)")
        return None
    return image.shape, geometry[0]


def _row_mask(
    data_dir: Path,
    record: Record,
    image: tuple[tuple[int, int], SliceGeometry] | None,
    problems: list[str],
    max_pixels: int | None,
) -> np.ndarray | None:
    """The row's mask in its image's canonical view, or None after adding a problem naming the row
    (labels.csv line) and the file. `image`: the image's (H, W) as read and its geometry; None (the
    image could not be read): the size is not checked and the mask is taken as stored."""
    where = f"row {record.row}, column 'mask'"
    path = data_dir / record.mask
    try:
        found = path.is_file()
    except OSError:
        found = False
    if not found:
        problems.append(f"{where}: file not found: {path}")
        return None
    own: list[SliceGeometry] = []
    try:
        # float32 (H, W); a failure's message names the file
        pixels = read_image(path, max_pixels=max_pixels, volume_hint=MASK_VOLUME_HINT, geometry=own)
    except ImageReadError as err:
        problems.append(f"{where}: {err}")
        return None
    image_shape, image_geometry = image if image is not None else (None, AS_STORED)
    # drawn on the image file's stored pixels: compared with them (the sizes the user sees), then
    # turned as its image was
    geometry = image_geometry if own[0].plane is None else AS_STORED
    if image_shape is not None and pixels.shape != geometry.stored_shape(image_shape):
        problems.append(
            f"{where}: {path}: {_size(pixels.shape)} (height x width), but its image {record.image} "
            f"is {_size(geometry.stored_shape(image_shape))}"
        )
        return None
    pixels = geometry.apply(pixels)
    bad = _bad_values(pixels)
    if bad:
        problems.append(f"{where}: {path}: {bad} (allowed: {_ALLOWED})")
        return None
    return pixels.astype(np.uint8)


def _agrees(data_dir: Path, record: Record, mask: np.ndarray, problems: list[str]) -> bool:
    """False, after adding a problem naming the row, when the mask draws a tear on a row labelled
    no tear: trained on, the decoder would learn a tear where the labels say none, and the two
    would contradict each other without a word. Only that way round: a tear row's mask may hold
    no tear pixels (it may outline the meniscus only)."""
    text = record.labels.get(TEAR_TASK.name, "")
    tear_pixels = int((mask == MASK_TEAR).sum())
    if text != TEAR_TASK.text(0.0) or not tear_pixels:
        return True
    problems.append(
        f"row {record.row}, column 'mask': {data_dir / record.mask}: {tear_pixels} tear pixel"
        f"{'s' if tear_pixels > 1 else ''} (value {MASK_TEAR}), but the row's {TEAR_TASK.name} is "
        f"{text} (no tear): correct the label or the mask"
    )
    return False


def _size(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)


def _bad_values(pixels: np.ndarray) -> str:
    """'' when every pixel is an allowed label, else which values are not, e.g. 'values 3, 255'."""
    values = np.unique(pixels)
    bad = values[~np.isin(values, list(MASK_VALUES))]
    if not len(bad):
        return ""
    shown = ", ".join(f"{v:g}" for v in bad[:_SHOWN_VALUES])
    more = f" and {len(bad) - _SHOWN_VALUES} more" if len(bad) > _SHOWN_VALUES else ""
    count = int(np.isin(pixels, bad).sum())
    return f"value{'s' if len(bad) > 1 else ''} {shown}{more} ({count} pixel{'s' if count > 1 else ''})"
