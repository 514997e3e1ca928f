"""Network input from a raw slice: [image, edge filter] stacked and standardized per channel."""

from __future__ import annotations

import cv2
import numpy as np

from mtl_meniscus.errors import ConfigError

EDGE_FILTERS = ("sobel", "scharr", "laplace", "none")

# OpenCV's own thread pool is a loss here: on one 256x256 slice its start-up costs more than it
# saves, and between training steps its threads compete with PyTorch's for the same cores. Rotate +
# Sobel + standardize ran at 942 images/s with one OpenCV thread and 346 with two on a 2-core
# machine. DataLoader workers each get their own single-threaded copy.
cv2.setNumThreads(1)


ALIGNMENT = 64  # bytes


def aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 C-order array whose data starts on a 64-byte boundary.

    OpenCV's vectorised filters round differently depending on where their input and output
    start (Sobel: up to 2.4e-4 apart between a 0- and a 16-byte offset), and numpy arrays,
    OpenCV's Python outputs included, start on boundaries that change from one process to the
    next. With every buffer of the edge filter aligned, the edge map is the same every time, so
    two processes with the same seed train the same model.
    """
    nbytes = int(np.prod(shape)) * 4
    buffer = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % ALIGNMENT
    return buffer[start : start + nbytes].view(np.float32).reshape(shape)


def aligned_copy(image: np.ndarray) -> np.ndarray:
    """The image as float32 in C order on a 64-byte boundary (itself when it already is)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ctypes.data % ALIGNMENT == 0 and image.flags.c_contiguous:
        return image
    out = aligned_empty(image.shape)
    out[...] = image
    return out


def edge_filter(image: np.ndarray, name: str) -> np.ndarray | None:
    """Edge map of a float32 (H, W) image: gradient magnitude (Sobel, Scharr) or |Laplacian|."""
    image = aligned_copy(image)
    shape = image.shape
    if name == "sobel":
        gx = cv2.Sobel(image, cv2.CV_32F, 1, 0, dst=aligned_empty(shape), ksize=3)
        gy = cv2.Sobel(image, cv2.CV_32F, 0, 1, dst=aligned_empty(shape), ksize=3)
        return cv2.magnitude(gx, gy, magnitude=aligned_empty(shape))
    if name == "scharr":
        gx = cv2.Scharr(image, cv2.CV_32F, 1, 0, dst=aligned_empty(shape))
        gy = cv2.Scharr(image, cv2.CV_32F, 0, 1, dst=aligned_empty(shape))
        return cv2.magnitude(gx, gy, magnitude=aligned_empty(shape))
    if name == "laplace":
        return np.abs(cv2.Laplacian(image, cv2.CV_32F, dst=aligned_empty(shape), ksize=1))
    if name == "none":
        return None
    raise ConfigError(f"unknown edge filter {name!r} (allowed: {', '.join(EDGE_FILTERS)})")


def standardize(channel: np.ndarray, eps: float = 1e-6, out: np.ndarray | None = None) -> np.ndarray:
    """Zero mean, unit variance; a constant channel becomes zeros (never NaN).

    Writes into `out` (float32, same shape) when given: make_input fills its result in place.
    """
    channel = np.asarray(channel, dtype=np.float32)
    if out is None:
        out = np.empty_like(channel)
    mean, std = (float(v[0, 0]) for v in cv2.meanStdDev(channel))  # accumulates in float64
    if not np.isfinite(std) or std < eps * max(1.0, abs(mean)):
        out[...] = 0.0
        return out
    np.subtract(channel, np.float32(mean), out=out)
    out *= np.float32(1.0 / std)
    return out


def make_input(image: np.ndarray, edge_filter_name: str = "sobel") -> np.ndarray:
    """Raw (H, W) slice -> standardized float32 (C, H, W), C = 2 (image, edges) or 1 without a filter."""
    image = np.asarray(image, dtype=np.float32)
    edges = edge_filter(image, edge_filter_name)
    out = np.empty((1 if edges is None else 2, *image.shape), np.float32)
    standardize(image, out=out[0])
    if edges is not None:
        standardize(edges, out=out[1])
    return out
