"""Read one 2D grey slice from PNG/TIFF/JPEG, DICOM, NIfTI or .npy as float32 (H, W)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import ImageReadError

RASTER_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NUMPY_SUFFIXES = (".npy",)
SUPPORTED_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES + NUMPY_SUFFIXES


def image_suffix(path: str | Path) -> str:
    """Lower-case suffix of an image path, treating `.nii.gz` as one suffix."""
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_supported_image(path: str | Path) -> bool:
    """True when the file's suffix is one of the formats this package reads."""
    return image_suffix(path) in SUPPORTED_SUFFIXES


def read_image(path: str | Path, slice_index: int | None = None) -> np.ndarray:
    """Read one grey slice as float32 (H, W); `slice_index` picks a slice of a 3D volume.

    Slices are taken along the last axis of a NIfTI volume (its k axis) and the first
    axis of a 3D .npy array or multi-frame DICOM. Raises ImageReadError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    suffix = image_suffix(path)
    try:
        if suffix in RASTER_SUFFIXES:
            image = _read_raster(path)
        elif suffix in DICOM_SUFFIXES:
            image = _read_dicom(path)
        elif suffix in NIFTI_SUFFIXES:
            image = _read_nifti(path)
        elif suffix in NUMPY_SUFFIXES:
            image = _read_npy(path)
        else:
            raise ImageReadError(
                f"unsupported format '{suffix}' (supported: {', '.join(SUPPORTED_SUFFIXES)})"
            )
        image = _select_slice(image, slice_index, suffix)
    except ImageReadError as err:
        message = str(err)
        raise ImageReadError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except Exception as err:  # decoder errors come in many types; name the file, keep the cause
        raise ImageReadError(f"{path}: cannot read ({type(err).__name__}: {err})") from err
    if not np.isfinite(image).all():
        raise ImageReadError(f"{path}: contains NaN or infinite pixel values")
    return np.ascontiguousarray(image, dtype=np.float32)


def _read_raster(path: Path) -> np.ndarray:
    # np.fromfile + imdecode also copes with non-ASCII paths, where cv2.imread fails quietly.
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageReadError("cannot decode image (corrupt or truncated file?)")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    return image.astype(np.float32)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    dataset = pydicom.dcmread(str(path))
    if "PixelData" not in dataset:
        raise ImageReadError("DICOM file has no pixel data")
    pixels = dataset.pixel_array  # raises on truncated data or an undecodable transfer syntax
    if getattr(dataset, "SamplesPerPixel", 1) != 1:
        raise ImageReadError("colour DICOM images are not supported; expected a grey MR slice")
    image = _apply_modality_lut(pixels, dataset).astype(np.float32)
    if getattr(dataset, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        # MONOCHROME1 shows low values as white: invert so that bright means high signal everywhere.
        image = image.max() + image.min() - image
    return image


def _apply_modality_lut(pixels: np.ndarray, dataset) -> np.ndarray:
    """Stored values to real values (RescaleSlope/RescaleIntercept or a modality LUT)."""
    try:
        from pydicom.pixels import apply_modality_lut  # pydicom >= 3
    except ImportError:  # pragma: no cover - pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    return apply_modality_lut(pixels, dataset)


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel

    volume = np.asanyarray(nibabel.load(str(path)).dataobj, dtype=np.float32)
    # Trailing singleton axes (x, y, 1) or (x, y, 1, 1) are a 2D slice.
    while volume.ndim > 2 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim == 3:
        volume = np.moveaxis(volume, -1, 0)  # (slices, X, Y): slices first like the other formats
    return volume


def _read_npy(path: Path) -> np.ndarray:
    array = np.load(str(path), allow_pickle=False)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ImageReadError(f"expected a real numeric array, got dtype {array.dtype}")
    return array.astype(np.float32)


def _select_slice(image: np.ndarray, slice_index: int | None, suffix: str) -> np.ndarray:
    if image.ndim == 3 and image.shape[0] == 1 and slice_index is None:
        image = image[0]
    if image.ndim == 2:
        if slice_index not in (None, 0):
            raise ImageReadError(f"slice {slice_index} requested but the image is a single 2D slice")
        return image
    if image.ndim != 3:
        raise ImageReadError(f"expected a 2D slice or a 3D volume, got shape {image.shape}")
    if slice_index is None:
        raise ImageReadError(
            f"is a 3D volume with {image.shape[0]} slices (shape {image.shape}); "
            "give the slice to use in a 'slice' column of labels.csv"
        )
    if not 0 <= slice_index < image.shape[0]:
        raise ImageReadError(f"slice {slice_index} is out of range 0..{image.shape[0] - 1}")
    return image[slice_index]
