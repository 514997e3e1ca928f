"""Synthetic sagittal knee MRI with meniscus tears: the package's embedded default data.

Image layout (256 x 256 by default): anterior is on the left (patella side), posterior on
the right, superior at the top. The femoral condyle sits above the tibial plateau; the two
menisci are dark wedges in the joint space, the posterior horn larger than the anterior.
A tear is a thin bright line inside a meniscus, horizontal (within 15 deg of the plateau)
or vertical (within 15 deg of its perpendicular). Every image is a pure function of
(seed, index): same seed, same bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from mtl_meniscus.config import MAX_IMAGE_SIZE, MAX_SEED
from mtl_meniscus.errors import ConfigError, MeniscusError
from mtl_meniscus.io.outputs import atomic_csv_file, check_empty_output_dir, check_output_dir
from mtl_meniscus.io.runlock import waiting_lock

PHANTOM_VERSION = 4  # bump when the generator changes: cached phantoms are keyed by it
SUPERSAMPLE = 2  # shapes are drawn at 2x and area-averaged down: partial-volume edges
MASK_MENISCUS = 1
MASK_TEAR = 2

# Relative signal of each tissue (PD-weighted look: fat and fluid bright, meniscus and cortex dark).
AIR, FAT, MUSCLE, MARROW, CORTEX = 0.0, 0.78, 0.36, 0.66, 0.10
CARTILAGE, JOINT, MENISCUS, FLUID, TENDON, VESSEL = 0.52, 0.44, 0.07, 0.92, 0.09, 0.05


@dataclass(frozen=True)
class PhantomCase:
    """Labels of one phantom image; `size` other than the default marks a wrong-size image."""

    index: int
    fissure: int
    orientation: str  # 'horizontal' | 'vertical' | '' (no tear)
    position: str  # 'anterior' | 'posterior' | 'both' | '' (no tear)
    size: tuple[int, int]  # (height, width)

    @property
    def name(self) -> str:
        return f"knee_{self.index:05d}"


# The largest value of each setting: the shares (of the images, of the fluid signal for the noise
# and the contrasts, of the way along the horn) at most 1, far above which the images saturate;
# lengths in pixels (at 256) at most the image, angles a turn, factors 4x. Far beyond these the
# drawing failed inside OpenCV (thickness 1e9) or asked for exabytes (a 1e9-pixel blur kernel).
SETTING_LIMITS = {
    **dict.fromkeys(
        (
            "noise_sigma",
            "tear_contrast",
            "degeneration_contrast",
            "horizontal_reach",
            "vertical_reach",
            "degeneration_fraction",
            "motion_fraction",
        ),
        1.0,
    ),
    **dict.fromkeys(("anatomy_shift_px", "blur_sigma", "tear_thickness_px", "motion_px"), 256.0),
    **dict.fromkeys(("anatomy_rotation_deg", "tear_angle_deg"), 360.0),
    **dict.fromkeys(("anatomy_scale", "meniscus_size", "tear_length"), 4.0),
}


@dataclass(frozen=True)
class PhantomSettings:
    """How the generator draws the anatomy, the tears and the MRI effects.

    Ranges are (low, high) of a uniform draw per image. The defaults are the `easy` level,
    the phantom the package has always made; the other levels add what makes real meniscus
    tears hard to read (see DIFFICULTY_LEVELS).
    """

    anatomy_scale: tuple[float, float] = (1.05, 1.25)  # zoom of the knee
    anatomy_shift_px: float = 10.0  # the knee's centre moves up to this far (pixels at 256) each way
    anatomy_rotation_deg: float = 8.0
    meniscus_size: tuple[float, float] = (1.0, 1.0)  # factor on each horn's width and height
    noise_sigma: tuple[float, float] = (0.02, 0.05)  # Rician noise, as a fraction of the fluid signal
    blur_sigma: tuple[float, float] = (0.4, 0.8)  # partial-volume blur, pixels
    tear_contrast: tuple[float, float] = (0.5, 1.0)  # tear signal: 0 = meniscus, 1 = fluid
    tear_length: tuple[float, float] = (1.0, 1.0)  # factor on the tear's length
    tear_thickness_px: tuple[float, float] = (1.5, 3.0)
    tear_angle_deg: float = 15.0  # spread around horizontal (or vertical); oblique tears at > 30
    # Where along the horn a tear's centre lies: 0 = its outer rim, 1 = its inner apex.
    horizontal_reach: tuple[float, float] = (0.25, 0.55)
    vertical_reach: tuple[float, float] = (0.12, 0.45)
    # Share of images with intrasubstance degeneration: bright and diffuse, not a tear.
    degeneration_fraction: float = 0.0
    degeneration_contrast: tuple[float, float] = (0.3, 0.6)
    motion_fraction: float = 0.0  # share of images with motion blur
    motion_px: tuple[float, float] = (2.0, 5.0)  # length of the motion-blur kernel

    def overridden(self, values: dict[str, object]) -> PhantomSettings:
        """A copy with some fields replaced (e.g. from `make-phantom --phantom-setting KEY=VALUE`),
        checked: finite numbers >= 0, low <= high, at most the setting's SETTING_LIMITS."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown phantom setting {key!r} (known: {', '.join(sorted(fields))})")
            pair = isinstance(getattr(self, key), tuple)
            if pair and not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise ConfigError(f"phantom setting {key!r}: expected two numbers low,high, got {value!r}")
            numbers = tuple(float(v) for v in value) if pair else (float(value),)
            top = SETTING_LIMITS[key]
            if not all(math.isfinite(v) and 0 <= v <= top for v in numbers) or numbers != tuple(
                sorted(numbers)
            ):
                expected = f"{'0 <= low <= high' if pair else 'a number >= 0'} <= {top:g}"
                raise ConfigError(f"phantom setting {key!r}: expected {expected}, got {value!r}")
            changes[key] = numbers if pair else numbers[0]
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def fingerprint(self) -> str:
        """Eight hex digits that change whenever a setting does (cache folder names)."""
        return hashlib.sha256(repr(sorted(self.describe().items())).encode()).hexdigest()[:8]


