"""The two meniscus horns of a sagittal slice as regions of interest: their boxes from a label mask
or, without one, from a classical pipeline (no learning); fixed-size crops around them; and the
check that a tear lies inside the crops (the ROI hit rate).

The JFR 2018 challenge entry proposed "segmenting the two meniscus zones (small triangles) where the
meniscal tear are to be found, and analysing the extracted zones", and named classical computer
vision (edge detection, dilation, erosion, thresholding) as a next step: find_horns_classical is that.

Boxes are (x0, y0, x1, y1) in pixels, x1 and y1 excluded: the box's pixels are image[y0:y1, x0:x1].
Which horn is anterior comes from the canonical sagittal view (io/orientation.py), not from a guess.
HornCentres gives a ROI model (model.roi classical or truth) each image's two horn centres.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import cv2
import numpy as np

from mtl_meniscus.data.masks import MASK_MENISCUS, MASK_TEAR
from mtl_meniscus.errors import MeniscusError
from mtl_meniscus.io.orientation import POSTERIOR_IS_RIGHT  # the canonical view's (io/orientation.py)


class Box(NamedTuple):
    """A box in pixels: columns x0..x1-1, rows y0..y1-1 (x1, y1 excluded, as in slicing)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return max(self.width, 0) * max(self.height, 0)

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) of the box's centre, in pixel coordinates (pixel k covers k..k+1)."""
        return ((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2)

    def contains(self, x: float, y: float) -> bool:
        return self.x0 <= x < self.x1 and self.y0 <= y < self.y1

    def iou(self, other: Box) -> float:
        """Intersection over union of the two boxes' areas (0 when they do not overlap)."""
        overlap = Box(
            max(self.x0, other.x0), max(self.y0, other.y0), min(self.x1, other.x1), min(self.y1, other.y1)
        )
        inter = overlap.area if overlap.width > 0 and overlap.height > 0 else 0
        union = self.area + other.area - inter
        return inter / union if union else 0.0


class HornBoxes(NamedTuple):
    """The boxes of a slice's two meniscus horns."""

    anterior: Box
    posterior: Box


def _ordered(first: Box, second: Box) -> HornBoxes:
    """The two horns as (anterior, posterior), by the canonical view's anterior-posterior direction."""
    left, right = sorted((first, second), key=lambda box: box.center[0])
    return HornBoxes(anterior=left, posterior=right) if POSTERIOR_IS_RIGHT else HornBoxes(right, left)


def horn_boxes_from_mask(mask: np.ndarray) -> HornBoxes | None:
    """The anterior and posterior horn boxes of a label mask (H, W): the two largest connected
    regions of meniscus and tear pixels (8-connected) that hold meniscus pixels.

    None when there are fewer than two: a mask without the meniscus class (fastMRI+'s masks hold
    only tear boxes) has no horns to give.
    """
    horn_pixels = np.isin(mask, (MASK_MENISCUS, MASK_TEAR)).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(horn_pixels, connectivity=8)
    meniscus_labels = set(np.unique(labels[mask == MASK_MENISCUS]).tolist()) - {0}
    regions = sorted(meniscus_labels, key=lambda k: stats[k, cv2.CC_STAT_AREA], reverse=True)[:2]
    if len(regions) < 2:
        return None
    boxes = [_stats_box(stats[k]) for k in regions]
    return _ordered(*boxes)


def _stats_box(row: np.ndarray) -> Box:
    """The box of one row of cv2.connectedComponentsWithStats' stats (left, top, width, height, area)."""
    x, y, width, height = (int(v) for v in row[:4])
    return Box(x, y, x + width, y + height)


@dataclass(frozen=True)
class HornSearchSettings:
    """The classical horn search's sizes, in pixels of a WORK_SIZE-pixel image (other sizes are
    resized to it first), and its thresholds.

    Sizes follow the anatomy's proportions at 256 px (a horn 20-40 px wide and 10-20 px high,
    cortex, vessels and tendon 2-6 px thick, the horns 65-90 px apart). The steps and a few values
    (local rather than global threshold; closing 2, opening 3) were chosen by comparing variants
    on the package's phantom, seeds 0-4 at the easy, realistic and hard levels, and checked on
    other seeds; nothing was fitted to one draw or to outside data.
    """

    smoothing_sigma: float = 1.0  # Gaussian against the noise before anything else
    # The "surround" (a grey closing) fills dark things narrower than twice this: a horn (half-height
    # 5-10 px) is then compared with the cartilage, marrow and fat around it, whatever the bias field.
    surround_radius: int = 16
    # Air: darker than this share of the 99th percentile, thick, touching the border. Next to the
    # skin the surround is bright fat, so air there would look like a dark structure.
    air_fraction: float = 0.25
    # The blob response averages the darkness over about a horn's half-thickness: a solid wedge keeps
    # a high mean, thin dark lines (cortex, vessels, the patellar tendon) are averaged down.
    blob_sigma: float = 4.0
    min_blob_response: float = 0.3  # a peak below this is no horn (the phantom's: 0.6-0.8)
    peak_spacing: int = 3  # a peak is the maximum within this radius
    max_peaks: int = 24  # the strongest peaks considered
    # The pair lies along the joint line: this far apart, as a share of the width ...
    horn_gap: tuple[float, float] = (0.2, 0.6)
    max_joint_tilt_deg: float = 15.0  # ... and the line through them this close to horizontal
    # The box: dark pixels (darkness above this), thin bright gaps closed (tears, 1-3 px), thin dark
    # lines opened away (cortex under the horn; a horn too small for the opening gets one a pixel
    # smaller); the region nearest the peak, grown back by `grow` (what the opening shaved off).
    box_darkness: float = 0.6
    close_radius: int = 2
    open_radius: int = 3
    max_peak_distance: int = 12
    grow: int = 2
    # A horn's box: at least this wide for its height, and this share of the (resized) image's area.
    min_width_to_height: float = 0.8
    horn_area: tuple[float, float] = (0.001, 0.04)


WORK_SIZE = 256  # the search runs on images resized so that their larger side has this many pixels
DEFAULT_SEARCH = HornSearchSettings()


def find_horns_classical(
    image: np.ndarray, settings: HornSearchSettings = DEFAULT_SEARCH
) -> HornBoxes | None:
    """The anterior and posterior horn boxes of a sagittal slice (H, W) in the canonical view, found
    without learning and without a mask, or None when no pair of horns is found.

    Menisci are dark wedges on the tibial plateau between the bright femur and tibia. The steps:
    smoothing; local darkness against a grey-closing surround; air removed; peaks of a Gaussian blob
    response; each peak's dark region after a closing (tears) and an opening (cortex), kept when it
    is shaped like a horn; the pair along the joint line with the largest summed response.
    """
    height, width = image.shape
    scale = WORK_SIZE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # (W, H) for cv2
    work = cv2.resize(
        image.astype(np.float32), size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    )
    darkness = _local_darkness(work, settings)
    candidates = _horn_candidates(darkness, settings)
    pair = _joint_line_pair(candidates, work.shape, settings)
    if pair is None:
        return None
    return _ordered(*(_rescaled(candidate.box, 1 / scale, (height, width)) for candidate in pair))


def _disc(radius: float) -> np.ndarray:
    radius = max(1, round(radius))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _local_darkness(image: np.ndarray, settings: HornSearchSettings) -> np.ndarray:
    """(H, W) float32 in 0..1: how much darker each pixel is than its bright surround; 0 in air.

    Darkness is a ratio to the signal, 0 meaning none (MR magnitude images, as stored in PNG, .npy,
    DICOM and fastMRI). An image with negative values (z-scored floats, a negative RescaleIntercept)
    has no such 0: it is first shifted so that its darkest smoothed pixel is 0, and then gives the
    same horns whatever its offset and scale. Taken from 0, such a copy of a phantom slice had no
    horns at all (19 of 19 slices), so a `model.roi: classical` run cropped it at the fallback
    windows. Non-negative images are read from 0 as before: shifting them too would make a flat
    noisy image (1000 +- 30) look like high-contrast structure with horns."""
    smooth = cv2.GaussianBlur(image, (0, 0), sigmaX=settings.smoothing_sigma)
    if smooth.min() < 0:
        smooth -= smooth.min()  # (H, W) 0 at the darkest pixel
    bright = float(np.percentile(smooth, 99))
    if bright <= 0:
        return np.zeros_like(smooth)
    surround = cv2.morphologyEx(smooth, cv2.MORPH_CLOSE, _disc(settings.surround_radius))
    darkness = np.clip(1 - smooth / np.maximum(surround, 1e-6 * bright), 0, 1)
    darkness[_air(smooth, bright, settings)] = 0
    return darkness


def _air(smooth: np.ndarray, bright: float, settings: HornSearchSettings) -> np.ndarray:
    """(H, W) bool: thick dark regions that reach the image border, and a 2-pixel rim around them."""
    low = (smooth < settings.air_fraction * bright).astype(np.uint8)
    # the opening cuts the thin dark lines (shaft cortex, vessels) that join the horns to the border
    low = cv2.morphologyEx(low, cv2.MORPH_OPEN, _disc(settings.open_radius))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(low, connectivity=8)
    height, width = smooth.shape
    touching = [k for k in range(1, count) if _touches_border(_stats_box(stats[k]), height, width)]
    air = np.isin(labels, touching).astype(np.uint8)
    return cv2.dilate(air, _disc(2)) > 0


def _touches_border(box: Box, height: int, width: int) -> bool:
    return box.x0 == 0 or box.y0 == 0 or box.x1 == width or box.y1 == height


class _Candidate(NamedTuple):
    """A peak of the blob response (its value and position) and the box of its dark region."""

    response: float
    x: int
    y: int
    box: Box


def _horn_candidates(darkness: np.ndarray, settings: HornSearchSettings) -> list[_Candidate]:
    """The strongest peaks of the blob response whose dark region is shaped like a horn."""
    response = cv2.GaussianBlur(darkness, (0, 0), sigmaX=settings.blob_sigma)
    is_peak = (response >= cv2.dilate(response, _disc(settings.peak_spacing))) & (
        response > settings.min_blob_response
    )
    ys, xs = np.nonzero(is_peak)
    peaks = sorted(zip(response[ys, xs].tolist(), xs.tolist(), ys.tolist()), reverse=True)
    # a small horn may not survive the full opening: the next smaller one is tried for its peak
    cores = [
        _dark_cores(darkness, radius, settings) for radius in (settings.open_radius, settings.open_radius - 1)
    ]
    candidates = []
    for value, x, y in peaks[: settings.max_peaks]:
        box = next((b for b in (_nearest_region_box(c, x, y, settings) for c in cores) if b), None)
        if box is not None and _horn_shaped(box, darkness.shape, settings):
            candidates.append(_Candidate(value, x, y, box))
    return candidates


def _dark_cores(darkness: np.ndarray, open_radius: int, settings: HornSearchSettings) -> np.ndarray:
    """(H, W) int32 labels of the dark regions: thin bright gaps closed (tears, 1-3 px), then dark
    lines thinner than 2 * open_radius opened away (cortex under a horn, vessels)."""
    dark = (darkness >= settings.box_darkness).astype(np.uint8)
    dark = cv2.morphologyEx(dark, cv2.MORPH_CLOSE, _disc(settings.close_radius))
    core = cv2.morphologyEx(dark, cv2.MORPH_OPEN, _disc(open_radius))
    return cv2.connectedComponents(core, connectivity=8)[1]


def _nearest_region_box(labels: np.ndarray, x: int, y: int, settings: HornSearchSettings) -> Box | None:
    """The box (grown by settings.grow) of the region with a pixel nearest (x, y), within
    max_peak_distance; None when there is none."""
    reach = settings.max_peak_distance
    y0, x0 = max(0, y - reach), max(0, x - reach)
    near = labels[y0 : y + reach + 1, x0 : x + reach + 1]
    ys, xs = np.nonzero(near)
    distances = (ys + y0 - y) ** 2 + (xs + x0 - x) ** 2
    if not len(ys) or distances.min() > reach**2:
        return None
    nearest = np.argmin(distances)
    region_ys, region_xs = np.nonzero(labels == near[ys[nearest], xs[nearest]])
    height, width = labels.shape
    grow = settings.grow
    return Box(
        max(0, int(region_xs.min()) - grow),
        max(0, int(region_ys.min()) - grow),
        min(width, int(region_xs.max()) + 1 + grow),
        min(height, int(region_ys.max()) + 1 + grow),
    )


def _horn_shaped(box: Box, shape: tuple[int, int], settings: HornSearchSettings) -> bool:
    """A horn lies along the tibial plateau: about as wide as tall or wider (the patellar tendon and
    vessels are tall), and of a horn's size."""
    share = box.area / (shape[0] * shape[1])
    low, high = settings.horn_area
    return box.width >= settings.min_width_to_height * box.height and low <= share <= high


def _joint_line_pair(
    candidates: list[_Candidate], shape: tuple[int, int], settings: HornSearchSettings
) -> tuple[_Candidate, _Candidate] | None:
    """The two candidates with the largest summed response that lie as horns do: side by side along
    the joint line (apart by horn_gap of the width, the line through them within max_joint_tilt_deg),
    in two regions that do not overlap (two peaks of one long region are not two horns)."""
    low, high = (share * shape[1] for share in settings.horn_gap)
    max_slope = math.tan(math.radians(settings.max_joint_tilt_deg))
    best, best_response = None, -math.inf
    for first, second in itertools.combinations(candidates, 2):
        gap_x, gap_y = abs(second.x - first.x), abs(second.y - first.y)
        if (
            low <= gap_x <= high
            and gap_y <= max_slope * gap_x
            and first.box.iou(second.box) == 0
            and first.response + second.response > best_response
        ):
            best, best_response = (first, second), first.response + second.response
    return best


def _rescaled(box: Box, factor: float, shape: tuple[int, int]) -> Box:
    """A box found on the resized image, in the original image's pixels (outward rounding)."""
    height, width = shape
    return Box(
        max(0, math.floor(box.x0 * factor)),
        max(0, math.floor(box.y0 * factor)),
        min(width, math.ceil(box.x1 * factor)),
        min(height, math.ceil(box.y1 * factor)),
    )


def window_around(box: Box, size: int | tuple[int, int]) -> Box:
    """The size (or (height, width)) window centred on the box (within half a pixel); it may reach
    past the image's edges (crop_around pads there)."""
    height, width = (size, size) if isinstance(size, int) else size
    x0 = (box.x0 + box.x1 - width) // 2
    y0 = (box.y0 + box.y1 - height) // 2
    return Box(x0, y0, x0 + width, y0 + height)


def crop_around(
    image: np.ndarray,
    box: Box,
    size: int | tuple[int, int],
    padding: Literal["edge", "zeros"] = "edge",
) -> tuple[np.ndarray, Box]:
    """A fixed-size crop (height, width) of the image (H, W) centred on the box, and its window
    in the image's pixels: crop[i, j] is image[window.y0 + i, window.x0 + j].

    Where the window reaches past the image, `padding` fills it: "edge" repeats the nearest border
    pixel (no artificial dark frame in an MR slice), "zeros" fills 0 (use it for label masks, where
    a repeated border would copy labels).
    """
    window = window_around(box, size)
    height, width = image.shape
    rows = np.arange(window.y0, window.y1)
    columns = np.arange(window.x0, window.x1)
    # indices clipped to the image: every pixel outside takes its nearest border pixel ("edge")
    crop = image[np.ix_(np.clip(rows, 0, height - 1), np.clip(columns, 0, width - 1))]
    if padding == "zeros":
        crop[(rows < 0) | (rows >= height), :] = 0
        crop[:, (columns < 0) | (columns >= width)] = 0
    return crop, window


def tear_coverage(mask: np.ndarray, windows: Sequence[Box]) -> float:
    """The share of the tear's pixels (mask == 2) that lie inside at least one window; NaN when the
    mask has no tear."""
    ys, xs = np.nonzero(mask == MASK_TEAR)
    if not len(ys):
        return float("nan")
    inside = np.zeros(len(ys), bool)
    for window in windows:
        inside |= (xs >= window.x0) & (xs < window.x1) & (ys >= window.y0) & (ys < window.y1)
    return float(inside.mean())


def tear_inside(mask: np.ndarray, windows: Sequence[Box]) -> bool | None:
    """True when the whole tear (every pixel of mask == 2) lies inside the windows (a ROI hit),
    False when some of it lies outside, None when the mask has no tear."""
    coverage = tear_coverage(mask, windows)
    return None if math.isnan(coverage) else coverage == 1.0


# --- the horns a ROI model crops around (model.roi: classical or truth) ----------------------------


def horn_centres(horns: HornBoxes | None) -> np.ndarray:
    """(2, 3) float32: (x, y, found) of the anterior and the posterior horn's box centre, in pixel
    coordinates (pixel k covers k..k+1, as Box.center), found 1; all zero when there are no horns
    (found 0: the model crops its fallback windows instead, and counts them)."""
    if horns is None:
        return np.zeros((2, 3), np.float32)
    return np.array([[*box.center, 1.0] for box in horns], np.float32)


class HornCentres:
    """Each image's horn centres (horn_centres), found when first asked for and then kept: from its
    label mask (source "truth"; a row without a mask has none) or by the classical pipeline on the
    image as given (source "classical"; a whole exam (S, H, W): each slice's, (S, 2, 3)).

    Found once per image, not per augmented copy: the classical search costs 7-12 ms an image (one core;
    measured on the phantom at 64 and 256 px), more than the time of the rest of an image's preparation, and a random affine moves the
    centres exactly as it moves the image (data/augment.py move_points). `subset` gives a view of
    some rows that shares what was found.
    """

    def __init__(
        self,
        source: Literal["classical", "truth"],
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray | None] | None = None,
    ):
        if source == "truth" and masks is None:
            raise MeniscusError("the true horns (model.roi truth) come from the masks, and none were read")
        self.source, self.images, self.masks = source, images, masks
        self._rows: list[int] | None = None  # the rows of `images` this view holds (None: all)
        self._found: dict[int, np.ndarray] = {}  # row of `images` -> its (2, 3) centres, an exam (S, 2, 3)

    @classmethod
    def found_by_network(cls, images: Sequence[np.ndarray], centres: np.ndarray) -> HornCentres:
        """Horns found for every image beforehand, centres (N, 2, 3) (source "predicted": a
        cascade's segmentation network's, engine/inference.py predicted_horn_centres)."""
        if len(centres) != len(images):
            raise ValueError(f"{len(centres)} horn centres for {len(images)} images")
        view = cls("classical", images)
        view.source = "predicted"
        view._found = {row: np.asarray(c, np.float32) for row, c in enumerate(centres)}
        return view

    def __len__(self) -> int:
        return len(self.images) if self._rows is None else len(self._rows)

    def _row(self, k: int) -> int:
        return int(k) if self._rows is None else self._rows[k]

    def __getitem__(self, k: int) -> np.ndarray:
        row = self._row(k)
        if row not in self._found:
            self._found[row] = self._find(row)
        return self._found[row]

    def _find(self, row: int) -> np.ndarray:
        """(2, 3) centres of an image, (S, 2, 3) of an exam's S slices (classical only: exams have
        no masks)."""
        if self.source == "truth":
            mask = self.masks[row]
            return horn_centres(None if mask is None else horn_boxes_from_mask(mask))
        image = np.asarray(self.images[row], np.float32)
        if image.ndim == 3:  # an exam: each slice's own horns
            return np.stack([horn_centres(find_horns_classical(s)) for s in image])
        return horn_centres(find_horns_classical(image))

    def subset(self, indices: Sequence[int]) -> HornCentres:
        """The rows `indices` of this view, sharing the centres found so far and from now on."""
        view = copy.copy(self)  # shallow: the same images, masks and found centres
        view._rows = [self._row(k) for k in indices]
        return view

    def not_found(self) -> int:
        """How many of this view's images lack a horn, either (each looked for now if not yet): the
        images a ROI model crops at a fallback window (an exam: any of its slices)."""
        return sum(not self[k][..., 2].all() for k in range(len(self)))


def horn_source(
    roi: str, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None
) -> HornCentres | None:
    """Where a ROI model (model.roi) gets its horns from outside the network: the masks (truth) or
    the classical pipeline (classical); None for a model that needs none (none; predicted, whose
    decoder finds them)."""
    return HornCentres(roi, images, masks) if roi in ("classical", "truth") else None
