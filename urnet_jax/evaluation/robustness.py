"""Accuracy under increasingly adverse imaging conditions (the paper's untested limitation).

Four perturbations of a [0, 1] image x (N, H, W, 3), each at six severities, the first being the clean
image:
  * brightness: darker illumination, x - s (clipped to [0, 1]); s in fractions of the full range;
  * contrast: contrast loss towards each image's mean grey level m, m + (1 - s)(x - m);
  * blur: Gaussian blur (truncated at 3 sigma, reflect padding) of standard deviation s pixels, at the model's
    input size;
  * noise: additive Gaussian noise of standard deviation s (clipped; seeded, so every model sees the
    same noisy images).
The perturbed images are rounded back to 8 bits, as a camera would deliver them.

"With enhancer" is the trained run as is. "Without enhancer" is the *same trained run* with `enhance()`
bypassed: its classifier receives the perturbed raw image, ImageNet-normalised exactly as the enhancer
output normally is. It is not a separately trained enhancer-free model (compare with a Net1 run for
that); it shows how much the enhancer, as trained, contributes under each condition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

SEVERITIES: dict[str, tuple[float, ...]] = {
    "brightness": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.0, 0.2, 0.4, 0.6, 0.75, 0.9),
    "blur": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0),
    "noise": (0.0, 0.02, 0.05, 0.08, 0.12, 0.16),
}
SEVERITY_UNITS = {
    "brightness": "intensity subtracted (fraction of full range)",
    "contrast": "fraction of contrast lost",
    "blur": "Gaussian blur sigma (pixels)",
    "noise": "Gaussian noise std (fraction of full range)",
}


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of (N, H, W, C) images over H and W (truncated at 3 sigma, reflect padding);
    sigma in pixels."""
    if sigma <= 0:
        return images
    return ndimage.gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode="reflect", truncate=3.0)


def perturb(images: np.ndarray, kind: str, severity: float, rng: np.random.Generator) -> np.ndarray:
    """`images` (N, H, W, 3) float in [0, 1] degraded by perturbation `kind` at `severity`; same shape."""
    images = np.asarray(images, dtype=np.float32)
    if kind == "brightness":
        out = images - severity
    elif kind == "contrast":
        mean = images.mean(axis=(1, 2, 3), keepdims=True)
        out = mean + (1.0 - severity) * (images - mean)
    elif kind == "blur":
        out = gaussian_blur(images, severity)
    elif kind == "noise":
        out = images + severity * rng.standard_normal(images.shape, dtype=np.float32)
    else:
        raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(SEVERITIES)}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def robustness_curves(predict: Mapping[str, Callable[[np.ndarray], np.ndarray]],
                      batches: Iterable[Mapping[str, np.ndarray]], num_batches: int | None = None,
                      seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Accuracy of each predictor under every perturbation and severity of `SEVERITIES`.

    Args:
      predict: mode name (e.g. 'with_enhancer') -> function from uint8 images (N, H, W, 3) to classes (N,).
        Perturbed images are re-quantised to 8 bits (rounded), as a camera would deliver them.
      batches: {'image': uint8 (B, H, W, 3), 'label': (B,), 'mask': bool (B,) optional} (`eval_batches`).
      num_batches: length of `batches`, for the progress bar.
      seed: seed of the noise.

    Returns:
      {'num_examples', 'modes', 'perturbations': {kind: {'severity', 'units', 'accuracy': {mode: [float]}}}}
      with accuracies as fractions, one per severity (the first severity is the clean image).
    """
    correct = {kind: {mode: np.zeros(len(levels), np.int64) for mode in predict}
               for kind, levels in SEVERITIES.items()}
    total = 0
    for batch_index, batch in enumerate(tqdm(batches, total=num_batches, desc="robustness",
                                             unit="batch", disable=not progress)):
        mask = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)), bool)
        labels = np.asarray(batch["label"])
        images = np.asarray(batch["image"], np.uint8)
        total += int(mask.sum())

        def hits(predict_fn: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray) -> int:
            return int(((np.asarray(predict_fn(inputs)) == labels) & mask).sum())

        clean_hits = {mode: hits(predict_fn, images) for mode, predict_fn in predict.items()}
        for kind_index, (kind, levels) in enumerate(SEVERITIES.items()):
            for level_index, severity in enumerate(levels):
                if severity == 0:
                    degraded = None
                else:
                    rng = np.random.default_rng([seed, batch_index, kind_index, level_index])
                    degraded = perturb(images.astype(np.float32) / 255.0, kind, severity, rng)
                    degraded = np.round(255.0 * degraded).astype(np.uint8)
                for mode, predict_fn in predict.items():
                    correct[kind][mode][level_index] += (
                        clean_hits[mode] if degraded is None else hits(predict_fn, degraded))
    return {
        "num_examples": total,
        "modes": list(predict),
        "perturbations": {
            kind: {"severity": list(levels), "units": SEVERITY_UNITS[kind],
                   "accuracy": {mode: (counts / max(total, 1)).tolist()
                                for mode, counts in correct[kind].items()}}
            for kind, levels in SEVERITIES.items()
        },
    }
