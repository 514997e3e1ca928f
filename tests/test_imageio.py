import shutil

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest

from mtl_meniscus.errors import ImageReadError
from mtl_meniscus.io.imageio import is_supported_image, read_image


def test_png_8_and_16_bit(tmp_path):
    pixels16 = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 20
    pixels8 = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(64, 48)
    cv2.imwrite(str(tmp_path / "a.png"), pixels16)
    cv2.imwrite(str(tmp_path / "b.png"), pixels8)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), pixels16.astype(np.float32))
    np.testing.assert_array_equal(read_image(tmp_path / "b.png"), pixels8.astype(np.float32))


def test_tiff_16_bit_and_jpeg(tmp_path):
    pixels = (np.random.default_rng(0).integers(0, 60000, (32, 40))).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "a.tif"), pixels)
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), pixels)
    smooth = np.tile(np.linspace(0, 255, 40), (32, 1)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.jpg"), smooth, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert np.abs(read_image(tmp_path / "a.jpg") - smooth).max() <= 3  # lossy codec


def test_colour_png_becomes_grey(tmp_path):
    colour = np.random.default_rng(1).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), colour)
    expected = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY).astype(np.float32)
    np.testing.assert_array_equal(read_image(tmp_path / "c.png"), expected)


def test_dicom_applies_rescale(pydicom_files, tmp_path):
    dataset = pydicom.dcmread(pydicom_files / "MR_small.dcm")
    raw = dataset.pixel_array.astype(np.float32)
    np.testing.assert_array_equal(read_image(pydicom_files / "MR_small.dcm"), raw)  # slope 1, no intercept
    dataset.RescaleSlope = 2
    dataset.RescaleIntercept = -100
    dataset.save_as(tmp_path / "rescaled.dcm")
    np.testing.assert_array_equal(read_image(tmp_path / "rescaled.dcm"), raw * 2 - 100)


def test_dicom_monochrome1_is_inverted(pydicom_files, tmp_path):
    dataset = pydicom.dcmread(pydicom_files / "MR_small.dcm")
    raw = dataset.pixel_array.astype(np.float32)
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.save_as(tmp_path / "mono1.dcm")
    np.testing.assert_array_equal(read_image(tmp_path / "mono1.dcm"), raw.max() + raw.min() - raw)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_dicom_other_syntaxes_match_the_plain_file(pydicom_files, name):
    expected = read_image(pydicom_files / "MR_small.dcm")
    np.testing.assert_array_equal(read_image(pydicom_files / name), expected)


def test_truncated_dicom_is_a_clear_error(pydicom_files):
    with pytest.raises(ImageReadError, match="MR_truncated.dcm"):
        read_image(pydicom_files / "MR_truncated.dcm")


def test_nifti_2d_and_volume(tmp_path):
    slice2d = np.random.default_rng(2).normal(size=(20, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(slice2d, np.eye(4)), tmp_path / "s.nii")
    np.testing.assert_allclose(read_image(tmp_path / "s.nii"), slice2d)

    volume = np.random.default_rng(3).normal(size=(20, 24, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    np.testing.assert_allclose(read_image(tmp_path / "v.nii.gz", slice_index=3), volume[:, :, 3])
    with pytest.raises(ImageReadError, match="3D volume with 5 slices.*'slice' column"):
        read_image(tmp_path / "v.nii.gz")
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(tmp_path / "v.nii.gz", slice_index=5)


def test_npy(tmp_path):
    volume = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    np.save(tmp_path / "v.npy", volume)
    np.testing.assert_array_equal(read_image(tmp_path / "v.npy", slice_index=1), volume[1])
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan], [0.0, 2.0]]))
    with pytest.raises(ImageReadError, match="nan.npy: contains NaN"):
        read_image(tmp_path / "nan.npy")
    np.save(tmp_path / "text.npy", np.array([["a", "b"]]))
    with pytest.raises(ImageReadError, match="numeric"):
        read_image(tmp_path / "text.npy")


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageReadError, match="broken.png: cannot decode"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(ImageReadError, match="missing.png: file not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ImageReadError, match="unsupported format"):
        read_image(tmp_path / "notes.txt")
    shutil.copy(tmp_path / "broken.png", tmp_path / "broken.dcm")
    with pytest.raises(ImageReadError, match="broken.dcm"):
        read_image(tmp_path / "broken.dcm")


def test_supported_suffixes():
    assert is_supported_image("a/b.NII.GZ") and is_supported_image("x.dcm") and is_supported_image("y.tiff")
    assert not is_supported_image("labels.csv")
