"""Read one 2D grey slice from PNG/TIFF/JPEG, DICOM, NIfTI or .npy as float32 (H, W)."""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mtl_meniscus.errors import ConfigError, ImageReadError, PixelLimitError, SliceIndexError
from mtl_meniscus.io.dicom import dicom_orientation, frame_count, frame_order, modality_values, read_dicom
from mtl_meniscus.io.orientation import (
    AS_STORED,
    NOT_IN_FILE,
    SliceGeometry,
    check_plane,
    dicom_geometry,
    nifti_canonical,
)
from mtl_meniscus.io.outputs import OutputError, atomic_write

RASTER_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NUMPY_SUFFIXES = (".npy",)
HDF5_SUFFIXES = (".h5",)  # fastMRI's files: a reconstructed volume per file
SUPPORTED_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES + NUMPY_SUFFIXES + HDF5_SUFFIXES
HDF5_DATASETS = ("reconstruction_rss", "reconstruction_esc")  # fastMRI knee: multi-coil, single-coil

# Decoded-size limit: every format's header is read first, and a file declaring more pixels (all
# slices of a volume counted) is refused before anything is decoded. data.max_pixels in the config
# sets it for train and evaluate; $MTL_MENISCUS_MAX_PIXELS for every command where that is unset.
DEFAULT_MAX_PIXELS = 64_000_000
MAX_PIXELS_ENV = "MTL_MENISCUS_MAX_PIXELS"
VOLUME_HINT = "give the slice to use in a 'slice' column of labels.csv"


def image_suffix(path: str | Path) -> str:
    """Lower-case suffix of an image path, treating `.nii.gz` as one suffix."""
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_supported_image(path: str | Path) -> bool:
    """True when the file is of a format this package reads: by its suffix, or a DICOM file of
    another name (reader_suffix); a file that cannot be opened too (its reader names the error)."""
    try:
        return reader_suffix(path) in SUPPORTED_SUFFIXES
    except ImageReadError:
        return True


DICOM_MAGIC_OFFSET, DICOM_MAGIC = 128, b"DICM"  # a DICOM Part 10 file: a 128-byte preamble, then DICM


def reader_suffix(path: str | Path) -> str:
    """The suffix that picks a file's reader: its own (image_suffix), or .dcm for a file without an
    image suffix that starts like a DICOM file: many exports name their files IM0001, by UID
    (1.2.840....) or .IMA, and leaving such a file out would lose a slice without a word."""
    suffix = image_suffix(path)
    if suffix in SUPPORTED_SUFFIXES or not Path(path).is_file():
        return suffix
    return DICOM_SUFFIXES[0] if starts_like_dicom(Path(path)) else suffix


def starts_like_dicom(path: Path) -> bool:
    """Whether the file starts like a DICOM Part 10 file ('DICM' after the 128-byte preamble); an
    ImageReadError when it cannot be read (it may be a slice: say so rather than leave it out)."""
    try:
        with path.open("rb") as handle:
            handle.seek(DICOM_MAGIC_OFFSET)
            return handle.read(len(DICOM_MAGIC)) == DICOM_MAGIC
    except OSError as err:
        raise ImageReadError(f"{path}: cannot read ({err.strerror or err})") from None


def max_pixels_limit(configured: int | None = None) -> int:
    """The decoded-size limit: `configured` (data.max_pixels), else $MTL_MENISCUS_MAX_PIXELS, else 64 MP."""
    if configured is not None:
        return configured
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = float(text)  # "64e6" works too
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise ConfigError(f"${MAX_PIXELS_ENV}: bad value {text!r} (allowed: a number of pixels >= 1)")
    return int(value)


