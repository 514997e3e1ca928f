"""One canonical view for every reader: the plane a slice was taken in, and its pixels turned so
that a model always sees a knee the same way round.

The canonical sagittal view (the phantom's, and the reference's images'): anterior on the left,
superior at the top; a volume's slices run from the patient's left to their right. Coronal:
superior at the top, the patient's right on the image's left (the radiological convention).
Axial: anterior at the top, the patient's right on the image's left.

DICOM gives a slice's geometry in ImageOrientationPatient: the patient-space directions (LPS: +x
to the patient's left, +y posterior, +z superior) of moving right along a row and down a column.
NIfTI gives it in its affine (RAS: +x right, +y anterior, +z superior). Where a file says nothing
(no ImageOrientationPatient; a NIfTI with neither sform nor qform, or an identity affine, which
says nothing about a patient), its pixels are taken as stored and the reader says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtl_meniscus.errors import ImageReadError

PLANES = ("sagittal", "coronal", "axial")
NOT_IN_FILE = "orientation not in the file: taken as stored"
# The normal's dominant patient axis (x, y, z in either convention) names the plane.
PLANE_OF_NORMAL = {0: "sagittal", 1: "coronal", 2: "axial"}
# Canonical in-plane directions in LPS: (axis, sign) of moving right along a row, and down a column.
CANONICAL_LPS = {
    "sagittal": ((1, +1), (2, -1)),  # right along a row: posterior (+y); down: inferior (-z)
    "coronal": ((0, +1), (2, -1)),  # right along a row: to the patient's left (+x); down: inferior
    "axial": ((0, +1), (1, +1)),  # right along a row: to the patient's left; down: posterior (+y)
}
# A sagittal slice's rows run along the anterior-posterior axis (LPS y, +y posterior); the canonical
# view gives the sign of moving right along a row: +1, so the posterior meniscus horn is the one
# further right (data/roi.py and the ROI models of networks/models.py name the horns by it).
POSTERIOR_IS_RIGHT = CANONICAL_LPS["sagittal"][0][1] > 0
# The direction (LPS axis, sign) in which a canonical volume's slice index grows: R, P, I below.
CANONICAL_SLICE_LPS = {"sagittal": (0, -1), "coronal": (1, +1), "axial": (2, -1)}
# The same as NIfTI (nibabel) axis codes for (slices, rows, columns) of a canonical volume.
CANONICAL_AXCODES = {
    "sagittal": ("R", "I", "P"),
    "coronal": ("P", "I", "L"),
    "axial": ("I", "P", "L"),
}


@dataclass(frozen=True)
class SliceGeometry:
    """How to bring a stored slice (..., H, W) to the canonical view of its plane."""

    plane: str | None  # None: the file says nothing (NOT_IN_FILE)
    transpose: bool = False  # swap rows and columns first
    flip_rows: bool = False  # then reverse the rows (top <-> bottom)
    flip_columns: bool = False  # and the columns (left <-> right)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """`pixels` (..., H, W) in the canonical view (a view or a copy; the input is unchanged)."""
        if self.transpose:
            pixels = np.swapaxes(pixels, -1, -2)
        if self.flip_rows:
            pixels = pixels[..., ::-1, :]
        if self.flip_columns:
            pixels = pixels[..., :, ::-1]
        return np.ascontiguousarray(pixels)

    def undo(self, pixels: np.ndarray) -> np.ndarray:
        """`pixels` (..., H, W) in the canonical view back in the stored slice's geometry: apply's
        inverse (a mask predicted on the canonical view, laid on the file's own pixels)."""
        if self.flip_columns:
            pixels = pixels[..., :, ::-1]
        if self.flip_rows:
            pixels = pixels[..., ::-1, :]
        if self.transpose:
            pixels = np.swapaxes(pixels, -1, -2)
        return np.ascontiguousarray(pixels)

    def stored_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The stored slice's (H, W) of a canonical slice of `shape` (H, W)."""
        return (shape[1], shape[0]) if self.transpose else (shape[0], shape[1])

    def undo_box(self, box: tuple[int, int, int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
        """A box (x0, y0, x1, y1; x1 and y1 excluded) on a canonical slice of `shape` (H, W), as the
        box of the same pixels in the stored slice: undo's counterpart for coordinates."""
        x0, y0, x1, y1 = box
        height, width = shape
        if self.flip_columns:
            x0, x1 = width - x1, width - x0
        if self.flip_rows:
            y0, y1 = height - y1, height - y0
        if self.transpose:
            x0, y0, x1, y1 = y0, x0, y1, x1
        return (x0, y0, x1, y1)

    @property
    def note(self) -> str:
        return NOT_IN_FILE if self.plane is None else ""


AS_STORED = SliceGeometry(None)


def dicom_geometry(orientation) -> SliceGeometry:
    """The geometry of a DICOM slice from its ImageOrientationPatient (6 numbers), or AS_STORED
    when there is none; an ImageReadError for one that is not 6 finite numbers or is degenerate
    (a zero vector, or two parallel ones)."""
    if orientation is None:
        return AS_STORED
    try:
        values = np.array([float(v) for v in orientation], float)
    except (TypeError, ValueError):
        raise ImageReadError(f"ImageOrientationPatient {orientation!r} is not 6 numbers") from None
    if values.shape != (6,) or not np.isfinite(values).all():
        raise ImageReadError(f"ImageOrientationPatient {values.tolist()} is not 6 finite numbers")
    along_row, down_column = values[:3], values[3:]
    normal = np.cross(along_row, down_column)
    if min(np.linalg.norm(along_row), np.linalg.norm(down_column)) < 1e-3 or np.linalg.norm(normal) < 1e-3:
        raise ImageReadError(
            f"degenerate ImageOrientationPatient {values.tolist()}: its two directions must be non-zero "
            "and not parallel"
        )
    plane = PLANE_OF_NORMAL[int(np.argmax(np.abs(normal)))]
    return _geometry(plane, along_row, down_column)


def canonical_normal(orientation) -> tuple[np.ndarray, str]:
    """(The slice normal (LPS) of an ImageOrientationPatient, pointing the way a canonical volume's
    slices run (CANONICAL_SLICE_LPS), and its plane): a slice's position along it orders a series'
    files or a multi-frame file's frames. An ImageReadError for a degenerate orientation."""
    geometry = dicom_geometry(orientation)
    values = np.asarray([float(v) for v in orientation], float)
    normal = np.cross(values[:3], values[3:])
    axis, sign = CANONICAL_SLICE_LPS[geometry.plane]
    return (normal if normal[axis] * sign >= 0 else -normal), geometry.plane


def _geometry(plane: str, along_row: np.ndarray, down_column: np.ndarray) -> SliceGeometry:
    """The transpose and flips that take (along_row, down_column), LPS, to the plane's canonical pair."""
    (right_axis, right_sign), (down_axis, down_sign) = CANONICAL_LPS[plane]
    # stored rows run along the canonical down axis: swap rows and columns first
    transpose = abs(along_row[right_axis]) < abs(down_column[right_axis])
    if transpose:
        along_row, down_column = down_column, along_row
    return SliceGeometry(
        plane,
        transpose=transpose,
        flip_rows=np.sign(down_column[down_axis]) != down_sign,
        flip_columns=np.sign(along_row[right_axis]) != right_sign,
    )


def nifti_canonical(volume: np.ndarray, affine: np.ndarray | None) -> tuple[np.ndarray, SliceGeometry]:
    """A 3-D NIfTI array (i, j, k) as (slices, rows, columns) in the canonical view of its plane,
    and the geometry of a slice: its plane and how a stored slice (the array at one index of the
    slice axis, the other two axes in stored order) turns into a canonical one. The slice axis is
    the only axis of length 1 (a single slice), else the voxel axis with the thickest voxels (a 2-D
    acquisition's slices are thicker than its pixels), or k (the converters' slice axis) when the
    voxels are near isotropic. Without geometry (affine None or the identity), slices are taken
    along k as stored (AS_STORED). An ImageReadError for a singular affine.
    """
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    if affine is None or np.allclose(affine, np.eye(4)):
        return np.moveaxis(volume, -1, 0), AS_STORED
    rotation = np.asarray(affine, float)[:3, :3]
    if not np.isfinite(rotation).all() or abs(np.linalg.det(rotation)) < 1e-9:
        raise ImageReadError("singular NIfTI affine (its voxel axes do not span space)")
    current = io_orientation(affine)  # per voxel axis: (world axis in RAS, direction)
    plane = PLANE_OF_NORMAL[int(current[_slice_axis(rotation, volume.shape), 0])]
    # the target's first axis is the slice axis: bring the volume to (slices, rows, columns)
    transform = ornt_transform(current, axcodes2ornt(CANONICAL_AXCODES[plane]))
    return apply_orientation(volume, transform), _in_plane_geometry(plane, transform)


def _in_plane_geometry(plane: str, transform: np.ndarray) -> SliceGeometry:
    """The SliceGeometry of one slice under a nibabel orientation transform (per stored axis: the
    canonical axis it becomes, 0 slices, 1 rows, 2 columns, and -1 where it is reversed first)."""
    first, second = (int(axis) for axis in np.flatnonzero(transform[:, 0] != 0))  # the stored slice's axes
    transpose = int(transform[first, 0]) == 2  # the stored rows become canonical columns
    rows, columns = (second, first) if transpose else (first, second)
    return SliceGeometry(
        plane,
        transpose=transpose,
        flip_rows=bool(transform[rows, 1] < 0),
        flip_columns=bool(transform[columns, 1] < 0),
    )


def _slice_axis(rotation: np.ndarray, shape: tuple[int, ...]) -> int:
    """The voxel axis along which slices were taken: the only axis of length 1 (one slice, whatever
    its voxel sizes: a sagittal slice of 0.4 x 1.5 mm pixels was taken as coronal); else the one of
    the largest voxel size when it is clearly the largest (20%), else the last one (k)."""
    single = [axis for axis, length in enumerate(shape[:3]) if length == 1]
    if len(single) == 1:
        return single[0]
    sizes = np.linalg.norm(rotation, axis=0)  # mm per voxel along i, j, k
    thickest = int(np.argmax(sizes))
    return thickest if sizes[thickest] > 1.2 * np.median(sizes) else 2


def check_plane(found: str | None, expected: str | None, what: str) -> None:
    """An ImageReadError when a slice or volume of one plane is read for a model of another."""
    if found is not None and expected is not None and found != expected:
        raise ImageReadError(
            f"{what} is {'an' if found[0] in 'aeiou' else 'a'} {found} image (from its geometry); this model "
            f"reads {expected} images "
            f"(data.plane). Give it the {expected} series, or train a model on {found} images"
        )
