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
from mtl_meniscus.io.imageio import DICOM_SUFFIXES, image_suffix, read_image, read_volume


def read_exam(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """The exam's slices as float32 (S, H, W), in anatomical order for a DICOM series."""
    path = Path(path)
    if path.is_dir():
        return _read_dicom_series(path, max_pixels)
    return read_volume(path, max_pixels)


class ExamVolumes(Sequence):
    """Exams read from their files when asked for, as float32 (S, size, size): a data set of exams
    is read one exam at a time (MRNet's training exams would take about 9 GB as float32 in memory).
    Slices of another size are resized (INTER_AREA, as for single slices)."""

    def __init__(self, paths: Sequence[Path], size: int, max_pixels: int | None = None):
        self.paths, self.size, self.max_pixels = list(paths), size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return resized_slices(read_exam(self.paths[index], self.max_pixels), self.size)


def resized_slices(volume: np.ndarray, size: int) -> np.ndarray:
    """(S, H, W) -> (S, size, size); the volume itself when it already has that size."""
    import cv2

    if volume.shape[1:] == (size, size):
        return volume
    return np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_AREA) for s in volume])


def _read_dicom_series(folder: Path, max_pixels: int | None) -> np.ndarray:
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
    order = _series_order(headers)
    slices = [read_image(file, max_pixels=max_pixels) for file in order]
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise ImageReadError(
            f"{folder}: the series' slices differ in size ({', '.join(map(str, sorted(shapes)))})"
        )
    return np.stack(slices)


def _series_order(headers: dict) -> list[Path]:
    """The files by position along the slice normal when every slice has the geometry tags, else
    by InstanceNumber (one rule for the whole series: mixed keys would not sort)."""

    def position(header) -> float | None:
        orientation = getattr(header, "ImageOrientationPatient", None)
        origin = getattr(header, "ImagePositionPatient", None)
        if orientation is None or origin is None or len(orientation) != 6 or len(origin) != 3:
            return None
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        return float(np.dot(normal, np.asarray(origin, float)))

    positions = {file: position(header) for file, header in headers.items()}
    if all(p is not None for p in positions.values()):
        return sorted(headers, key=lambda file: (positions[file], file.name))
    missing = [file for file, header in headers.items() if getattr(header, "InstanceNumber", None) is None]
    if missing:
        raise ImageReadError(
            f"{missing[0]}: neither ImagePositionPatient/ImageOrientationPatient nor InstanceNumber: "
            "the slice's place in the series is unknown"
        )
    return sorted(headers, key=lambda file: (int(headers[file].InstanceNumber), file.name))
