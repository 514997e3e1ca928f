"""Whole exams: the stack of sagittal slices of one knee.

An exam is a 3D `.npy` (slices first, as MRNet stores them), a NIfTI volume (slices along its last
axis), a multi-frame DICOM file, or a folder of single-slice DICOM files forming one series. A
series is put in order by each slice's position along the slice normal (ImagePositionPatient
projected on the cross product of ImageOrientationPatient's two directions), falling back to
InstanceNumber where those tags are missing; the file names and their order do not matter.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtl_meniscus.errors import ImageReadError
from mtl_meniscus.io.imageio import (
    DICOM_SUFFIXES,
    PixelBudget,
    check_pixel_budget,
    dicom_orientation,
    image_suffix,
    max_pixels_limit,
    read_image,
    read_volume,
)
from mtl_meniscus.io.orientation import CANONICAL_SLICE_LPS, SliceGeometry, check_plane, dicom_geometry


def read_exam(
    path: str | Path,
    max_pixels: int | None = None,
    size: int | None = None,
    plane: str | None = None,
    notes: list[str] | None = None,
    geometry: list[SliceGeometry] | None = None,
) -> np.ndarray:
    """The exam's slices as float32 (S, H, W) in the canonical view (io/orientation.py), in
    anatomical order for a DICOM series.

    The pixel budget (max_pixels, see imageio.max_pixels_limit) is for the whole exam, checked from
    the headers before anything is decoded; with `size` (the model's input size) its slices count
    as resized to size x size when that is larger. With `plane`, an exam of another plane is
    refused; `notes` receives orientation.NOT_IN_FILE for an exam without geometry; `geometry` the
    SliceGeometry of every slice (a series: one per file, in the exam's order) or, for a volume
    file, one for all its slices (see imageio.read_image)."""
    path = Path(path)
    budget = PixelBudget(max_pixels_limit(max_pixels), size)
    if path.is_dir():
        return _read_dicom_series(path, budget, plane, notes, geometry)
    return read_volume(path, budget.limit, size, plane, notes, geometry)


class ExamVolumes(Sequence):
    """Exams read from their files when asked for, as float32 (S, size, size): a data set of exams
    is read one exam at a time (MRNet's training exams would take about 9 GB as float32 in memory).
    Slices of another size are resized (INTER_AREA, as for single slices)."""

    def __init__(self, paths: Sequence[Path], size: int, max_pixels: int | None = None):
        self.paths, self.size, self.max_pixels = list(paths), size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return resized_slices(read_exam(self.paths[index], self.max_pixels, self.size), self.size)


def resized_slices(volume: np.ndarray, size: int) -> np.ndarray:
    """(S, H, W) -> (S, size, size); the volume itself when it already has that size."""
    import cv2

    if volume.shape[1:] == (size, size):
        return volume
    return np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_AREA) for s in volume])


def _read_dicom_series(
    folder: Path,
    budget: PixelBudget,
    plane: str | None,
    notes: list[str] | None,
    geometry: list[SliceGeometry] | None = None,
) -> np.ndarray:
    import pydicom

    files = sorted(p for p in folder.iterdir() if p.is_file() and image_suffix(p) in DICOM_SUFFIXES)
    if not files:
        raise ImageReadError(
            f"{folder}: no DICOM files (.dcm) in this folder; an exam folder holds one series"
        )
    headers = {}
    for file in files:
        try:
            headers[file] = pydicom.dcmread(str(file), stop_before_pixels=True)
        except Exception as err:
            raise ImageReadError(f"{file}: not a readable DICOM file ({type(err).__name__}: {err})") from None
    series: dict[str, list[Path]] = defaultdict(list)
    for file, header in headers.items():
        series[str(getattr(header, "SeriesInstanceUID", "") or "no SeriesInstanceUID")].append(file)
    if len(series) > 1:
        listed = "; ".join(
            f"{uid} ({getattr(headers[members[0]], 'SeriesDescription', '') or 'no description'}, "
            f"{len(members)} files, e.g. {members[0].name})"
            for uid, members in sorted(series.items())
        )
        raise ImageReadError(
            f"{folder}: {len(series)} series in one exam folder: {listed}; put each series in its own folder"
        )
    declared = sum(_declared_pixels(file, header, budget) for file, header in headers.items())
    check_pixel_budget(declared, budget, f"{folder}: a series of {len(files)} DICOM files")
    normal, found = _series_normal(headers)
    check_plane(found, plane, str(folder))  # before the order: another plane is the clearer message
    order = _series_order(headers, normal)
    slices = [
        read_image(file, max_pixels=budget.limit, plane=plane, notes=notes, geometry=geometry)
        for file in order
    ]
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise ImageReadError(
            f"{folder}: the series' slices differ in size ({', '.join(map(str, sorted(shapes)))})"
        )
    return np.stack(slices)


def _declared_pixels(file: Path, header, budget: PixelBudget) -> int:
    """What a series file will hold in memory, from its header (rows x columns x frames)."""
    try:
        rows, columns = int(header.Rows), int(header.Columns)
        frames = int(getattr(header, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as err:
        raise ImageReadError(
            f"{file}: no usable Rows/Columns/NumberOfFrames ({type(err).__name__}: {err})"
        ) from None
    return budget.cost(frames, rows, columns)


def _series_order(headers: dict, normal: np.ndarray | None) -> list[Path]:
    """The files by position along the slice normal when every slice has the geometry tags, else
    by InstanceNumber (one rule for the whole series: mixed keys would not sort). Two files at one
    place (a slice exported twice) are refused, naming both."""
    positions = {file: _position(file, header, normal) for file, header in headers.items()}
    if all(p is not None for p in positions.values()):
        keys = positions
        what = "position along the slice normal (mm)"
    else:
        missing = [
            file for file, header in headers.items() if getattr(header, "InstanceNumber", None) is None
        ]
        if missing:
            raise ImageReadError(
                f"{missing[0]}: neither ImagePositionPatient/ImageOrientationPatient nor InstanceNumber: "
                "the slice's place in the series is unknown"
            )
        keys = {
            file: _number(file, header.InstanceNumber, "InstanceNumber") for file, header in headers.items()
        }
        what = "InstanceNumber"
    order = sorted(headers, key=lambda file: (keys[file], file.name))
    for first, second in zip(order, order[1:]):
        if np.isclose(keys[first], keys[second], rtol=0, atol=1e-4):
            raise ImageReadError(
                f"{first} and {second} have the same {what}: {keys[first]:g}; one slice exported twice, "
                "or two series in one folder; remove the duplicate"
            )
    return order


def _series_normal(headers: dict) -> tuple[np.ndarray | None, str | None]:
    """(The series' slice normal (LPS), pointing the way a canonical volume's slices run
    (orientation.CANONICAL_SLICE_LPS), and its plane); (None, None) without orientation tags.
    Slices that disagree on their orientation are refused, naming two of them."""
    found = {}
    for file, header in headers.items():
        orientation = dicom_orientation(header)
        if orientation is not None:
            found[file] = np.array(
                [_number(file, v, "ImageOrientationPatient") for v in _values(orientation)]
            )
    if not found:
        return None, None
    first, reference = next(iter(found.items()))
    for file, values in found.items():
        if values.shape != reference.shape or not np.allclose(values, reference, atol=1e-3):
            raise ImageReadError(
                f"{first} and {file} disagree on ImageOrientationPatient ({list(reference)} vs {list(values)}): "
                "the slices of one series share one orientation; put each series in its own folder"
            )
    geometry = dicom_geometry(reference)  # refuses a degenerate orientation
    normal = np.cross(reference[:3], reference[3:])
    axis, sign = CANONICAL_SLICE_LPS[geometry.plane]
    return (normal if normal[axis] * sign >= 0 else -normal), geometry.plane


def _position(file: Path, header, normal: np.ndarray | None) -> float | None:
    """The slice's position along the series' normal (mm); None without the geometry tags."""
    try:
        origin = getattr(header, "ImagePositionPatient", None)
    except (TypeError, ValueError) as err:  # a value pydicom cannot convert when it is read
        raise ImageReadError(f"{file}: unreadable geometry tags ({type(err).__name__}: {err})") from None
    if origin is None or normal is None or dicom_orientation(header) is None:
        return None
    point = [_number(file, v, "ImagePositionPatient") for v in _values(origin)]
    if len(point) != 3:
        return None
    return float(np.dot(normal, np.asarray(point)))


def _values(value) -> list:
    """A multi-valued tag as a list; a single value (or text) as a list of one."""
    return list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]


def _number(file: Path, value, tag: str) -> float:
    """A DICOM tag's value as a finite number, or an ImageReadError naming the file and the tag."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ImageReadError(f"{file}: {tag} {value!r} is not a number") from None
    if not np.isfinite(number):
        raise ImageReadError(f"{file}: {tag} {value!r} is not a finite number")
    return number