def read_image(
    path: str | Path,
    slice_index: int | None = None,
    max_pixels: int | None = None,
    volume_hint: str = VOLUME_HINT,
    last_volume: dict[Path, tuple[np.ndarray, SliceGeometry]] | None = None,
    plane: str | None = None,
    notes: list[str] | None = None,
    geometry: list[SliceGeometry] | None = None,
) -> np.ndarray:
    """Read one grey slice as float32 (H, W); `slice_index` picks a slice of a 3D volume.

    Slices are taken along the last axis of a NIfTI volume (its k axis) and the first
    axis of a 3D .npy array or multi-frame DICOM. A file whose header declares more than
    `max_pixels` pixels (see max_pixels_limit) is refused before it is decoded; `volume_hint`
    ends the message for a 3D volume read without a slice. Raises ImageReadError naming the file.

    `last_volume` (an empty dict the caller keeps) holds the last file decoded for a slice and its
    geometry, so that rows naming slices of one volume one after another decode it once, not once
    per row.

    DICOM and NIfTI pixels are turned to the canonical view of their plane (io/orientation.py);
    with `plane` ('sagittal', ...) a file of another plane is refused; `notes` (a list the caller
    keeps) receives orientation.NOT_IN_FILE when a DICOM or NIfTI file has no geometry;
    `geometry` (a list the caller keeps) receives the SliceGeometry that turned the stored slice
    into the canonical one (AS_STORED for formats without geometry), to undo it (predict --masks)
    or to bring a mask drawn on the stored pixels to the same view (data/masks.py).
    """
    path = Path(path)
    _check_exists(path)
    suffix = reader_suffix(path)
    limit = max_pixels_limit(max_pixels)

    def decode() -> np.ndarray:
        if suffix in HDF5_SUFFIXES and slice_index is not None:  # that slice alone is read
            pixels = _oriented(path, _read_hdf5(path, limit, slice_index), plane, notes, geometry)
            return _select_slice(pixels, 0, suffix, volume_hint)
        reader = _reader(suffix)
        if reader is None:
            raise ImageReadError(
                f"unsupported format '{suffix}' (supported: {', '.join(SUPPORTED_SUFFIXES)})"
            )
        if last_volume is None or slice_index is None:
            return _select_slice(
                _oriented(path, reader(path, limit), plane, notes, geometry), slice_index, suffix, volume_hint
            )
        if path not in last_volume:
            last_volume.clear()  # one volume in memory at a time
            found: list[SliceGeometry] = []
            last_volume[path] = (_oriented(path, reader(path, limit), plane, notes, found), found[0])
        volume, volume_geometry = last_volume[path]
        if geometry is not None:
            geometry.append(volume_geometry)
        # a copy: the kept slice must not hold the whole volume in memory
        return _select_slice(volume, slice_index, suffix, volume_hint).copy()

    return _decoded(path, decode)


def read_volume(
    path: str | Path,
    max_pixels: int | None = None,
    size: int | None = None,
    plane: str | None = None,
    notes: list[str] | None = None,
    geometry: list[SliceGeometry] | None = None,
) -> np.ndarray:
    """Every slice of a 3D .npy (slices first), NIfTI (along its last axis) or multi-frame DICOM
    as float32 (S, H, W); a single 2D DICOM or NIfTI slice gives one slice (a 2D .npy is refused:
    MRNet's exams are 3D arrays, and a 2D one is a slice saved where its exam belongs). `size`:
    the slices will be resized to size x size, so the pixel budget counts them so (PixelBudget).
    `notes` and `geometry` as for read_image (one SliceGeometry, every slice's). Raises ImageReadError naming the file."""
    path = Path(path)
    _check_exists(path)  # first: a mistyped exam folder is not found, whatever its name looks like
    suffix = reader_suffix(path)
    if suffix in RASTER_SUFFIXES or _reader(suffix) is None:
        raise ImageReadError(f"{path}: not a volume (expected .npy, .nii, .nii.gz, .h5 or DICOM)")

    def decode() -> np.ndarray:
        read = _reader(suffix)(path, PixelBudget(max_pixels_limit(max_pixels), size))
        if suffix in NUMPY_SUFFIXES and read[0].ndim == 2:  # MRNet's exams: (slices, H, W)
            raise ImageReadError(
                f"a 2D array of shape {read[0].shape}, one slice: an exam's .npy holds its slices first "
                "(S, H, W)"
            )
        volume = _oriented(path, read, plane, notes, geometry)
        volume = volume[None] if volume.ndim == 2 else volume
        if volume.ndim != 3 or volume.size == 0:
            raise ImageReadError(f"expected a 3D volume (slices, height, width), got shape {volume.shape}")
        return volume

    return _decoded(path, decode)