DIFFICULTY_LEVELS: dict[str, PhantomSettings] = {
    # Today's phantom: clear, mostly surface-near tears of fixed look; kept for tests and the quick demo.
    "easy": PhantomSettings(),
    # What makes real tears hard: faint, short and thin tears, oblique ones between horizontal and
    # vertical, tears far along the horn towards its apex; intrasubstance degeneration (bright but
    # diffuse signal that is not a tear, the classic false positive); lower SNR, more partial-volume
    # blur, motion blur; menisci of varying size and a knee that moves and turns more.
    # Calibrated (README, "Difficulty levels"): the reference cascade's test score lands near the
    # reference method's on real scans. Harder settings (35-degree spread, tear length down to 0.5,
    # 0.25-0.8 contrast, motion blur in 30%) left its orientation network at chance.
    "realistic": PhantomSettings(
        anatomy_scale=(0.95, 1.3),
        anatomy_shift_px=16.0,
        anatomy_rotation_deg=12.0,
        meniscus_size=(0.8, 1.15),
        noise_sigma=(0.04, 0.08),
        blur_sigma=(0.5, 1.1),
        tear_contrast=(0.3, 0.85),
        tear_length=(0.6, 1.0),
        tear_thickness_px=(1.2, 2.8),
        tear_angle_deg=30.0,
        horizontal_reach=(0.15, 0.75),
        vertical_reach=(0.08, 0.6),
        degeneration_fraction=0.25,
        degeneration_contrast=(0.25, 0.6),
        motion_fraction=0.2,
        motion_px=(2.0, 6.0),
    ),
}
DIFFICULTY_LEVELS["hard"] = dataclasses.replace(
    DIFFICULTY_LEVELS["realistic"],
    noise_sigma=(0.06, 0.11),
    tear_contrast=(0.15, 0.6),
    tear_length=(0.35, 0.9),
    tear_thickness_px=(1.0, 2.5),
    tear_angle_deg=42.0,
    degeneration_fraction=0.4,
    degeneration_contrast=(0.25, 0.7),
    motion_fraction=0.5,
)


