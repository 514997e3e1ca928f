import math

import numpy as np
import pytest

from mtl_meniscus.config import AugmentConfig
from mtl_meniscus.data.augment import AffineParams, affine_matrix, apply_affine, augment_image, sample_affine


def _bright_spot(height, width, x, y):
    image = np.zeros((height, width), np.float32)
    image[y, x] = 1000.0
    return image


def _landing(image):
    y, x = np.unravel_index(np.argmax(image), image.shape)
    return x, y


def test_translation_moves_a_point_by_the_shift():
    out = apply_affine(_bright_spot(64, 80, 20, 30), AffineParams(0.0, 7.0, -5.0))
    assert _landing(out) == (27, 25)


def test_rotation_by_90_degrees_by_hand():
    # Counter-clockwise on screen about the centre (c, c) of a 65x65 image, c = 32:
    # a point right of the centre (c + 10, c) goes to the top: (c, c - 10).
    out = apply_affine(_bright_spot(65, 65, 42, 32), AffineParams(90.0, 0.0, 0.0))
    assert _landing(out) == (32, 22)


@pytest.mark.parametrize("angle,sx,sy", [(30.0, 4.0, -9.0), (-45.0, -12.0, 3.0), (17.0, 0.0, 20.0)])
def test_known_point_lands_where_the_matrix_says(angle, sx, sy):
    height, width, x, y = 96, 128, 70, 40
    params = AffineParams(angle, sx, sy)
    out = apply_affine(_bright_spot(height, width, x, y), params)
    # hand-computed rotation about the centre, then the shift (y axis points down)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    theta = math.radians(angle)
    ex = math.cos(theta) * (x - cx) + math.sin(theta) * (y - cy) + cx + sx
    ey = -math.sin(theta) * (x - cx) + math.cos(theta) * (y - cy) + cy + sy
    np.testing.assert_allclose(affine_matrix(params, height, width) @ [x, y, 1], [ex, ey], atol=1e-9)
    lx, ly = _landing(out)
    assert abs(lx - ex) <= 1 and abs(ly - ey) <= 1
    # bilinear splat: the intensity-weighted centre is within a fraction of a pixel
    ys, xs = np.nonzero(out)
    weights = out[ys, xs]
    assert abs((xs * weights).sum() / weights.sum() - ex) < 0.5
    assert abs((ys * weights).sum() / weights.sum() - ey) < 0.5


def test_sampled_parameters_stay_within_the_configured_ranges():
    config = AugmentConfig(rotation_deg=45, translate_frac=0.2)
    rng = np.random.default_rng(0)
    draws = [sample_affine(config, 256, 200, rng) for _ in range(2000)]
    angles = np.array([d.angle_deg for d in draws])
    shifts_x = np.array([d.shift_x for d in draws])
    shifts_y = np.array([d.shift_y for d in draws])
    assert angles.min() >= -45 and angles.max() <= 45 and angles.min() < -40 and angles.max() > 40
    assert np.abs(shifts_x).max() <= 40 and np.abs(shifts_y).max() <= 51.2
    assert np.abs(shifts_y).max() > 45  # uses the height for vertical shifts


def test_augment_is_seeded_pure_and_does_not_mutate():
    image = np.random.default_rng(1).normal(500, 50, (64, 64)).astype(np.float32)
    original = image.copy()
    config = AugmentConfig(blur_prob=1.0, noise_prob=1.0, gamma_prob=1.0)
    a = augment_image(image, config, np.random.default_rng(42))
    b = augment_image(image, config, np.random.default_rng(42))
    c = augment_image(image, config, np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(image, original)
    assert a.dtype == np.float32 and a.shape == image.shape


def test_zero_amplitude_is_identity():
    image = np.random.default_rng(2).normal(size=(32, 32)).astype(np.float32)
    out = augment_image(image, AugmentConfig(rotation_deg=0, translate_frac=0), np.random.default_rng(0))
    np.testing.assert_allclose(out, image, atol=1e-5)


def test_gamma_keeps_the_intensity_range():
    image = np.linspace(100, 900, 64 * 64, dtype=np.float32).reshape(64, 64)
    config = AugmentConfig(rotation_deg=0, translate_frac=0, gamma_prob=1.0, gamma_range=(2.0, 2.0))
    out = augment_image(image, config, np.random.default_rng(0))
    assert out.min() == pytest.approx(100, abs=1e-2) and out.max() == pytest.approx(900, abs=1e-2)
    assert out[32, 0] < image[32, 0]  # gamma 2 darkens the mid-tones
