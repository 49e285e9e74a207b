"""A square crop centred on the white cell, at a fixed scale relative to the cell, found from the image itself.

Labs frame their cells differently (PBC: a cell in the middle of a 360 px field with red cells around
it; Tecom: the cell filling a 120 px field), so a model trained on one sees the other's cells at
another scale. `cell_crop` removes that difference: it finds the nucleus, centres a square on it whose
side is `scale` times the nucleus's size, and resizes that square to the output size.

The rule (`locate_cell`), in units of the image so that it does not depend on its resolution (it runs
on a copy whose shorter side is at most DETECTION_SIDE pixels, box-filtered, and maps the result back):
  1. Stain score per pixel: (B - G) / G_background, where G_background is the 95th percentile of the
     green channel (the bright background). Romanowsky-stained nuclei (May-Grünwald-Giemsa, Wright,
     rapid stains) are purple-blue, so B - G is high there and negative on the pinkish or yellowish
     background and on red cells; dividing by the background's green level makes it independent of
     exposure. The score is smoothed by a Gaussian of sigma = SMOOTHING_FRACTION x the shorter side.
  2. Foreground: score > the upper of the two three-class Otsu thresholds (skimage's
     threshold_multiotsu: background and red cells / cytoplasm / nucleus), holes filled. Two classes
     are not enough: where the cytoplasm is stained and the background yellowish (Tecom) a two-class
     Otsu threshold takes the whole cell. No cell is found when the score has no contrast
     (foreground mean - background mean < MIN_CONTRAST).
  3. The nucleus: of the connected foreground components at least CANDIDATE_AREA_FRACTION as large as
     the largest, the one whose centroid is nearest the frame's centre (a field with two cells is
     cropped on the middle one); then the lobes of a segmented nucleus are joined to it by a
     morphological closing with a disc of radius MERGE_FRACTION x that component's equivalent
     diameter (the component of the closed mask that contains it).
  4. Centre and size: the centroid and the equivalent diameter (the diameter of the disc of equal
     area) of the nucleus's convex hull, so a lobed or kidney-shaped nucleus counts at its extent.
     No cell is found when that hull covers less than MIN_AREA_FRACTION or more than
     MAX_AREA_FRACTION of the frame.
The crop's side is `scale` x the diameter (CROP_SCALE by default); where it reaches past the frame it is
filled with the frame's background colour (the per-channel median of its outermost pixel ring), so the
scale is kept. Fallback, when no cell is found: the largest centred square of the frame (a plain centre
crop), with `CellCrop.used_fallback` set.

The constants were set by looking at before/after panels of stained PBC images and of Tecom images
(never at Tecom labels). With CROP_SCALE = 2.5 a typical cell of either set fills about half to two
thirds of the crop's width with its cytoplasm inside; a large monocyte may lose the rim of its
cytoplasm. The rule finds a nucleus in all 300 Tecom images and in every PBC image looked at; it
measures the whole cell instead of the nucleus where the cytoplasm stains as strongly as the nucleus
(PBC eosinophils and basophils, densely stained Tecom cells), which then come out smaller in the crop.

Also `random_scale`, a seeded random zoom about the frame's centre (an augmentation for training).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_multiotsu
from skimage.morphology import convex_hull_image

from urnet_jax.errors import DataError

DETECTION_SIDE = 128  # the rule runs on a copy whose shorter side is at most this many pixels
CROP_SCALE = 2.5  # crop side / nucleus (convex hull) equivalent diameter
SMOOTHING_FRACTION = 0.01  # Gaussian sigma of the stain score, as a fraction of the shorter side
BACKGROUND_PERCENTILE = 95.0  # the percentile of the green channel taken as the background level
MIN_CONTRAST = 0.08  # least (foreground mean - background mean) stain score for a cell to be found
CANDIDATE_AREA_FRACTION = 0.5  # components this fraction of the largest's area compete on nearness to the centre
MERGE_FRACTION = 0.3  # closing radius joining nuclear lobes, as a fraction of the largest lobe's diameter
MIN_AREA_FRACTION = 0.002  # the nucleus hull covers at least this fraction of the frame ...
MAX_AREA_FRACTION = 0.9  # ... and at most this fraction


@dataclasses.dataclass(frozen=True)
class CellLocation:
    """Where the nucleus is, in pixels of the input image (row/column of the centre in continuous
    coordinates: the top-left pixel spans [0, 1) x [0, 1)) and its convex hull's equivalent diameter."""

    centre_row: float
    centre_col: float
    diameter: float


@dataclasses.dataclass(frozen=True)
class CellCrop:
    """A crop: `image` uint8 (output_size, output_size, 3); `location` None when nothing was found, in
    which case `used_fallback` is True and the image is a centre crop of the whole frame."""

    image: np.ndarray
    location: CellLocation | None

    @property
    def used_fallback(self) -> bool:
        return self.location is None


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")