def phantom_settings(difficulty: str = "easy", overrides: dict[str, object] | None = None) -> PhantomSettings:
    """The settings of a difficulty level, with optional overrides."""
    if difficulty not in DIFFICULTY_LEVELS:
        raise ConfigError(
            f"unknown phantom difficulty {difficulty!r} (allowed: {', '.join(DIFFICULTY_LEVELS)})"
        )
    settings = DIFFICULTY_LEVELS[difficulty]
    return settings.overridden(overrides) if overrides else settings


def parse_setting(text: str) -> tuple[str, object]:
    """'KEY=VALUE' or 'KEY=LOW,HIGH' -> (key, number or [low, high])."""
    key, sep, value = text.partition("=")
    try:
        numbers = [float(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    if not sep or not key.strip() or len(numbers) not in (1, 2):
        raise ConfigError(f"--phantom-setting {text!r}: expected KEY=VALUE or KEY=LOW,HIGH with numbers")
    return key.strip(), numbers[0] if len(numbers) == 1 else numbers


def plan_cases(
    n: int = 1128,
    seed: int = 0,
    size: int = 256,
    tear_fraction: float = 0.25,
    horizontal_fraction: float = 0.60,
    anterior_fraction: float = 0.09,
    n_wrong_size: int | None = None,
    n_double_tear: int | None = None,
) -> list[PhantomCase]:
    """Exact label mix of the reference data (rounded), plus a few wrong-size and double-tear images."""
    if n < 20:
        raise ConfigError(f"a phantom needs at least 20 images, got n={n}")
    n_wrong_size = max(1, round(n * 0.005)) if n_wrong_size is None else n_wrong_size
    n_double_tear = max(1, round(n * 0.005)) if n_double_tear is None else n_double_tear
    n_regular = n - n_wrong_size - n_double_tear
    n_tear = round(n_regular * tear_fraction)
    n_horizontal = round(n_tear * horizontal_fraction)
    n_anterior = max(1, round(n_tear * anterior_fraction))

    rng = np.random.default_rng([seed, 1])
    orientations = np.array(["horizontal"] * n_horizontal + ["vertical"] * (n_tear - n_horizontal))
    positions = np.array(["anterior"] * n_anterior + ["posterior"] * (n_tear - n_anterior))
    rng.shuffle(orientations)  # orientation and position are drawn independently
    labels = [(0, "", "", (size, size))] * (n_regular - n_tear)
    labels += [(1, str(o), str(p), (size, size)) for o, p in zip(orientations, positions)]
    for _ in range(n_double_tear):
        labels.append((1, str(rng.choice(["horizontal", "vertical"])), "both", (size, size)))
    other_sizes = [(320, 320), (224, 224), (256, 320), (512, 512)]
    for k in range(n_wrong_size):
        fissure = int(rng.random() < 0.5)
        tear = (str(rng.choice(["horizontal", "vertical"])), "posterior") if fissure else ("", "")
        labels.append((fissure, *tear, other_sizes[k % len(other_sizes)]))
    order = rng.permutation(len(labels))
    return [PhantomCase(i, *labels[j]) for i, j in enumerate(order)]


class _Canvas:
    """Float canvas at SUPERSAMPLE x resolution; shapes given in anatomy coordinates (pixels at 256)."""

    def __init__(self, size: int, center: tuple[float, float], scale: float, angle_deg: float):
        self.size = size
        self.pixels = size * SUPERSAMPLE
        self.image = np.zeros((self.pixels, self.pixels), np.float32)
        self.scale = scale * size / 256.0
        self.center = center
        self.cos, self.sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))

    def to_pixels(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) anatomy points -> (N, 2) canvas points (rotated, scaled, moved, supersampled)."""
        x, y = points[:, 0] * self.scale, points[:, 1] * self.scale
        xr = self.cos * x - self.sin * y + self.center[0]
        yr = self.sin * x + self.cos * y + self.center[1]
        return np.stack([xr, yr], axis=1) * SUPERSAMPLE

    def polygon(self, points, value: float, target: np.ndarray | None = None) -> None:
        shift = 4  # sub-pixel vertex precision: coordinates in 1/16 canvas pixels
        pts = np.round(self.to_pixels(np.asarray(points, float)) * (1 << shift)).astype(np.int32)
        cv2.fillPoly(self.image if target is None else target, [pts], float(value), cv2.LINE_8, shift)

    def ellipse(self, center, axes, angle_deg: float, value: float, target=None) -> None:
        self.polygon(_ellipse_points(center, axes, angle_deg), value, target)

    def line(self, start, end, thickness_px: float, value: float, target: np.ndarray) -> None:
        (x0, y0), (x1, y1) = self.to_pixels(np.asarray([start, end], float))
        shift = 4
        cv2.line(
            target,
            (int(round(x0 * 16)), int(round(y0 * 16))),
            (int(round(x1 * 16)), int(round(y1 * 16))),
            float(value),
            max(1, int(round(thickness_px * SUPERSAMPLE))),
            cv2.LINE_8,
            shift,
        )

    def downsample(self, image: np.ndarray) -> np.ndarray:
        return cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)


def _ellipse_points(center, axes, angle_deg: float, n: int = 72) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.stack([c * x - s * y + center[0], s * x + c * y + center[1]], axis=1)


def _wedge(rng: np.random.Generator, horn: str, size: float = 1.0) -> np.ndarray:
    """Triangle of a meniscal horn: outer base (2 points) and inner apex, in anatomy coordinates."""
    base_y = 3.0 + rng.uniform(-1, 1)  # lower edge rests on the tibial cartilage
    if horn == "anterior":
        outer, width, height, direction = (
            -47 + rng.uniform(-3, 3),
            rng.uniform(24, 30),
            rng.uniform(12, 15),
            1,
        )
    else:
        outer, width, height, direction = (
            50 + rng.uniform(-3, 3),
            rng.uniform(33, 41),
            rng.uniform(16, 20),
            -1,
        )
    width, height = width * size, height * size
    apex = (outer + direction * width, base_y - rng.uniform(0.5, 2.5))
    return np.array([(outer, base_y), (outer, base_y - height), apex])


def _tear_segment(
    rng: np.random.Generator, wedge: np.ndarray, orientation: str, settings: PhantomSettings
) -> tuple:
    """Centre-based segment inside the wedge: direction within tear_angle_deg of horizontal or vertical."""
    (outer_x, base_y), (_, top_y), (apex_x, apex_y) = wedge
    width = apex_x - outer_x  # signed: + for the anterior horn, - for the posterior
    spread = settings.tear_angle_deg
    if orientation == "horizontal":
        t = rng.uniform(*settings.horizontal_reach)  # fraction of the way from the outer base to the apex
        angle = rng.uniform(-spread, spread)
        length = abs(width) * rng.uniform(0.55, 0.9)
    else:
        t = rng.uniform(*settings.vertical_reach)
        angle = 90 + rng.uniform(-spread, spread)
        length = (base_y - top_y) * (1 - t) * rng.uniform(0.85, 1.1)
    if settings.tear_length != (1.0, 1.0):
        length *= rng.uniform(*settings.tear_length)
    x = outer_x + t * width
    # Middle of the wedge's height at x (the upper edge runs from the outer top to the apex).
    upper = top_y + t * (apex_y - top_y)
    y = (base_y + upper) / 2 + rng.uniform(-0.15, 0.15) * (base_y - upper)
    dx, dy = math.cos(math.radians(angle)) * length / 2, math.sin(math.radians(angle)) * length / 2
    return (x - dx, y - dy), (x + dx, y + dy)


def render_case(
    case: PhantomCase, seed: int, settings: PhantomSettings | None = None, slice_index: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image: uint16 (H, W) signal and uint8 mask (1 meniscus, 2 tear).

    Draws that only the harder levels use come after all the `easy` draws or only when their
    feature is on, so the `easy` level gives the same bytes as the phantom always did.
    `slice_index` (a slice of an exam): the noise field and a small intensity jitter (+-3%) are
    drawn for that slice alone, everything else is the case's.
    """
    settings = settings or PhantomSettings()
    rng = np.random.default_rng([seed, 2, case.index])
    size = 256 if case.size == (256, 256) else max(case.size)
    shift = settings.anatomy_shift_px
    canvas = _Canvas(
        size,
        center=(
            size / 2 + rng.uniform(-shift, shift) * size / 256,
            size / 2 + rng.uniform(-shift, shift) * size / 256,
        ),
        scale=rng.uniform(*settings.anatomy_scale),
        angle_deg=rng.uniform(-settings.anatomy_rotation_deg, settings.anatomy_rotation_deg),
    )
    draw = canvas.image
    # Soft tissue: subcutaneous fat around muscle; outside the leg is air.
    canvas.ellipse((0, 0), (104 + rng.uniform(-6, 6), 175), 0, FAT)
    canvas.ellipse((4, 0), (92 + rng.uniform(-6, 6), 170), 0, MUSCLE * rng.uniform(0.85, 1.15))
    canvas.polygon([(-60, -40), (-25, -12), (-25, 12), (-58, 30)], JOINT)  # joint capsule region
    canvas.ellipse((-52, -2), (16 + rng.uniform(-3, 3), 28), 8, FAT)  # Hoffa's fat pad
    canvas.ellipse((58, -8), (22, 14), -10, JOINT)  # posterior recess
    # Femur: cartilage rim, cortex, then marrow inside.
    condyle_axes = (50 + rng.uniform(-3, 3), 33 + rng.uniform(-2, 2))
    condyle_center = (5 + rng.uniform(-3, 3), -5 - condyle_axes[1])
    shaft = [(-24, -200), (22, -200), (26, -60), (-26, -60)]
    canvas.ellipse(condyle_center, (condyle_axes[0] + 3, condyle_axes[1] + 3), 0, CARTILAGE)
    canvas.polygon(shaft, CORTEX)
    canvas.ellipse(condyle_center, condyle_axes, 0, CORTEX)
    canvas.polygon([(-20, -200), (18, -200), (22, -60), (-22, -60)], MARROW)
    canvas.ellipse(condyle_center, (condyle_axes[0] - 3, condyle_axes[1] - 3), 0, MARROW)
    # Tibia: cartilage on the plateau, cortex, marrow.
    plateau = 5 + rng.uniform(-1, 1)
    tibia = [(-50, plateau), (52, plateau), (50, 40), (28, 70), (26, 200), (-24, 200), (-26, 70), (-46, 40)]
    canvas.polygon([(x, y - 3 if y == plateau else y) for x, y in tibia], CARTILAGE)
    canvas.polygon(tibia, CORTEX)
    canvas.polygon([(x * 0.9, y + 3 if y == plateau else y) for x, y in tibia], MARROW)
    # Patella and patellar tendon (anterior).
    patella_center = (-74 + rng.uniform(-4, 4), -62 + rng.uniform(-6, 6))
    canvas.ellipse(patella_center, (12, 26), 12, CORTEX)
    canvas.ellipse(patella_center, (9, 23), 12, MARROW)
    canvas.line((patella_center[0] + 4, patella_center[1] + 24), (-44, 62), 5, TENDON, draw)
    # Distractors: dark vessels in the posterior soft tissue, bright fluid spots (some near a horn).
    for _ in range(rng.integers(1, 4)):
        x0 = rng.uniform(62, 90)
        canvas.line((x0, -120), (x0 + rng.uniform(-12, 12), 120), rng.uniform(2, 5), VESSEL, draw)
    for _ in range(rng.integers(0, 4)):
        near_horn = rng.random() < 0.5
        center = (
            (rng.choice([-58.0, 64.0]) + rng.uniform(-6, 6), rng.uniform(-12, 10))
            if near_horn
            else (rng.uniform(-90, 90), rng.uniform(-110, 110))
        )
        canvas.ellipse(center, (rng.uniform(1.5, 4.5), rng.uniform(1.5, 4.0)), rng.uniform(0, 180), FLUID)

    # Menisci (drawn last so nothing covers them) and their mask at canvas resolution.
    meniscus_mask = np.zeros_like(draw)
    sizes = (
        {horn: rng.uniform(*settings.meniscus_size) for horn in ("anterior", "posterior")}
        if settings.meniscus_size != (1.0, 1.0)
        else {"anterior": 1.0, "posterior": 1.0}
    )
    wedges = {horn: _wedge(rng, horn, sizes[horn]) for horn in ("anterior", "posterior")}
    for wedge in wedges.values():
        canvas.polygon(wedge, 1.0, meniscus_mask)
    draw[meniscus_mask > 0] = MENISCUS * rng.uniform(0.7, 1.3)

    tear_mask = np.zeros_like(draw)
    if case.fissure:
        horns = ("anterior", "posterior") if case.position == "both" else (case.position,)
        contrast = rng.uniform(*settings.tear_contrast)  # from subtle to obvious
        for horn in horns:
            start, end = _tear_segment(rng, wedges[horn], case.orientation, settings)
            canvas.line(start, end, rng.uniform(*settings.tear_thickness_px), 1.0, tear_mask)
        tear_mask *= meniscus_mask  # a tear stays inside its meniscus
        draw += tear_mask * contrast * (FLUID - MENISCUS)

    signal = canvas.downsample(draw)
    signal = cv2.GaussianBlur(signal, (0, 0), sigmaX=rng.uniform(*settings.blur_sigma))  # partial-volume blur
    signal *= _bias_field(rng, size)
    scale = rng.uniform(800, 3000)  # per-image intensity scale of the 16-bit output
    sigma = rng.uniform(*settings.noise_sigma)
    signal = _harder_effects(rng, signal, canvas, wedges, settings)
    noise_rng = rng  # a single slice: the case's own generator, as always
    if slice_index is not None:  # a slice of an exam: its own noise and intensity jitter
        noise_rng = np.random.default_rng([seed, 3, case.index, slice_index])
        scale *= noise_rng.uniform(0.97, 1.03)
    real = signal + noise_rng.normal(0, sigma, signal.shape)
    imaginary = noise_rng.normal(0, sigma, signal.shape)
    magnitude = np.sqrt(real**2 + imaginary**2) * scale  # Rician noise of a magnitude image
    image = np.clip(np.round(magnitude), 0, 65535).astype(np.uint16)

    mask = np.zeros((size, size), np.uint8)
    mask[canvas.downsample(meniscus_mask) >= 0.5] = MASK_MENISCUS
    mask[canvas.downsample(tear_mask) >= 0.25] = MASK_TEAR
    if case.size != (size, size):
        height, width = case.size
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
    return image, mask


