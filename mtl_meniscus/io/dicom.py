"""Reading DICOM files, and where one keeps a slice's geometry and pixel scaling, classic or
Enhanced (multi-frame).

A classic MR file holds ImageOrientationPatient, ImagePositionPatient and RescaleSlope/Intercept at
its top level. An Enhanced MR file (one file, many frames) keeps them in functional groups: each
either shared by every frame (SharedFunctionalGroupsSequence) or given frame by frame
(PerFrameFunctionalGroupsSequence, one item per frame, as many vendors write the orientation and
the rescale). The frames need not be stored in spatial order, so a volume's frames are put in order
along the slice normal, as a series' files are (io/exams.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtl_meniscus.errors import ImageReadError
from mtl_meniscus.io.orientation import canonical_normal

# Two orientations closer than this (direction cosines) are one: a series' files, a file's frames
SAME_ORIENTATION = 1e-3


def read_dicom(path: Path, stop_before_pixels: bool = False):
    """pydicom.dcmread, and for a file without the 128-byte preamble and 'DICM' (older exports,
    some PACS) a second try without them, kept when it holds an image (Rows and Columns), its
    transfer syntax taken from how it was encoded when it has no file meta header; an
    ImageReadError otherwise."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass
    try:
        dataset = pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels, force=True)
        is_image = "Rows" in dataset and "Columns" in dataset
    except Exception:  # noqa: BLE001 - whatever a forced read of a non-DICOM file raises
        is_image = False
    if not is_image:
        raise ImageReadError("not a DICOM file (no DICOM preamble, and no image read without one)")
    if "TransferSyntaxUID" not in dataset.file_meta:  # a bare data set: as it was encoded
        implicit, little = dataset.original_encoding
        dataset.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return dataset


def frame_count(dataset) -> int:
    """NumberOfFrames (1 when absent or empty)."""
    return int(getattr(dataset, "NumberOfFrames", 1) or 1)


def _group(dataset, frame: int, sequence: str):
    """The first item of functional group `sequence` (e.g. 'PlaneOrientationSequence') for `frame`
    (0-based): the frame's own, else the shared one; None when the file has neither. A per-frame
    sequence of another length than NumberOfFrames is refused: which item is which frame's is lost."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    items = []
    if per_frame is not None and len(per_frame) != frame_count(dataset):
        raise ImageReadError(
            f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {frame_count(dataset)} frames "
            "(NumberOfFrames): a damaged or cut-short file"
        )
    if per_frame is not None:
        items.append(per_frame[frame])
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared:
        items.append(shared[0])
    for item in items:
        found = item.get(sequence)
        if found:
            return found[0]
    return None


def _frame_orientation(dataset, frame: int):
    group = _group(dataset, frame, "PlaneOrientationSequence")
    return None if group is None else group.get("ImageOrientationPatient")


def dicom_orientation(dataset):
    """ImageOrientationPatient of a DICOM dataset: its own, or an Enhanced file's functional
    groups' (shared, or every frame's, which must agree); None when it has none. An
    ImageReadError names two frames that disagree (a localizer of three planes in one file) or a
    frame without one among frames with one (it could lie mirrored among them)."""
    if "ImageOrientationPatient" in dataset:
        return dataset.ImageOrientationPatient
    frames = [_frame_orientation(dataset, frame) for frame in range(frame_count(dataset))]
    given = [(frame, value) for frame, value in enumerate(frames) if value is not None]
    if not given:
        return None
    first, reference = given[0]
    if len(given) < len(frames):
        bare = next(frame for frame, value in enumerate(frames) if value is None)
        raise ImageReadError(
            f"frame {bare + 1} has no ImageOrientationPatient (PlaneOrientationSequence) while frame "
            f"{first + 1} has one: its pixels cannot be brought to the others' orientation"
        )
    for frame, value in given[1:]:
        if len(value) != len(reference) or not np.allclose(
            np.asarray(value, float), np.asarray(reference, float), atol=SAME_ORIENTATION
        ):
            raise ImageReadError(
                f"frames {first + 1} and {frame + 1} disagree on ImageOrientationPatient ({list(reference)} vs "
                f"{list(value)}): a file of several planes or stacks (a localizer?); give one stack of one plane"
            )
    return reference


def dicom_position(dataset, frame: int = 0):
    """ImagePositionPatient of a single-frame file (its own), or of one frame of an Enhanced file
    (its PlanePositionSequence, per frame or shared); None when it has none. A multi-frame file's
    top-level ImagePositionPatient (a legacy conversion) is its first frame's alone: not every frame's."""
    if "ImagePositionPatient" in dataset and frame_count(dataset) == 1:
        return dataset.ImagePositionPatient
    group = _group(dataset, frame, "PlanePositionSequence")
    return None if group is None else group.get("ImagePositionPatient")


def modality_values(pixels: np.ndarray, dataset) -> np.ndarray:
    """Stored values to real ones: the top level's RescaleSlope/RescaleIntercept or modality LUT
    (pydicom's apply_modality_lut), else an Enhanced file's Pixel Value Transformation, frame by
    frame (`pixels` (frames, H, W) for a multi-frame file, (H, W) for one frame); pixels
    unchanged when the file has no scaling."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in dataset or "RescaleSlope" in dataset:
        return apply_modality_lut(pixels, dataset)
    frames = pixels if pixels.ndim == 3 else pixels[None]
    scales = [_group(dataset, frame, "PixelValueTransformationSequence") for frame in range(len(frames))]
    if all(scale is None or "RescaleSlope" not in scale for scale in scales):
        return pixels
    values = np.empty(frames.shape, np.float64)
    for frame, scale in enumerate(scales):
        slope = float(scale.get("RescaleSlope", 1.0)) if scale is not None else 1.0
        intercept = float(scale.get("RescaleIntercept", 0.0)) if scale is not None else 0.0
        values[frame] = frames[frame] * slope + intercept
    return values.reshape(pixels.shape)


def frame_order(dataset, orientation) -> list[int] | None:
    """A multi-frame file's frames (0-based) in the order a canonical volume's slices run (along
    the slice normal, as a series' files are ordered), when every frame has a position and the file
    an orientation; None otherwise (the frames are kept in file order). Two frames at one place
    (several echoes or time points in one file) are refused, naming both."""
    frames = frame_count(dataset)
    positions = [dicom_position(dataset, frame) for frame in range(frames)]
    if frames < 2 or orientation is None or any(p is None or len(p) != 3 for p in positions):
        return None
    normal, _ = canonical_normal(orientation)
    places = [float(np.dot(normal, np.asarray(p, float))) for p in positions]
    order = sorted(range(frames), key=lambda frame: (places[frame], frame))
    for first, second in zip(order, order[1:]):
        if np.isclose(places[first], places[second], rtol=0, atol=1e-4):
            first, second = sorted((first, second))
            raise ImageReadError(
                f"frames {first + 1} and {second + 1} lie at the same place ({places[first]:g} mm along the "
                "slice normal): several echoes, time points or stacks in one file? give one stack"
            )
    return order