def stain_score(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (H, W): (B - G) / background green level, smoothed (rule step 1)."""
    _check_rgb(image)
    pixels = image.astype(np.float32)
    green = pixels[..., 1]
    background = max(float(np.percentile(green, BACKGROUND_PERCENTILE)), 1.0)
    score = (pixels[..., 2] - green) / background
    return ndimage.gaussian_filter(score, SMOOTHING_FRACTION * min(image.shape[:2]))


def _central_component(mask: np.ndarray) -> np.ndarray:
    """The rule's step-3 seed: of the components of a non-empty mask at least CANDIDATE_AREA_FRACTION as
    large as the largest, the one whose centroid is nearest the frame's centre."""
    labels, count = ndimage.label(mask)
    indices = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(mask, labels, indices)
    centroids = np.asarray(ndimage.center_of_mass(mask, labels, indices)).reshape(count, 2)
    distances = np.hypot(*(centroids + 0.5 - np.asarray(mask.shape) / 2).T)
    distances[sizes < CANDIDATE_AREA_FRACTION * sizes.max()] = np.inf
    return labels == indices[int(np.argmin(distances))]


def _closing(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary closing with a disc of `radius` pixels (exact, via Euclidean distance transforms)."""
    pad = int(math.ceil(radius)) + 1  # room for the dilation, so the frame's edge does not erode it
    padded = np.pad(mask, pad)
    dilated = ndimage.distance_transform_edt(~padded) <= radius
    closed = ndimage.distance_transform_edt(dilated) > radius
    return closed[pad:-pad, pad:-pad]


def locate_cell(image: np.ndarray) -> CellLocation | None:
    """uint8 (H, W, 3) -> the nucleus's centre and size by the module's rule, or None if none is found."""
    _check_rgb(image)
    rows, cols = image.shape[:2]
    shrink = min(1.0, DETECTION_SIDE / min(rows, cols))
    small_shape = (max(1, round(rows * shrink)), max(1, round(cols * shrink)))
    if small_shape != (rows, cols):
        image = np.asarray(Image.fromarray(image).resize(small_shape[::-1], Image.Resampling.BOX))
    location = _locate_nucleus(image)
    if location is None:
        return None
    row_factor, col_factor = rows / small_shape[0], cols / small_shape[1]
    return CellLocation(location.centre_row * row_factor, location.centre_col * col_factor,
                        location.diameter * math.sqrt(row_factor * col_factor))


def _locate_nucleus(image: np.ndarray) -> CellLocation | None:
    """Rule steps 1-4 at the image's own resolution."""
    score = stain_score(image)
    if float(np.ptp(score)) <= 0:
        return None
    foreground = ndimage.binary_fill_holes(score > threshold_multiotsu(score, classes=3)[-1])
    if not foreground.any() or foreground.all():
        return None
    if float(score[foreground].mean() - score[~foreground].mean()) < MIN_CONTRAST:
        return None
    seed = _central_component(foreground)
    closed = _closing(foreground, MERGE_FRACTION * math.sqrt(4 * seed.sum() / math.pi))
    labels, _ = ndimage.label(closed)
    nucleus = labels == labels[seed].max()  # the closing only adds pixels, so the seed lies in one component
    hull = convex_hull_image(nucleus, offset_coordinates=False)
    area = int(hull.sum())
    if not MIN_AREA_FRACTION <= area / hull.size <= MAX_AREA_FRACTION:
        return None
    rows, cols = np.nonzero(hull)
    return CellLocation(float(rows.mean()) + 0.5, float(cols.mean()) + 0.5, math.sqrt(4 * area / math.pi))


def border_colour(image: np.ndarray) -> tuple[int, int, int]:
    """The per-channel median of the outermost pixel ring of a uint8 (H, W, 3) image (its background)."""
    ring = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return tuple(int(v) for v in np.median(ring, axis=0))


def resample_window(image: np.ndarray, centre_row: float, centre_col: float, height: float, width: float,
                    output_shape: tuple[int, int]) -> np.ndarray:
    """The window of `height` x `width` pixels centred at (centre_row, centre_col) (continuous
    coordinates), resized to `output_shape` (rows, cols) by antialiased bilinear resampling; parts
    outside the frame are filled with `border_colour(image)`. uint8 (H, W, 3) -> uint8 (*output_shape, 3).
    """
    top, left = centre_row - height / 2, centre_col - width / 2
    rows, cols = image.shape[:2]
    pad = max(0, math.ceil(max(-top, -left, top + height - rows, left + width - cols)))
    canvas = np.empty((rows + 2 * pad, cols + 2 * pad, 3), np.uint8)
    canvas[...] = border_colour(image)
    canvas[pad:pad + rows, pad:pad + cols] = image
    box = (left + pad, top + pad, left + pad + width, top + pad + height)
    resized = Image.fromarray(canvas).resize((output_shape[1], output_shape[0]), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized)


def cell_crop(image: np.ndarray, output_size: int, scale: float = CROP_SCALE) -> CellCrop:
    """uint8 (H, W, 3) -> a cell-centred uint8 (output_size, output_size, 3) crop whose side is `scale`
    times the nucleus's diameter, or the fallback centre crop when no cell is found (see module doc)."""
    location = locate_cell(image)
    if location is None:
        rows, cols = image.shape[:2]
        side = float(min(rows, cols))
        centre_row, centre_col = rows / 2, cols / 2
    else:
        side = scale * location.diameter
        centre_row, centre_col = location.centre_row, location.centre_col
    crop = resample_window(image, centre_row, centre_col, side, side, (output_size, output_size))
    return CellCrop(crop, location)


def random_scale(image: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """A random zoom about the frame's centre by a factor drawn uniformly from [low, high] (> 1 zooms
    in; < 1 zooms out, filling with the border colour); same shape and dtype as the uint8 (H, W, 3) input."""
    _check_rgb(image)
    if not 0 < low <= high:
        raise DataError(f"random scale needs 0 < low <= high, got [{low}, {high}]")
    zoom = float(rng.uniform(low, high))
    rows, cols = image.shape[:2]
    return resample_window(image, rows / 2, cols / 2, rows / zoom, cols / zoom, (rows, cols))