def _harder_effects(
    rng: np.random.Generator, signal: np.ndarray, canvas: _Canvas, wedges: dict, settings: PhantomSettings
) -> np.ndarray:
    """Intrasubstance degeneration and motion blur, for the levels that have them (none at `easy`).

    Degeneration is what a tear is not: a bright, diffuse, globular signal in the middle of a
    horn that does not reach its surface; on a real scan it is the classic false positive.
    """
    if settings.degeneration_fraction and rng.random() < settings.degeneration_fraction:
        (outer_x, base_y), (_, top_y), (apex_x, apex_y) = wedges[rng.choice(["anterior", "posterior"])]
        t = rng.uniform(0.2, 0.5)
        x = outer_x + t * (apex_x - outer_x)
        y = (base_y + top_y + t * (apex_y - top_y)) / 2
        height = base_y - (top_y + t * (apex_y - top_y))
        blob = np.zeros_like(canvas.image)
        axes = (abs(apex_x - outer_x) * rng.uniform(0.12, 0.25), height * rng.uniform(0.15, 0.3))
        canvas.ellipse((x, y), axes, rng.uniform(-30, 30), 1.0, blob)
        blob = cv2.GaussianBlur(canvas.downsample(blob), (0, 0), sigmaX=rng.uniform(1.0, 2.0))
        blob /= max(float(blob.max()), 1e-6)  # diffuse edges, but a peak as bright as the contrast says
        signal = signal + blob * rng.uniform(*settings.degeneration_contrast) * (FLUID - MENISCUS)
    if settings.motion_fraction and rng.random() < settings.motion_fraction:
        length = max(2, int(round(rng.uniform(*settings.motion_px))))
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2, :] = 1.0 / length
        rotation = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), rng.uniform(0, 180), 1.0)
        kernel = cv2.warpAffine(kernel, rotation, (length, length))
        signal = cv2.filter2D(signal, -1, kernel / max(kernel.sum(), 1e-6))
    return signal


