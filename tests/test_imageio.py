"""Image readers (io/imageio.py): formats and bit depths, DICOM rescale and inversion, named errors,
and the pixel limit, checked on the header before decoding."""

import shutil
import struct
import zlib
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
from support import _labels, _png

from mtl_meniscus.config import DataConfig
from mtl_meniscus.data.load import prepare_data
from mtl_meniscus.data.preprocess import edge_filter
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
    # a slice saved channels last is one image, not a volume of 1-pixel-wide stripes
    grey = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)
    np.save(tmp_path / "channel.npy", grey[..., None])
    np.testing.assert_array_equal(read_image(tmp_path / "channel.npy"), grey)
    np.save(tmp_path / "rgb.npy", np.stack([grey] * 3, axis=-1))
    with pytest.raises(ImageReadError, match=r"rgb.npy: shape \(64, 48, 3\) looks like one colour image"):
        read_image(tmp_path / "rgb.npy", slice_index=0)
    # a 4-D array is named by its shape before the pixel budget counts it (as 8*256 slices of 256x3
    # it was refused as too large, and raising the limit then led to the shape's refusal)
    np.save(tmp_path / "rgb4d.npy", np.zeros((8, 256, 256, 3), np.uint8))
    with pytest.raises(
        ImageReadError, match=r"expected a 2D slice \(H, W\) or a volume \(S, H, W\), got shape"
    ):
        read_image(tmp_path / "rgb4d.npy", slice_index=0, max_pixels=1_000_000)
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan], [0.0, 2.0]]))
    with pytest.raises(ImageReadError, match="nan.npy: contains NaN"):
        read_image(tmp_path / "nan.npy")
    # finite, but so large that the edge filter overflows float32: it was scored as a blank edge map
    huge = np.full((8, 8), 1e30, np.float32)
    huge[2:4, 2:4] = 0
    np.save(tmp_path / "huge.npy", huge)
    with pytest.raises(ImageReadError, match=r"huge.npy: pixel values up to 1e\+30, beyond"):
        read_image(tmp_path / "huge.npy")
    edges = edge_filter(np.full((8, 8), 1e15, np.float32) * (np.arange(8) % 2), "sobel")
    assert np.isfinite(edges).all()  # the limit leaves the edge map finite
    np.save(tmp_path / "text.npy", np.array([["a", "b"]]))
    with pytest.raises(ImageReadError, match="numeric"):
        read_image(tmp_path / "text.npy")
    # finite float64 beyond float32's range: too large, not "infinite" (the cast made it so)
    np.save(tmp_path / "wide.npy", np.full((4, 4), 1e40))
    with pytest.raises(ImageReadError, match=r"wide.npy: pixel values up to 1e\+40, beyond"):
        read_image(tmp_path / "wide.npy")


def test_nifti_of_complex_or_too_large_values_is_refused(tmp_path):
    """A complex NIfTI was read as its real part (numpy's ComplexWarning only), a float64 one of
    1e40 as infinite; a float64 one in range reads as float32."""
    values = np.random.default_rng(0).random((16, 16, 1)) * 1000
    nib.save(
        nib.Nifti1Image((values * np.exp(1j * values)).astype(np.complex64), np.eye(4)), tmp_path / "c.nii"
    )
    with pytest.raises(ImageReadError, match=r"c.nii: expected real numbers, got dtype complex64"):
        read_image(tmp_path / "c.nii")
    nib.save(nib.Nifti1Image(values * 1e40, np.eye(4)), tmp_path / "wide.nii")
    with pytest.raises(ImageReadError, match=r"wide.nii: pixel values up to .*e\+42, beyond"):
        read_image(tmp_path / "wide.nii")
    nib.save(nib.Nifti1Image(values, np.eye(4)), tmp_path / "fine.nii")
    assert read_image(tmp_path / "fine.nii").dtype == np.float32


def test_a_float64_tiff_is_not_called_corrupt(tmp_path):
    """OpenCV writes 64-bit float TIFFs that Pillow, which checks the header, cannot identify."""
    cv2.imwrite(str(tmp_path / "f.tif"), np.random.default_rng(0).random((8, 8)))
    with pytest.raises(ImageReadError, match=r"f.tif: a TIFF whose header cannot be read \(64-bit float"):
        read_image(tmp_path / "f.tif")


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


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares width x height (IHDR patched, CRC fixed)."""
    ok, encoded = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    data = bytearray(encoded.tobytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_declared_sizes_above_the_limit_are_refused_before_decoding(tmp_path):
    _png_declaring(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(
        ImageReadError, match="bomb.png: image of 400.0 megapixels is above the limit of 64.0 megapixels"
    ):
        read_image(tmp_path / "bomb.png")
    header = nib.Nifti1Header()
    header.set_data_shape((600, 600, 600))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    (tmp_path / "cube.nii").write_bytes(header.binaryblock + bytes(104))  # 840 KB would be the gz
    with pytest.raises(ImageReadError, match="cube.nii: NIfTI image of 600x600x600 = 216.0 megapixels"):
        read_image(tmp_path / "cube.nii", slice_index=0)
    with (tmp_path / "big.npy").open("wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (20000, 20000)}
        )
    with pytest.raises(ImageReadError, match="big.npy: array of 20000x20000 .* above the limit"):
        read_image(tmp_path / "big.npy")


def test_the_pixel_limit_is_configurable(tmp_path, pydicom_files, monkeypatch):
    _png(tmp_path / "a.png", size=(100, 100))
    with pytest.raises(ImageReadError, match="100x100 = 10,000 pixels is above the limit of 5,000 pixels"):
        read_image(tmp_path / "a.png", max_pixels=5000)
    assert read_image(tmp_path / "a.png", max_pixels=10000).shape == (100, 100)
    monkeypatch.setenv("MTL_MENISCUS_MAX_PIXELS", "1000")  # MR_small is 64x64
    with pytest.raises(
        ImageReadError, match="DICOM image of 64x64 = 4,096 pixels is above the limit of 1,000 pixels"
    ):
        read_image(pydicom_files / "MR_small.dcm")
    monkeypatch.delenv("MTL_MENISCUS_MAX_PIXELS")
    # data.max_pixels, the config key: an image above it is excluded with the reason
    _labels(tmp_path, [("a.png", "0", "", ""), ("b.png", "0", "", "")])
    _png(tmp_path / "b.png", size=(32, 32))
    data = prepare_data(tmp_path, DataConfig(image_size=32, max_pixels=2000, split_fractions=(1, 0, 0)))
    assert [image for image, *_ in data.exclusions] == ["a.png"]
    assert "above the limit" in data.exclusions[0][-1]


def test_a_missing_exam_is_not_found_whatever_its_name(tmp_path):
    """A mistyped exam folder (no suffix) was called 'not a volume', as if the file were of the
    wrong kind; a missing one is not found."""
    from mtl_meniscus.io.imageio import read_volume

    for name in ("exam_0007", "knee.npy", "slice.png"):
        with pytest.raises(ImageReadError, match=f"{name}: file not found"):
            read_volume(tmp_path / name)
    (tmp_path / "slice.png").write_bytes(b"x")
    with pytest.raises(ImageReadError, match="slice.png: not a volume"):
        read_volume(tmp_path / "slice.png")
