"""One canonical view (io/orientation.py): a slice or a volume stored the other way round, mirrored,
transposed or in another axis order, with geometry tags that say so, reads to the same pixels and
gets the same prediction; an image of another plane is refused with its plane named; a file
without geometry is read as stored and said to be."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from support import TINY, app, runner  # noqa: F401

from mtl_meniscus.errors import ImageReadError
from mtl_meniscus.io.exams import read_exam
from mtl_meniscus.io.imageio import read_image, read_volume
from mtl_meniscus.io.orientation import NOT_IN_FILE, dicom_geometry
from mtl_meniscus.phantom.exams import write_phantom_exams

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # right along a row: posterior; down a column: inferior
# A canonical slice stored four ways: (pixels as stored from canonical ones, ImageOrientationPatient)
DICOM_VARIANTS = {
    "standard": (lambda p: p, SAGITTAL),
    "rows reversed": (lambda p: p[::-1], (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)),
    "columns reversed": (lambda p: p[:, ::-1], (0.0, -1.0, 0.0, 0.0, 0.0, -1.0)),
    "transposed": (lambda p: p.T, (0.0, 0.0, -1.0, 0.0, 1.0, 0.0)),
}


def canonical_slice(size: int = 64) -> np.ndarray:
    """An asymmetric slice: every flip or transpose of it is another image."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 4000, (size, size)).astype(np.uint16)
    pixels[:10, :20] = 4095  # a bright block at the top left (anterior, superior)
    return pixels


def mr_dataset(sop_class: str = MRImageStorage, series: str = "1") -> Dataset:
    """An MR data set with its file meta header and identifiers, no image yet."""
    meta = FileMetaDataset()
    instance = generate_uid()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, instance
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", f"1.2.3.{series}", "MR"
    return ds