def _bias_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth multiplicative coil-sensitivity field, exp of a random quadratic, about +-25%."""
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    coef = rng.uniform(-0.12, 0.12, 5)
    return np.exp(coef[0] * x + coef[1] * y + coef[2] * x * y + coef[3] * x**2 + coef[4] * y**2).astype(
        np.float32
    )


# Images or exams one make-phantom writes: its case table is held in memory (10 billion were an
# out-of-memory kill after 23 GB), and a million 256-pixel images are already about 100 GB on disk.
MAX_PHANTOM_COUNT = 1_000_000


def check_phantom_options(n: int, seed: int, size: int, what: str = "images", n_option: str = "--n") -> None:
    """make-phantom's size, seed and count, named by option when out of range."""
    if not 32 <= size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"--size: bad value {size} (allowed: 32..{MAX_IMAGE_SIZE} pixels)")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed: bad value {seed} (allowed: 0..{MAX_SEED})")
    if not 20 <= n <= MAX_PHANTOM_COUNT:
        raise ConfigError(f"{n_option}: bad value {n} (allowed: 20..{MAX_PHANTOM_COUNT:,} {what})")


def write_phantom(
    out_dir: str | Path,
    n: int = 1128,
    seed: int = 0,
    size: int = 256,
    settings: PhantomSettings | None = None,
    overwrite: bool = False,
    on_image: Callable[[int, int], None] | None = None,
) -> list[PhantomCase]:
    """Write images/*.png (16-bit), masks/*.png and labels.csv in the package's folder format.

    A folder that is not empty is refused unless `overwrite` (then files of the same names are
    replaced). `on_image(done, total)` is called after each image is written (a progress display).
    """
    out_dir = Path(out_dir)
    check_phantom_options(n, seed, size)
    if overwrite:
        check_output_dir(out_dir, "make-phantom OUT")
    else:
        check_empty_output_dir(
            out_dir,
            "make-phantom OUT",
            instead="pass --overwrite to write the phantom into it anyway (labels.csv and same-named "
            "images are replaced), or choose an empty folder",
        )
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    cases = plan_cases(n=n, seed=seed, size=size)
    rows = []
    for done, case in enumerate(cases, 1):
        image, mask = render_case(case, seed, settings)
        image_path = f"images/{case.name}.png"
        mask_path = f"masks/{case.name}.png"
        for path, pixels in ((image_path, image), (mask_path, mask)):
            if not cv2.imwrite(str(out_dir / path), pixels):  # OpenCV says False, it does not raise
                raise MeniscusError(
                    f"{out_dir / path}: could not be written (a full disk or a file-size limit?)"
                )
        rows.append([image_path, case.fissure, case.orientation, case.position, mask_path])
        if on_image is not None:
            on_image(done, len(cases))
    # labels.csv is written last and atomically: its presence marks a complete phantom.
    with atomic_csv_file(out_dir / "labels.csv") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "fissure", "orientation", "position", "mask"])
        writer.writerows(rows)
    return cases