def _reader(suffix: str):
    """The function that decodes files of this suffix, (path, pixel limit) -> array; None if none."""
    readers = {
        **dict.fromkeys(RASTER_SUFFIXES, _read_raster),
        **dict.fromkeys(DICOM_SUFFIXES, _read_dicom),
        **dict.fromkeys(NIFTI_SUFFIXES, _read_nifti),
        **dict.fromkeys(NUMPY_SUFFIXES, _read_npy),
        **dict.fromkeys(HDF5_SUFFIXES, _read_hdf5),
    }
    return readers.get(suffix)


def _oriented(
    path: Path,
    read: tuple[np.ndarray, SliceGeometry | None],
    plane: str | None,
    notes: list[str] | None,
    geometry: list[SliceGeometry] | None = None,
):
    """A reader's (pixels, geometry) -> the pixels, after the plane check and the note.

    The geometry is what the reader applied to a DICOM or NIfTI file (its plane None when the file
    has none: orientation.NOT_IN_FILE), or None for formats that have none (PNG, .npy, .h5: taken
    as stored, as documented)."""
    pixels, found = read
    if found is not None and found.plane is None:
        if notes is not None and NOT_IN_FILE not in notes:
            notes.append(NOT_IN_FILE)
    elif found is not None:
        check_plane(found.plane, plane, str(path))
    if geometry is not None:
        geometry.append(found or AS_STORED)
    return pixels


def _check_exists(path: Path) -> None:
    """An ImageReadError naming the file unless it is a readable file (broken links said as such)."""
    try:
        found = path.is_file()
    except OSError as err:  # e.g. a folder on the way that cannot be listed
        raise ImageReadError(f"{path}: cannot access ({err.strerror or err})") from None
    if not found:
        if path.is_symlink():
            raise ImageReadError(
                f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)"
            )
        raise ImageReadError(f"{path}: file not found")


# The largest pixel magnitude read: a Sobel gradient of such pixels (up to 8x them) squared stays
# far below float32's 3.4e38. Above about 2e18 the edge map overflows to infinity and became a
# blank channel, so the slice was scored as if it had no edges (export's graph calls it unreadable).
MAX_PIXEL_MAGNITUDE = 1e15


