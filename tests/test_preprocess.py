import cv2
import numpy as np
import pytest

from mtl_meniscus.data.preprocess import edge_filter, make_input, standardize
from mtl_meniscus.errors import ConfigError

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
SCHARR_X = np.array([[-3, 0, 3], [-10, 0, 10], [-3, 0, 3]], np.float32)
LAPLACE = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)


def _correlate(image, kernel):
    """Plain numpy 3x3 correlation with OpenCV's default border (reflect-101)."""
    padded = np.pad(image, 1, mode="reflect")
    out = np.zeros_like(image)
    for dy in range(3):
        for dx in range(3):
            out += kernel[dy, dx] * padded[dy : dy + image.shape[0], dx : dx + image.shape[1]]
    return out


@pytest.fixture
def image():
    return np.random.default_rng(0).normal(100, 20, (40, 36)).astype(np.float32)


@pytest.mark.parametrize("name,kernel", [("sobel", SOBEL_X), ("scharr", SCHARR_X)])
def test_gradient_magnitude_matches_hand_kernels(image, name, kernel):
    expected = np.hypot(_correlate(image, kernel), _correlate(image, kernel.T))
    np.testing.assert_allclose(edge_filter(image, name), expected, rtol=1e-4, atol=1e-3)


def test_gradient_magnitude_matches_opencv_filter2d(image):
    gx = cv2.filter2D(image, cv2.CV_32F, SOBEL_X)
    gy = cv2.filter2D(image, cv2.CV_32F, SOBEL_X.T)
    np.testing.assert_allclose(edge_filter(image, "sobel"), np.sqrt(gx**2 + gy**2), rtol=1e-5, atol=1e-3)


def test_laplace_is_absolute_laplacian(image):
    np.testing.assert_allclose(edge_filter(image, "laplace"), np.abs(_correlate(image, LAPLACE)), atol=1e-3)


def test_unknown_filter_is_refused(image):
    with pytest.raises(ConfigError, match="unknown edge filter 'canny'"):
        edge_filter(image, "canny")


def test_standardize_zero_mean_unit_variance(image):
    out = standardize(image)
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-4
    assert out.dtype == np.float32


@pytest.mark.parametrize("value", [0.0, 7.0, 65535.0, -3.0])
def test_standardize_constant_gives_zeros(value):
    out = standardize(np.full((8, 8), value, np.float32))
    assert np.all(out == 0) and np.isfinite(out).all()


def test_standardize_near_constant_large_offset_and_single_pixel():
    # float32 rounding noise on a large offset must not be blown up to unit variance
    assert np.all(standardize(np.full((4, 4), 1e6, np.float32) + np.float32(0.0)) == 0)
    assert np.all(standardize(np.array([[5.0]], np.float32)) == 0)
    two = standardize(np.array([[0.0, 2.0]], np.float32))
    np.testing.assert_allclose(two, [[-1.0, 1.0]])


def test_make_input_shapes_and_independence(image):
    x = make_input(image, "sobel")
    assert x.shape == (2, 40, 36) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], standardize(image), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x[1], standardize(edge_filter(image, "sobel")), rtol=1e-5, atol=1e-6)
    assert make_input(image, "none").shape == (1, 40, 36)
    assert np.all(make_input(np.zeros((8, 8), np.float32)) == 0)


@pytest.mark.parametrize("name", ["sobel", "scharr", "laplace"])
def test_network_input_does_not_depend_on_where_the_image_sits_in_memory(name):
    """OpenCV's SIMD filters round differently on differently aligned buffers; numpy's alignment
    changes between processes, so without aligned buffers the same seed trained different models."""
    image = (np.random.default_rng(0).random((96, 96)) * 1000).astype(np.float32)
    reference = make_input(image, name)
    buffer = np.empty(image.nbytes + 128, np.uint8)
    for offset in range(0, 64, 4):
        start = -buffer.ctypes.data % 64 + offset
        shifted = buffer[start : start + image.nbytes].view(np.float32).reshape(image.shape)
        shifted[...] = image
        assert np.array_equal(make_input(shifted, name), reference), offset
