"""Whole exams: the stack of sagittal slices of one knee.

An exam is a 3D `.npy` (slices first, as MRNet stores them), a NIfTI volume (slices along its last
axis), a multi-frame DICOM file, or a folder of single-slice DICOM files forming one series. A
series is put in order by each slice's position along the slice normal (ImagePositionPatient
projected on the cross product of ImageOrientationPatient's two directions), falling back to
InstanceNumber where those tags are missing; the file names and their order do not matter. A
series file is recognised by its suffix (.dcm, .dicom) or, without an image suffix (IM0001,
1.2.840...), by the DICOM preamble; the DICOMDIR index and other files are ignored. Uneven
spacing between slices (a slice missing?) is noted, not refused: some protocols space them so.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtl_meniscus.errors import ImageReadError
from mtl_meniscus.io.dicom import SAME_ORIENTATION, dicom_orientation, dicom_position, frame_count, read_dicom
from mtl_meniscus.io.imageio import (
    DICOM_SUFFIXES,
    PixelBudget,
    check_pixel_budget,
    max_pixels_limit,
    read_image,
    read_volume,
    reader_suffix,
)
from mtl_meniscus.io.orientation import SliceGeometry, canonical_normal, check_plane

# The DICOMDIR of an export (Media Storage Directory Storage): an index of the files, with no image
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# A step between neighbouring slices this many times the series' usual one (or its inverse) is noted
UNEVEN_SPACING = 1.5


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
    refused; `notes` receives orientation.NOT_IN_FILE for an exam without geometry and, for a
    series, what its order leaves in doubt (uneven spacing: a slice missing?); `geometry` the
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
    headers = _series_headers(folder)
    files = list(headers)
    multi_frame = [file for file, header in headers.items() if frame_count(header) > 1]
    if multi_frame and len(files) == 1:  # one Enhanced file in a folder of its own: the exam is its volume
        return read_volume(files[0], budget.limit, budget.size, plane, notes, geometry)
    if multi_frame:
        raise ImageReadError(
            f"{multi_frame[0]}: a multi-frame file ({frame_count(headers[multi_frame[0]])} frames) among the "
            f"{len(files)} DICOM files of {folder}: a series folder holds single-slice files; give the "
            "multi-frame file as an exam of its own"
        )
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
    order, order_notes = _series_order(headers, normal)
    slices = [_read_series_slice(file, budget.limit, plane, notes, geometry) for file in order]
    by_shape: dict[tuple, list[Path]] = defaultdict(list)
    for file, pixels in zip(order, slices):
        by_shape[pixels.shape].append(file)
    if len(by_shape) > 1:  # a scout or another series' slice among them, most often: name the files
        sizes = "; ".join(
            f"{shape[0]}x{shape[1]}: {len(files)} file{'s' if len(files) > 1 else ''} (e.g. {files[0].name})"
            for shape, files in sorted(by_shape.items(), key=lambda item: len(item[1]))
        )
        raise ImageReadError(f"{folder}: the series' slices differ in size ({sizes})")
    if notes is not None:
        notes.extend(note for note in order_notes if note not in notes)
    return np.stack(slices)


def _series_headers(folder: Path) -> dict[Path, object]:
    """The header of every image file of a series folder, in file-name order.

    A file is taken by its suffix (.dcm, .dicom) or, without an image suffix, by its content: many
    exports name their files IM0001 or by UID (1.2.840....), and dropping such a file would lose a
    slice without a word. Other files (README.txt, a .png) are ignored, and so is the DICOMDIR: a
    DICOM file too, but an index of the export with no image."""
    try:
        entries = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError as err:
        raise ImageReadError(f"{folder}: cannot list the folder ({err.strerror or err})") from None
    files = [p for p in entries if is_series_file(p)]
    headers = {}
    for file in files:
        try:
            header = read_dicom(file, stop_before_pixels=True)
        except Exception as err:
            raise ImageReadError(f"{file}: not a readable DICOM file ({type(err).__name__}: {err})") from None
        meta = getattr(header, "file_meta", None)
        if str(getattr(meta, "MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:  # a DICOMDIR renamed
            continue
        if "Rows" not in header or "Columns" not in header:  # before the series check: the clearer message
            raise ImageReadError(
                f"{file}: a DICOM file without an image (no Rows/Columns: a damaged file, or a report or "
                "other non-image object); a series folder holds the series' slices only"
            )
        headers[file] = header
    if not headers:
        raise ImageReadError(
            f"{folder}: no DICOM files (.dcm, or files starting with the DICOM preamble) in this folder; "
            "an exam folder holds one series"
        )
    return headers


def _read_series_slice(
    file: Path, limit: int, plane: str | None, notes: list[str] | None, geometry: list[SliceGeometry] | None
) -> np.ndarray:
    """One file of a series, read as any DICOM slice (the canonical view, the plane check, the note,
    the geometry), whatever its name: read_image knows a DICOM file without a suffix by its content."""
    hint = "a series folder holds single-slice files; give a multi-frame file as an exam of its own"
    return read_image(file, max_pixels=limit, volume_hint=hint, plane=plane, notes=notes, geometry=geometry)


def is_series_file(file: Path) -> bool:
    """Whether a series folder's reader takes `file` as one of its slices: a .dcm/.dicom name, or
    no image suffix and the DICOM preamble (imageio.reader_suffix); never the DICOMDIR.
    ImageReadError if it cannot be read."""
    return file.name.upper() != "DICOMDIR" and reader_suffix(file) in DICOM_SUFFIXES


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


def _series_order(headers: dict, normal: np.ndarray | None) -> tuple[list[Path], list[str]]:
    """(The files by position along the slice normal when every slice has the geometry tags, else
    by InstanceNumber (one rule for the whole series: mixed keys would not sort), notes on the
    order for the exam's row). Two files at one place (a slice exported twice) are refused, naming
    both; uneven spacing and, in a series with its orientation, positions missing are noted."""
    positions = {file: _position(file, header, normal) for file, header in headers.items()}
    notes = []
    if all(p is not None for p in positions.values()):
        keys, unit = positions, "mm"
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
        what = unit = "InstanceNumber"
        if normal is not None:  # without orientation the exam's row says so already (NOT_IN_FILE)
            unplaced = [file for file, position in positions.items() if position is None]
            notes.append(
                f"no usable ImagePositionPatient in {len(unplaced)} of {len(headers)} files "
                f"(e.g. {unplaced[0].name}): slices ordered by InstanceNumber"
            )
    order = sorted(headers, key=lambda file: (keys[file], file.name))
    for first, second in zip(order, order[1:]):
        if np.isclose(keys[first], keys[second], rtol=0, atol=1e-4):
            raise ImageReadError(
                f"{first} and {second} have the same {what}: {keys[first]:g}; one slice exported twice, "
                "or two series in one folder; remove the duplicate"
            )
    spacing = _spacing_note(order, [keys[file] for file in order], unit)
    return order, notes + ([spacing] if spacing else [])


def _spacing_note(order: list[Path], keys: list[float], unit: str) -> str:
    """A note naming the steps between neighbouring slices (0-based, as predict numbers them) that
    differ from the series' usual step by more than UNEVEN_SPACING times; '' when it is even.

    A wider step is most often a slice missing from the export, but a protocol may also space its
    slices so: it is said in the exam's row, not refused. The usual step is the lower median, so
    that of two steps the smaller is taken as the rule and the wider as the gap."""
    steps = np.diff(keys)
    if len(steps) < 2:
        return ""
    usual = statistics.median_low(steps.tolist())
    odd = [k for k, step in enumerate(steps) if not usual / UNEVEN_SPACING <= step <= usual * UNEVEN_SPACING]
    if not odd:
        return ""

    def amount(value: float) -> str:
        return f"{value:.1f} mm" if unit == "mm" else f"{value:g}"

    def where(k: int) -> str:
        return f"slices {k}-{k + 1} ({order[k].name}, {order[k + 1].name})"

    first, *rest = odd[:3]
    apart = f"{amount(steps[first])} apart" + ("" if unit == "mm" else f" in {unit}")
    named = [f"{where(first)} are {apart}"] + [f"{where(k)} {amount(steps[k])}" for k in rest]
    more = f", and {len(odd) - 3} more such steps" if len(odd) > 3 else ""
    if all(steps[k] > usual for k in odd):
        hint = "a slice missing?" if len(odd) == 1 else "slices missing?"
    else:
        hint = "uneven slice spacing"
    return f"{', '.join(named)}{more}, the others {amount(usual)}: {hint}"


def _series_normal(headers: dict) -> tuple[np.ndarray | None, str | None]:
    """(The series' slice normal (LPS), pointing the way a canonical volume's slices run
    (orientation.CANONICAL_SLICE_LPS), and its plane); (None, None) without orientation tags.
    Slices that disagree on their orientation are refused, naming two of them, and so is a slice
    without orientation among slices with one: read as stored, it could lie mirrored among them."""
    found = {}
    for file, header in headers.items():
        orientation = dicom_orientation(header)
        if orientation is not None:
            found[file] = np.array(
                [_number(file, v, "ImageOrientationPatient") for v in _values(orientation)]
            )
            if found[file].shape != (6,):  # malformed, named as such (not as two files that disagree)
                raise ImageReadError(
                    f"{file}: ImageOrientationPatient {found[file].tolist()} is not 6 numbers (the row and "
                    "column direction cosines)"
                )
    if not found:
        return None, None
    first, reference = next(iter(found.items()))
    bare = [file for file in headers if file not in found]
    if bare:
        others = f" (and {len(bare) - 1} more)" if len(bare) > 1 else ""
        raise ImageReadError(
            f"{bare[0]}{others}: no ImageOrientationPatient, while the other {len(found)} files of the "
            f"series have one (e.g. {first.name}): its pixels cannot be brought to the series' orientation "
            "(read as stored, it could lie mirrored among them); restore the tag or remove the file"
        )
    for file, values in found.items():
        if values.shape != reference.shape or not np.allclose(values, reference, atol=SAME_ORIENTATION):
            raise ImageReadError(
                f"{first} and {file} disagree on ImageOrientationPatient ({reference.tolist()} vs {values.tolist()}): "
                "the slices of one series share one orientation; put each series in its own folder"
            )
    return canonical_normal(reference)  # refuses a degenerate orientation


def _position(file: Path, header, normal: np.ndarray | None) -> float | None:
    """The slice's position along the series' normal (mm); None without the geometry tags."""
    try:
        origin = dicom_position(header)  # an Enhanced file's is in its functional groups
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