def _decoded(path: Path, decode) -> np.ndarray:
    """decode() as contiguous float32, every failure an ImageReadError naming `path`, and NaN or
    infinite pixels refused."""
    try:
        image = decode()
    except ImageReadError as err:  # its own class kept: a PixelLimitError stays one
        message = str(err)
        raise type(err)(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except Exception as err:  # decoder errors come in many types; name the file, keep the cause
        # on one line (pydicom lists the decoders a compressed syntax needs one per line): a row of
        # exclusions.csv or of predict's error table
        raise ImageReadError(
            f"{path}: cannot read ({type(err).__name__}: {' '.join(str(err).split())})"
        ) from err
    # both checks from the extremes: a NaN makes them NaN, an infinity infinite
    largest = max(float(image.max()), -float(image.min())) if image.size else 0.0
    if not math.isfinite(largest):
        raise ImageReadError(f"{path}: contains NaN or infinite pixel values")
    if largest > MAX_PIXEL_MAGNITUDE:
        raise ImageReadError(f"{path}: {_too_large(largest)}")
    return np.ascontiguousarray(image, dtype=np.float32)


def _too_large(largest: float) -> str:
    return (
        f"pixel values up to {largest:.3g}, beyond ±{MAX_PIXEL_MAGNITUDE:.0e}: the edge filter's "
        "squares would overflow float32 (rescale the image)"
    )


def _pixels(count: float) -> str:
    """'400.0 megapixels', or '10,000 pixels' below one megapixel."""
    return f"{count / 1e6:.1f} megapixels" if count >= 1e6 else f"{int(count):,} pixels"


@dataclass(frozen=True)
class PixelBudget:
    """How many pixels one input may hold in memory: `limit` pixels as decoded, and, when the
    slices are resized to the model's `size` x `size` afterwards, as resized (many tiny slices of a
    volume cost little on disk and size x size each once resized)."""

    limit: int
    size: int | None = None

    def cost(self, slices: int, height: int, width: int) -> int:
        """Pixels held for `slices` slices of height x width: decoded, or resized when larger."""
        resized = self.size * self.size if self.size else 0
        return slices * max(height * width, resized)


def _check_declared_size(
    shape: tuple[int, ...], budget: int | PixelBudget, what: str = "image", slices_last: bool = False
) -> None:
    """Refuse an empty image, or one whose header declares more pixels than the budget allows; the
    slices of a volume are its axes but the two in-plane ones (the first two with `slices_last`,
    as in NIfTI, else the last two)."""
    budget = budget if isinstance(budget, PixelBudget) else PixelBudget(budget)
    dims = tuple(int(d) for d in shape)
    described = "x".join(map(str, dims))
    if not dims or min(dims) <= 0:
        raise ImageReadError(f"empty {what}: it declares {described or 'no'} pixels (shape {dims})")
    plane = dims[:2] if slices_last else dims[-2:]
    height, width = plane if len(plane) == 2 else (1, plane[0])
    check_pixel_budget(
        budget.cost(math.prod(dims) // (height * width), height, width), budget, f"{what} of {described}"
    )


# How to read an input above the pixel limit, in every refusal (serve names its own option instead).
RAISE_THE_LIMIT = f"raise data.max_pixels in the config or ${MAX_PIXELS_ENV} to read it"


def check_pixel_budget(pixels: int, budget: PixelBudget, what: str) -> None:
    """A PixelLimitError when `pixels` (declared, before decoding) exceed the budget's limit."""
    if pixels > budget.limit:
        counted = (
            f" (each slice counted at its own size or at {budget.size}x{budget.size}, the size it is "
            "resized to, whichever is larger)"
            if budget.size
            else ""
        )
        raise PixelLimitError(
            f"{what} = {_pixels(pixels)}{counted} is above the limit of {_pixels(budget.limit)}, "
            f"refused before decoding ({RAISE_THE_LIMIT})"
        )


def _raster_header(path: Path, budget: int | PixelBudget) -> None:
    """PNG/TIFF/JPEG header only: one page, a size within the limit. Pillow reads the header
    lazily; OpenCV then decodes only what passed (and only these three formats)."""
    from PIL import Image, UnidentifiedImageError

    limit = budget.limit if isinstance(budget, PixelBudget) else budget
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=["PNG", "TIFF", "JPEG"]) as header:
                width, height = header.size
                frames = getattr(header, "n_frames", 1)
        except Image.DecompressionBombError as err:  # Pillow's own limit, above ours by default
            found = re.search(r"\((\d+) pixels\)", str(err))
            pixels = int(found.group(1)) if found else None
            if pixels is not None and pixels <= limit:
                raise PixelLimitError(
                    f"image of {_pixels(pixels)} is above Pillow's decompression-bomb limit "
                    "(PIL.Image.MAX_IMAGE_PIXELS), refused before decoding"
                ) from None
            declared = _pixels(pixels) if pixels else f"more than {_pixels(limit)}"
            raise PixelLimitError(
                f"image of {declared} is above the limit of {_pixels(limit)}, "
                f"refused before decoding ({RAISE_THE_LIMIT})"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
            if _starts_like_tiff(path):  # Pillow knows no 64-bit float samples, which OpenCV writes
                raise ImageReadError(
                    "a TIFF whose header cannot be read (64-bit float samples? corrupt?): save the "
                    "slice as 16-bit integers, 32-bit float or .npy"
                ) from None
            raise ImageReadError("cannot decode image (corrupt or truncated file?)") from None
    if frames > 1:
        raise ImageReadError(
            f"holds {frames} pages (multi-page TIFF or animated image); only the first would be "
            "read: save each slice as its own file"
        )
    _check_declared_size((height, width), limit)


def _starts_like_tiff(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) in (b"II*\x00", b"MM\x00*")
    except OSError:
        return False


def _as_float32(values: np.ndarray) -> np.ndarray:
    """float32 pixels. Values of a wider type beyond MAX_PIXEL_MAGNITUDE are refused before the
    cast, which would turn finite ones (1e40 in a float64 array) into infinities, refused as such."""
    if values.dtype.itemsize > 4 and values.size:
        largest = max(float(values.max()), -float(values.min()))
        if math.isfinite(largest) and largest > MAX_PIXEL_MAGNITUDE:
            raise ImageReadError(_too_large(largest))
    return values.astype(np.float32)


def write_png(path: Path, pixels: np.ndarray, what: str = "") -> None:
    """`pixels` as a PNG written atomically (a full disk leaves no cut-short file under its name);
    an OutputError naming the file (`what` it is, e.g. 'the overlay ') when it cannot be."""
    ok, encoded = cv2.imencode(".png", pixels)
    try:
        if not ok:
            raise OSError("PNG encoding failed")
        with atomic_write(path) as tmp:
            tmp.write_bytes(encoded.tobytes())
    except OSError as err:
        raise OutputError(f"cannot write {what}{path} ({getattr(err, 'strerror', None) or err})") from None


def _read_raster(path: Path, limit: int | PixelBudget) -> tuple[np.ndarray, None]:
    _raster_header(path, limit)
    # np.fromfile + imdecode also copes with non-ASCII paths, where cv2.imread fails quietly.
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageReadError("cannot decode image (corrupt or truncated file?)")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    return image.astype(np.float32), None


def _read_dicom(path: Path, limit: int | PixelBudget) -> tuple[np.ndarray, SliceGeometry]:
    dataset = read_dicom(path)
    if "PixelData" not in dataset:
        raise ImageReadError("DICOM file has no pixel data")
    frames = frame_count(dataset)
    samples = int(getattr(dataset, "SamplesPerPixel", 1) or 1)
    shape = (
        (frames, int(dataset.Rows), int(dataset.Columns)) if frames > 1 else (dataset.Rows, dataset.Columns)
    )
    _check_declared_size((*shape, samples) if samples > 1 else shape, limit, "DICOM image")
    pixels = dataset.pixel_array  # raises on truncated data or an undecodable transfer syntax
    if getattr(dataset, "SamplesPerPixel", 1) != 1:
        raise ImageReadError("colour DICOM images are not supported; expected a grey MR slice")
    image = _as_float32(modality_values(pixels, dataset))
    if getattr(dataset, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        # MONOCHROME1 shows low values as white: invert so that bright means high signal everywhere.
        image = image.max() + image.min() - image
    orientation = dicom_orientation(dataset)
    order = frame_order(dataset, orientation)
    if order is not None:  # an Enhanced file's frames, stored in any order: along the slice normal
        image = image[order]
    geometry = dicom_geometry(orientation)
    return geometry.apply(image), geometry


def _read_nifti(path: Path, limit: int | PixelBudget) -> tuple[np.ndarray, SliceGeometry]:
    import nibabel

    image = nibabel.load(str(path))  # reads the header only
    _check_declared_size(image.shape, limit, "NIfTI image", slices_last=True)
    stored = image.get_data_dtype()
    if not np.issubdtype(stored, np.number) or np.issubdtype(stored, np.complexfloating):
        raise ImageReadError(f"expected real numbers, got dtype {stored} (complex or RGB data?)")
    volume = _as_float32(np.asanyarray(image.dataobj))
    # Trailing singleton axes beyond the third, (x, y, z, 1), are a 3-D volume.
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim == 2:
        volume = volume[..., None]
    if volume.ndim != 3:
        return volume, AS_STORED  # refused by the caller as not a slice or a volume
    has_geometry = int(image.header.get("sform_code", 0)) > 0 or int(image.header.get("qform_code", 0)) > 0
    # (slices, rows, columns) in the canonical view of its plane; slices first like the other formats
    volume, geometry = nifti_canonical(volume, image.affine if has_geometry else None)
    return (volume[0] if len(volume) == 1 else volume), geometry


def _read_npy(path: Path, limit: int | PixelBudget) -> tuple[np.ndarray, None]:
    with path.open("rb") as handle:  # the header first: shape and dtype, nothing decoded
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ImageReadError(f"unsupported .npy format version {version[0]}.{version[1]}")
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise ImageReadError(f"expected a real numeric array, got dtype {dtype}")
    # the shape before the pixel budget: a (S, H, W, 3) array counted as S*H slices of W x 3 was
    # refused as too large, and the advice to raise the limit led to this refusal
    if len(shape) not in (2, 3):
        raise ImageReadError(f"expected a 2D slice (H, W) or a volume (S, H, W), got shape {shape}")
    # (H, W, 1) and (H, W, 3): one image with its channels last (as many libraries save a slice),
    # not a volume of H slices of W x 1 pixels, which a 'slice' column would have read as stripes
    one_channel_last = len(shape) == 3 and shape[2] in (1, 3, 4) and min(shape[:2]) > 4
    if one_channel_last and shape[2] > 1:
        raise ImageReadError(
            f"shape {shape} looks like one colour image (channels last), not a volume: save "
            "one grey channel (H, W), or a volume with its slices first (S, H, W)"
        )
    _check_declared_size(shape[:2] if one_channel_last else shape, limit, "array")
    array = np.load(str(path), allow_pickle=False)
    return _as_float32(array[..., 0] if one_channel_last else array), None


def hdf5_reconstruction(handle):
    """An open fastMRI file's reconstruction dataset (HDF5_DATASETS, in that order), None when it
    has none: a group of that name is not one."""
    import h5py

    found = (handle.get(name) for name in HDF5_DATASETS)
    return next((item for item in found if isinstance(item, h5py.Dataset)), None)


def _read_hdf5(
    path: Path, limit: int | PixelBudget, slice_index: int | None = None
) -> tuple[np.ndarray, None]:
    """A fastMRI file's reconstruction (slices, H, W): reconstruction_rss, else reconstruction_esc;
    with `slice_index`, that slice alone as (1, H, W), the rest of the file left unread.

    Each slice is flipped up/down: fastMRI+ drew its boxes on DICOM files made from these arrays
    flipped up/down ("closer to DICOM orientation", its README; its example notebook flips before
    drawing), so read as stored, every tear box (import-fastmri's masks) lay mirrored on its slice."""
    import h5py

    with h5py.File(path, "r") as handle:
        dataset = hdf5_reconstruction(handle)
        if dataset is None:
            raise ImageReadError(
                f"no {' or '.join(HDF5_DATASETS)} dataset (found: {', '.join(handle.keys()) or 'none'}); "
                "fastMRI's raw k-space files hold no image"
            )
        if not np.issubdtype(dataset.dtype, np.number) or np.issubdtype(dataset.dtype, np.complexfloating):
            raise ImageReadError(f"{dataset.name}: expected real numbers, got dtype {dataset.dtype}")
        if slice_index is None:
            _check_declared_size(dataset.shape, limit, "HDF5 volume")
            return np.asarray(dataset, dtype=np.float32)[..., ::-1, :], None
        if dataset.ndim != 3:
            raise ImageReadError(
                f"{dataset.name}: expected a volume (slices, H, W), got shape {dataset.shape}"
            )
        if not 0 <= slice_index < dataset.shape[0]:
            raise SliceIndexError(f"slice {slice_index} is out of range 0..{dataset.shape[0] - 1}")
        _check_declared_size(dataset.shape[1:], limit, "HDF5 slice")
        return np.asarray(dataset[slice_index], dtype=np.float32)[None, ::-1, :], None


def _select_slice(image: np.ndarray, slice_index: int | None, suffix: str, volume_hint: str) -> np.ndarray:
    if image.size == 0:
        raise ImageReadError(f"empty image (shape {image.shape})")
    if image.ndim == 3 and image.shape[0] == 1 and slice_index is None:
        image = image[0]
    if image.ndim == 2:
        if slice_index not in (None, 0):
            raise SliceIndexError(f"slice {slice_index} requested but the image is a single 2D slice")
        return image
    if image.ndim != 3:
        raise ImageReadError(f"expected a 2D slice or a 3D volume, got shape {image.shape}")
    if slice_index is None:
        raise SliceIndexError(
            f"is a 3D volume with {image.shape[0]} slices (shape {image.shape}); {volume_hint}"
        )
    if not 0 <= slice_index < image.shape[0]:
        raise SliceIndexError(f"slice {slice_index} is out of range 0..{image.shape[0] - 1}")
    return image[slice_index]
