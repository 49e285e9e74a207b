"""A synthetic, procedurally generated stand-in for stain-free white-blood-cell images.

Used when `config.data.dir` is empty (offline quick start, tests). It is *synthetic*: three cell
types with distinguishable nuclei, drawn as low-contrast brightfield-like gray images:
- granulocyte: a mid-sized cell whose nucleus has 3-4 small lobes joined by thin strands, with a
  granular cytoplasm;
- monocyte: the largest cell, with a large kidney-shaped (indented) nucleus;
- lymphocyte: a small cell almost filled by a round nucleus.
Each image has a random position, size, elongation and orientation, a bright halo at the membrane,
faint nuclear texture, uneven illumination, a slight blur and sensor noise. Image i of class c is
generated from a generator seeded by (seed, c, i), so the set is deterministic for a seed.
`write_synthetic_folders` writes it as PNG folders, which then go through the same code path as real
data.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image
from scipy import ndimage

SYNTHETIC_CLASSES = ("granulocyte", "monocyte", "lymphocyte")


def _soft_mask(distance: np.ndarray, edge: float) -> np.ndarray:
    """Signed distance (negative inside, in pixels) -> a mask in [0, 1] with a smooth edge."""
    return 1.0 / (1.0 + np.exp(np.clip(distance / edge, -30, 30)))


def _ellipse_distance(x: np.ndarray, y: np.ndarray, center, radii, angle: float) -> np.ndarray:
    """Approximate signed distance (pixels) to an ellipse with the given center, radii and rotation."""
    cos, sin = np.cos(angle), np.sin(angle)
    u = (x - center[0]) * cos + (y - center[1]) * sin
    v = -(x - center[0]) * sin + (y - center[1]) * cos
    return (np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2) - 1.0) * min(radii)


def _nucleus_distance(kind: str, x, y, center, radius: float, angle: float, rng: np.random.Generator):
    """Signed distance field of the nucleus of a cell of `kind` with the given center and radius."""
    if kind == "lymphocyte":
        offset = rng.normal(0, 0.05 * radius, size=2)
        size = rng.uniform(0.78, 0.86) * radius
        return _ellipse_distance(x, y, center + offset, (size, size * rng.uniform(0.9, 1.0)), angle)
    if kind == "monocyte":
        radii = (rng.uniform(0.64, 0.72) * radius, rng.uniform(0.44, 0.5) * radius)
        body = _ellipse_distance(x, y, center, radii, angle)
        notch_center = center + 0.5 * radius * np.array([-np.sin(angle), np.cos(angle)])
        notch = _ellipse_distance(x, y, notch_center, (0.32 * radius, 0.24 * radius), angle)
        return np.maximum(body, -notch)  # the ellipse minus an indentation: a kidney shape
    lobes = rng.integers(3, 5)
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.cumsum(np.r_[0, rng.uniform(1.1, 1.5, size=lobes - 1)])
    centers = [center + 0.42 * radius * np.array([np.cos(a), np.sin(a)]) for a in angles]
    lobe_radii = (0.24 * radius, 0.2 * radius)
    distance = np.min([_ellipse_distance(x, y, c, lobe_radii, a) for c, a in zip(centers, angles)], axis=0)
    for first, second in zip(centers[:-1], centers[1:]):  # thin strands between consecutive lobes
        middle = (first + second) / 2
        direction = np.arctan2(*(second - first)[::-1])
        length = np.linalg.norm(second - first) / 2
        distance = np.minimum(distance, _ellipse_distance(x, y, middle, (length, 0.05 * radius), direction))
    return distance


def render_cell(kind: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic brightfield-like cell of `kind` -> uint8 (image_size, image_size, 3)."""
    scale = image_size / 2
    y, x = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    center = np.array([image_size / 2, image_size / 2]) + rng.normal(0, 0.06 * scale, size=2)
    relative_radius = {"granulocyte": (0.5, 0.6), "monocyte": (0.6, 0.72), "lymphocyte": (0.36, 0.46)}[kind]
    radius = rng.uniform(*relative_radius) * scale
    angle = rng.uniform(0, np.pi)
    edge = max(image_size / 200, 0.5)
    cell = _ellipse_distance(x, y, center, (radius, radius * rng.uniform(0.85, 1.0)), angle)
    cell_mask = _soft_mask(cell, edge)
    halo = np.exp(-((cell - 2 * edge) / (2.5 * edge)) ** 2)
    nucleus_mask = _soft_mask(_nucleus_distance(kind, x, y, center, radius, angle, rng), edge)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, size=x.shape), sigma=2 * edge)
    granules = (ndimage.gaussian_filter(rng.normal(0, 1, size=x.shape), sigma=0.7 * edge)
                if kind == "granulocyte" else 0)
    background = rng.uniform(0.62, 0.72)
    ramp_angle = rng.uniform(0, 2 * np.pi)
    ramp = ((x - scale) * np.cos(ramp_angle) + (y - scale) * np.sin(ramp_angle)) / scale
    illumination = 1 + rng.uniform(0.03, 0.08) * ramp
    image = (background
             + 0.05 * halo
             - cell_mask * (rng.uniform(0.03, 0.05) - 0.02 * granules)
             - nucleus_mask * (rng.uniform(0.06, 0.09) + 0.03 * texture))
    image = ndimage.gaussian_filter(image * illumination, sigma=0.8 * edge)
    image = image + rng.normal(0, 0.008, size=image.shape)
    tint = np.array([1.0, 0.99, 0.96])  # brightfield lamps are slightly warm
    return np.round(np.clip(image[..., None] * tint, 0, 1) * 255).astype(np.uint8)


def write_synthetic_folders(root: str | os.PathLike, per_class: int, image_size: int, seed: int) -> pathlib.Path:
    """Writes root/<class>/<class>_<i>.png for the three classes, `per_class` images each; returns root."""
    root = pathlib.Path(root)
    for class_index, kind in enumerate(SYNTHETIC_CLASSES):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = render_cell(kind, image_size, np.random.default_rng([seed, class_index, i]))
            Image.fromarray(image).save(folder / f"{kind}_{i:05d}.png")
    return root