def summarize_cases(cases: list[PhantomCase], size: int = 256) -> dict[str, int]:
    """Counts of each label and of the images the default exclusions will set aside."""
    keys = (
        "images",
        "usable",
        "wrong_size",
        "double_tear",
        "tear",
        "no_tear",
        "horizontal",
        "vertical",
        "anterior",
        "posterior",
    )
    counts = Counter({key: 0 for key in keys})
    for case in cases:
        counts["images"] += 1
        if case.size != (size, size):
            counts["wrong_size"] += 1
            continue
        if case.position == "both":
            counts["double_tear"] += 1
            continue
        counts["usable"] += 1
        counts["tear"] += case.fissure
        counts[case.orientation or "no_tear"] += 1
        if case.position:
            counts[case.position] += 1
    return {key: counts[key] for key in keys}


def default_cache_dir() -> Path:
    """Where generated phantoms live: $MTL_MENISCUS_CACHE, else ~/.cache/mtl_meniscus."""
    root = os.environ.get("MTL_MENISCUS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mtl_meniscus"


def ensure_phantom(
    n: int = 1128,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    difficulty: str = "easy",
    on_image: Callable[[int, int], None] | None = None,
    size: int = 256,
) -> Path:
    """Folder of the default phantom at `size` pixels (a config's data.image_size), generated on
    first use (labels.csv marks it complete); `on_image(done, total)` while it is generated (a
    progress display)."""
    settings = phantom_settings(difficulty)
    # easy keeps the cache name it always had; other levels are keyed by their settings too, and
    # other sizes than the reference's 256 by their size
    level = "" if difficulty == "easy" else f"-{difficulty}-{settings.fingerprint()}"
    pixels = "" if size == 256 else f"-{size}px"
    folder = (
        Path(cache_dir or default_cache_dir()) / f"phantom-v{PHANTOM_VERSION}{level}-n{n}-seed{seed}{pixels}"
    )
    if (folder / "labels.csv").is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # one process generates, the others wait for it (two writing the same files would mix them)
        with waiting_lock(folder.with_name(f"{folder.name}.lock")):
            if not (folder / "labels.csv").is_file():  # else generated while this process waited
                _generate_into_place(folder, n, seed, size, settings, on_image)
    except (MeniscusError, OSError) as err:  # a cache folder that is a file, read-only or full
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise MeniscusError(
            f"cannot generate the built-in phantom in the cache folder {folder.parent} ({reason}); "
            "point $MTL_MENISCUS_CACHE at a writable folder with ~300 MB free, or give --data DIR"
        ) from None
    return folder


def _generate_into_place(folder: Path, n: int, seed: int, size: int, settings, on_image) -> None:
    """Write the phantom into a side folder and rename it to `folder` once complete: a killed or
    failed generation never leaves a folder that looks complete (the next one starts over). The
    caller holds the entry's lock, so a side folder found here is a dead process's."""
    partial = folder.with_name(f"{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_phantom(partial, n=n, seed=seed, size=size, settings=settings, overwrite=True, on_image=on_image)
    if folder.exists():  # an interrupted generation of an earlier version, written in place
        shutil.rmtree(folder)
    os.rename(partial, folder)