def write_dicom(
    path: Path, pixels: np.ndarray, orientation=None, position=(0.0, 0.0, 0.0), series="1"
) -> None:
    ds = mr_dataset(series=series)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = list(position)
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_a_dicom_slice_stored_four_ways_reads_to_the_same_pixels_and_prediction(run64, tmp_path):
    pixels = canonical_slice()
    for name, (stored, orientation) in DICOM_VARIANTS.items():
        write_dicom(tmp_path / "in" / f"{name.replace(' ', '_')}.dcm", stored(pixels), orientation)
        np.testing.assert_array_equal(read_image(tmp_path / "in" / f"{name.replace(' ', '_')}.dcm"), pixels)
    # without TTA: its random copies are drawn per input position, not per image
    args = ["predict", str(run64), str(tmp_path / "in"), "--tta", "0", "--out", str(tmp_path / "p.csv")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with (tmp_path / "p.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    for column in ("p_fissure", "p_horizontal", "p_anterior"):
        values = [float(row[column] or "nan") for row in rows]
        np.testing.assert_allclose(values, values[0], atol=1e-6, equal_nan=True)


# Canonical volume axes (slices, rows, columns) run to the patient's right, inferior and posterior:
# in RAS, +x, -z and -y, at 3, 0.5 and 0.5 mm per voxel.
CANONICAL_RAS = (np.array([3.0, 0, 0]), np.array([0, 0, -0.5]), np.array([0, -0.5, 0]))


def nifti_variant(volume: np.ndarray, order: tuple[int, int, int], flips: tuple[bool, bool, bool]):
    """`volume` (canonical) stored with its axes in `order` and the stored axes flipped where
    `flips` says, with the affine that says so: the voxel axes of a differently stored NIfTI."""
    columns = []
    for axis, flip in zip(order, flips):
        direction = CANONICAL_RAS[axis]
        columns.append(-direction if flip else direction)
    data = np.transpose(volume, order)
    for stored, flip in enumerate(flips):
        if flip:
            data = np.flip(data, stored)
    affine = np.eye(4)
    affine[:3, :3] = np.column_stack(columns)
    affine[:3, 3] = [5.0, -7.0, 11.0]
    return nibabel.Nifti1Image(np.ascontiguousarray(data), affine)


@pytest.mark.parametrize(
    ("order", "flips"),
    [
        ((1, 2, 0), (False, False, False)),  # as converters write it: (rows, columns, slices)
        ((0, 2, 1), (False, True, True)),  # RAS axis order: slices R, columns flipped to A, rows to S
        ((0, 2, 1), (True, False, True)),  # LPS-like: slices L, columns P, rows S
        ((2, 0, 1), (True, False, True)),  # permuted: columns first
    ],
)
def test_a_nifti_volume_in_any_axis_order_reads_to_the_same_canonical_volume(order, flips, tmp_path):
    volume = np.stack([canonical_slice() + k for k in range(5)]).astype(np.float32)  # (5, 64, 64)
    nibabel.save(nifti_variant(volume, order, flips), tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(read_volume(tmp_path / "v.nii.gz", plane="sagittal"), volume)


def _series(folder: Path, exam: Path, variant: str, orientation=None, drop_tags: bool = False) -> Path:
    """The phantom series `exam` rewritten: each slice's pixels and orientation as `variant`."""
    stored, variant_orientation = DICOM_VARIANTS[variant]
    folder.mkdir(parents=True)
    for file in sorted(exam.glob("*.dcm")):
        ds = pydicom.dcmread(file)
        pixels = stored(ds.pixel_array)
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.ImageOrientationPatient = list(orientation or variant_orientation)
        if orientation is not None:  # another plane: its slices are stacked along its own normal
            normal = np.cross(ds.ImageOrientationPatient[:3], ds.ImageOrientationPatient[3:])
            ds.ImagePositionPatient = list(3.0 * int(ds.InstanceNumber) * normal)
        if drop_tags:
            del ds.ImageOrientationPatient, ds.ImagePositionPatient
        ds.save_as(folder / file.name)
    return folder


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("series")
    write_phantom_exams(folder, n=20, n_slices=5, seed=3, size=64, fmt="dicom-series")
    return sorted(p for p in folder.iterdir() if p.is_dir())[0]


def test_a_series_stored_four_ways_is_the_same_exam(run64, phantom_series, tmp_path):
    expected = read_exam(phantom_series)
    folders = []
    for variant in DICOM_VARIANTS:
        folders.append(_series(tmp_path / variant.replace(" ", "_"), phantom_series, variant))
        np.testing.assert_array_equal(read_exam(folders[-1], plane="sagittal"), expected)
    args = [
        "predict",
        str(run64),
        *map(str, folders),
        "--exams",
        "--tta",
        "0",
        "--out",
        str(tmp_path / "p.csv"),
    ]
    assert runner.invoke(app, args).exit_code == 0
    with (tmp_path / "p.csv").open() as handle:
        values = [float(row["p_fissure"]) for row in csv.DictReader(handle)]
    np.testing.assert_allclose(values, values[0], atol=1e-6)


def test_another_plane_is_refused_naming_it_and_no_tags_are_said(run64, phantom_series, tmp_path):
    coronal = _series(tmp_path / "coronal", phantom_series, "standard", (1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    axial = _series(tmp_path / "axial", phantom_series, "standard", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    bare = _series(tmp_path / "bare", phantom_series, "standard", drop_tags=True)
    args = [
        "predict",
        str(run64),
        str(coronal),
        str(axial),
        str(bare),
        "--exams",
        "--out",
        str(tmp_path / "p.csv"),
    ]
    assert runner.invoke(app, args).exit_code == 1  # two exams refused, one predicted
    with (tmp_path / "p.csv").open() as handle:
        rows = {Path(row["exam"]).name: row for row in csv.DictReader(handle)}
    assert "is a coronal image" in rows["coronal"]["error"] and "reads sagittal" in rows["coronal"]["error"]
    assert "is an axial image" in rows["axial"]["error"]
    assert not rows["bare"]["error"] and "orientation not in the file" in rows["bare"]["note"]
    np.testing.assert_array_equal(read_exam(bare), read_exam(phantom_series))  # stored canonical: same


def test_contradictory_or_degenerate_geometry_is_refused(phantom_series, tmp_path):
    mixed = _series(tmp_path / "mixed", phantom_series, "standard")
    first = sorted(mixed.glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ds.ImageOrientationPatient = [0.0, 0.0, -1.0, 0.0, 1.0, 0.0]
    ds.save_as(first)
    with pytest.raises(ImageReadError, match="disagree on ImageOrientationPatient"):
        read_exam(mixed)
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0]  # malformed: named as such, by its file
    ds.save_as(first)
    with pytest.raises(
        ImageReadError, match=rf"^{first}: ImageOrientationPatient \[0.0, 1.0, 0.0, 0.0\] is not 6"
    ):
        read_exam(mixed)
    for bad in ((0, 0, 0, 0, 0, -1), (0, 1, 0, 0, 1, 0)):
        with pytest.raises(ImageReadError, match="degenerate ImageOrientationPatient"):
            dicom_geometry(bad)
    volume = np.zeros((4, 4, 3), np.float32)
    flat = nibabel.Nifti1Image(volume, None)
    flat.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=2)  # the slice axis has no extent
    nibabel.save(flat, tmp_path / "flat.nii.gz")
    with pytest.raises(ImageReadError, match="singular NIfTI affine"):
        read_volume(tmp_path / "flat.nii.gz")


def test_a_slice_without_orientation_in_a_series_with_one_is_refused(phantom_series, tmp_path):
    # a mirrored series: each slice stored upside down, which its orientation says; one file has
    # lost the tag, so read as stored it would lie upside down among the others
    mirrored = _series(tmp_path / "mirrored", phantom_series, "rows reversed")
    bare = sorted(mirrored.glob("*.dcm"))[2]
    ds = pydicom.dcmread(bare)
    del ds.ImageOrientationPatient
    ds.save_as(bare)
    with pytest.raises(ImageReadError) as err:
        read_exam(mirrored)
    assert str(err.value).startswith(
        f"{bare}: no ImageOrientationPatient, while the other 4 files of the series have one"
    )
    # with the tag back the series is the exam as written
    ds.ImageOrientationPatient = list(DICOM_VARIANTS["rows reversed"][1])
    ds.save_as(bare)
    np.testing.assert_array_equal(read_exam(mirrored), read_exam(phantom_series))


def test_a_file_without_geometry_is_read_as_stored_and_noted(tmp_path):
    pixels = canonical_slice()
    write_dicom(tmp_path / "bare.dcm", pixels[::-1])
    notes: list[str] = []
    np.testing.assert_array_equal(read_image(tmp_path / "bare.dcm", notes=notes), pixels[::-1])
    assert notes == [NOT_IN_FILE]


def test_a_bad_image_orientation_is_quoted_as_the_numbers_in_the_file():
    from mtl_meniscus.errors import ImageReadError
    from mtl_meniscus.io.orientation import dicom_geometry

    with pytest.raises(
        ImageReadError, match=r"^ImageOrientationPatient \[1\.0, 0\.0, 0\.0\] is not 6 finite"
    ):
        dicom_geometry([1, 0, 0])
    with pytest.raises(
        ImageReadError, match=r"^degenerate ImageOrientationPatient \[1\.0, 0\.0, 0\.0, 1\.0, 0\.0"
    ):
        dicom_geometry([1, 0, 0, 1, 0, 0])


def test_a_single_nifti_slice_is_its_own_plane_whatever_its_pixel_sizes(tmp_path):
    """One sagittal slice (64 x 48, 1 slice along R) of 0.4 x 1.5 mm pixels: its slice axis is the
    one of length 1. The thickest voxel axis (1.5 mm in-plane against the 1 mm default thickness)
    made it coronal, refused by a sagittal model."""
    import nibabel as nib

    pixels = canonical_slice(64)[:, :48].astype(np.float32)  # canonical sagittal (rows I, columns P)
    # voxel i down the rows (inferior, 0.4 mm), j along the columns (posterior, 1.5 mm), k right (1 mm)
    affine = np.array([[0, 0, 1.0, 0], [0, -1.5, 0, 0], [-0.4, 0, 0, 0], [0, 0, 0, 1]])
    for name, stored in (("2d", pixels), ("3d", pixels[..., None])):
        nib.save(nib.Nifti1Image(stored, affine), tmp_path / f"{name}.nii.gz")
        np.testing.assert_array_equal(read_image(tmp_path / f"{name}.nii.gz", plane="sagittal"), pixels)
