"""Random augmentation of a raw slice: pure functions of (image, config, numpy Generator)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mtl_meniscus.config import AugmentConfig


@dataclass(frozen=True)
class AffineParams:
    """One draw of the geometric transform: rotation about the centre, then translation."""

    angle_deg: float  # counter-clockwise on screen, as cv2.getRotationMatrix2D
    shift_x: float  # pixels, + moves content right
    shift_y: float  # pixels, + moves content down


def sample_affine(config: AugmentConfig, height: int, width: int, rng: np.random.Generator) -> AffineParams:
    """Draw rotation in [-r, r] deg and shifts in [-t, t] of width/height."""
    return AffineParams(
        angle_deg=float(rng.uniform(-config.rotation_deg, config.rotation_deg)),
        shift_x=float(rng.uniform(-config.translate_frac, config.translate_frac) * width),
        shift_y=float(rng.uniform(-config.translate_frac, config.translate_frac) * height),
    )


def affine_matrix(params: AffineParams, height: int, width: int) -> np.ndarray:
    """2x3 matrix mapping an input pixel (x, y, 1) to its output position."""
    center = ((width - 1) / 2.0, (height - 1) / 2.0)
    matrix = cv2.getRotationMatrix2D(center, params.angle_deg, 1.0)
    matrix[0, 2] += params.shift_x
    matrix[1, 2] += params.shift_y
    return matrix


def apply_affine(image: np.ndarray, params: AffineParams) -> np.ndarray:
    """Warp a float32 (H, W) image; uncovered corners take the image minimum (MRI background)."""
    height, width = image.shape
    return cv2.warpAffine(
        image,
        affine_matrix(params, height, width),
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=float(image.min()),
    )


def apply_affine_to_mask(mask: np.ndarray, params: AffineParams) -> np.ndarray:
    """Warp a label mask (H, W) as apply_affine warps its image: nearest neighbour, so labels stay
    labels; uncovered corners are background (0)."""
    height, width = mask.shape
    return cv2.warpAffine(
        mask,
        affine_matrix(params, height, width),
        (width, height),
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def augment_image(
    image: np.ndarray,
    config: AugmentConfig,
    rng: np.random.Generator,
    noise_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Geometric transform, then optional gamma, blur and noise; returns a new float32 (H, W) image.

    The edge filter is computed afterwards (see preprocess.make_input) so both channels match.
    `noise_rng` draws the noise field (default: `rng`): the slices of an exam share every draw of
    `rng` (one movement, one contrast) but get their own noise, as on a scanner.
    """
    image = np.asarray(image, dtype=np.float32)
    height, width = image.shape
    out = apply_affine(image, sample_affine(config, height, width, rng))
    return _intensity_changes(out, config, rng, noise_rng)


def move_points(points: np.ndarray, params: AffineParams, height: int, width: int) -> np.ndarray:
    """Points (K, 2) as (x, y) in pixel coordinates (pixel k covers k..k+1) where apply_affine
    moves the image content under them: (K, 2) float32."""
    matrix = affine_matrix(params, height, width)
    centres = np.asarray(points, np.float64) - 0.5  # OpenCV puts pixel k's centre at k
    return (centres @ matrix[:, :2].T + matrix[:, 2] + 0.5).astype(np.float32)


def augment_with_labels(
    image: np.ndarray,
    config: AugmentConfig,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
    points: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(augmented image, its mask moved alike or None, its points (K, 2) moved alike or None):
    augment_image's image from the same draws of `rng`, and the label mask (H, W) and the points
    (x, y) under the same geometric transform (apply_affine_to_mask, move_points)."""
    image = np.asarray(image, dtype=np.float32)
    height, width = image.shape
    params = sample_affine(config, height, width, rng)
    out = _intensity_changes(apply_affine(image, params), config, rng, None)
    moved_mask = apply_affine_to_mask(mask, params) if mask is not None else None
    moved_points = move_points(points, params, height, width) if points is not None else None
    return out, moved_mask, moved_points


def _intensity_changes(
    out: np.ndarray, config: AugmentConfig, rng: np.random.Generator, noise_rng: np.random.Generator | None
) -> np.ndarray:
    """Optional gamma, blur and noise of a float32 (H, W) image, in that order, drawn from `rng`
    (the noise field from `noise_rng` when given)."""
    if config.gamma_prob and rng.random() < config.gamma_prob:
        out = _gamma(out, float(rng.uniform(*config.gamma_range)))
    if config.blur_prob and rng.random() < config.blur_prob:
        sigma = float(rng.uniform(*config.blur_sigma))
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma)
    if config.noise_prob and rng.random() < config.noise_prob:
        scale = config.noise_std * float(out.std())
        out = out + (noise_rng or rng).normal(0.0, scale, size=out.shape).astype(np.float32)
    return out


def _gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """Contrast change: gamma on the [min, max]-normalised image, mapped back to the original range."""
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return image.copy()
    unit = (image - low) / (high - low)
    return (np.power(unit, gamma) * (high - low) + low).astype(np.float32)
