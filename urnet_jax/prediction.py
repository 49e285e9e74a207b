"""Classify a folder of cell images and report the differential count (count and % per class, 95% CI).

The confidence interval of each class's share is the Wilson score interval (Wilson 1927) of a
binomial proportion: with n classified images, k of them in the class, p = k / n and z = 1.96,

    centre = (p + z^2 / (2n)) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))

It stays inside [0, 1] and is well behaved for rare classes and small counts (unlike the normal
approximation p +- z sqrt(p (1 - p) / n), which collapses to [0, 0] when k = 0). Each class's interval
is marginal (one class against the rest); it treats the predicted labels as the truth, i.e. it covers
the sampling uncertainty of the count, not the classifier's errors. Unreadable files are excluded from
n and listed separately.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import pathlib
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from urnet_jax.data import load_image
from urnet_jax.data.images import is_image_name
from urnet_jax.models.composite import imagenet_normalize
from urnet_jax.training import to_unit_range


def find_images(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """Every file under `folder` (recursively, sorted) with an image extension (case-insensitive;
    `urnet_jax.data.images.IMAGE_EXTENSIONS`). Hidden files and anything inside hidden folders (names
    starting with '.') are ignored."""
    folder = pathlib.Path(folder)
    return sorted(
        path for path in folder.rglob("*")
        if is_image_name(path) and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def wilson_interval(count: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (fractions in [0, 1]) for `count` successes out of `total` trials.

    total = 0 gives the uninformative (0, 1).
    """
    if not 0 <= count <= total:
        raise ValueError(f"need 0 <= count <= total, got count={count}, total={total}")
    if total == 0:
        return 0.0, 1.0
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = count / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclasses.dataclass(frozen=True)
class ClassCount:
    """One row of a differential count; percentages in % of the classified images."""

    name: str
    count: int
    percent: float
    ci_low: float
    ci_high: float


def differential_count(predicted: Sequence[int] | np.ndarray, class_names: Sequence[str],
                       confidence: float = 0.95) -> list[ClassCount]:
    """Count and share (with a Wilson `confidence` interval) of every class among the `predicted` indices."""
    predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
    counts = np.bincount(predicted, minlength=len(class_names)) if predicted.size else np.zeros(
        len(class_names), np.int64)
    total = int(counts.sum())
    rows = []
    for name, count in zip(class_names, counts.tolist(), strict=True):
        low, high = wilson_interval(count, total, confidence)
        rows.append(ClassCount(name, count, 100.0 * count / total if total else 0.0, 100.0 * low,
                               100.0 * high))
    return rows


def format_differential_count(rows: Sequence[ClassCount], unreadable: Sequence[tuple[str, str]] = (),
                              confidence: float = 0.95) -> str:
    """A plain-text table of the differential count, followed by the unreadable files (if any)."""
    total = sum(row.count for row in rows)
    width = max([len("class"), len("total")] + [len(row.name) for row in rows])
    level = f"{100 * confidence:g}% CI (Wilson)"
    lines = [f"Differential count of {total} classified image(s):",
             f"{'class':<{width}}  {'count':>6}  {'percent':>8}  {level}"]
    for row in rows:
        lines.append(f"{row.name:<{width}}  {row.count:>6d}  {row.percent:>7.2f}%  "
                     f"[{row.ci_low:.2f}%, {row.ci_high:.2f}%]")
    lines.append(f"{'total':<{width}}  {total:>6d}  {100.0 if total else 0.0:>7.2f}%")
    lines.append(f"Unreadable files: {len(unreadable)}")
    lines.extend(f"  {path}: {reason}" for path, reason in unreadable)
    return "\n".join(lines)


@functools.partial(jax.jit, static_argnames=("model", "bypass_enhancer"))
def class_probabilities(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
                        bypass_enhancer: bool = False) -> jax.Array:
    """Softmax probabilities (N, K) float32 of `model` (an EnhanceClassify) for uint8 images (N, H, W, 3).

    The images are scaled to [0, 1], the composite model's input convention. bypass_enhancer=True skips
    `enhance()`: the classifier gets the image ImageNet-normalised directly (the robustness study's
    "without enhancer").
    """
    x = to_unit_range(images)
    if bypass_enhancer:
        logits = model.apply(variables, x, method=lambda module, x: module.classifier(
            imagenet_normalize(x), train=False))
    else:
        logits = model.apply(variables, x, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("model",))
def enhanced_images(model: nn.Module, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
    """What the classifier of `model` (an EnhanceClassify with an enhancer) sees, before ImageNet
    normalisation: the enhancer's output (N, H, W, 3) float32 in [0, 1] for uint8 images (N, H, W, 3).

    One compiled program; applied eagerly, every layer would be compiled (and, on a GPU, autotuned) on
    its own.
    """
    enhanced = model.apply(variables, to_unit_range(images), train=False, method="enhance")
    return enhanced.astype(jnp.float32)


def batched_probabilities(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray,
                          batch_size: int) -> np.ndarray:
    """`class_probabilities` over uint8 `images` (N, H, W, 3) in fixed-size batches (one compilation)."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        padded = np.zeros((batch_size, *batch.shape[1:]), batch.dtype)
        padded[:len(batch)] = batch
        outputs.append(np.asarray(class_probabilities(model, variables, padded))[:len(batch)])
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


@dataclasses.dataclass
class FolderPredictions:
    """Predictions for the readable images of a folder; `probabilities` is (len(paths), K)."""

    class_names: list[str]
    paths: list[pathlib.Path]
    probabilities: np.ndarray
    unreadable: list[tuple[str, str]]  # (path, reason)

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=-1) if len(self.paths) else np.zeros(0, np.int64)


def _read_images(paths: Iterable[pathlib.Path], image_size: int,
                 unreadable: list[tuple[str, str]]) -> tuple[list[pathlib.Path], np.ndarray]:
    """Decodes `paths`; the ones that fail are appended to `unreadable` with the reason."""
    good, images = [], []
    for path in paths:
        try:
            image = np.asarray(load_image(str(path), image_size), dtype=np.uint8)
            if image.shape != (image_size, image_size, 3):
                raise ValueError(f"decoded to shape {image.shape}")
        except Exception as error:  # noqa: BLE001 - any decoding failure is reported, never fatal.
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            reason = reason.removeprefix(f"{path}: ")  # load_image's messages start with the path
            unreadable.append((str(path), reason))
            continue
        good.append(path)
        images.append(image)
    return good, (np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8))


def predict_folder(model: nn.Module, variables: Mapping[str, Any], class_names: Sequence[str],
                   folder: str | pathlib.Path, image_size: int, batch_size: int = 64,
                   progress: bool = True) -> FolderPredictions:
    """Classifies every image of `folder` (see `find_images`); unreadable files are collected, not raised."""
    paths = find_images(folder)
    unreadable: list[tuple[str, str]] = []
    good_paths: list[pathlib.Path] = []
    probabilities = []
    chunks = range(0, len(paths), batch_size)
    for start in tqdm(chunks, desc="predict", unit="batch", disable=not progress):
        chunk_paths, images = _read_images(paths[start:start + batch_size], image_size, unreadable)
        if chunk_paths:
            good_paths.extend(chunk_paths)
            probabilities.append(batched_probabilities(model, variables, images, batch_size))
    return FolderPredictions(
        class_names=list(class_names), paths=good_paths,
        probabilities=np.concatenate(probabilities) if probabilities else np.zeros(
            (0, len(class_names)), np.float32),
        unreadable=unreadable)


def write_predictions_csv(path: str | pathlib.Path, predictions: FolderPredictions) -> None:
    """One row per file: path, predicted label, one probability column per class, error.

    Unreadable files get an empty prediction and probabilities and the reason in `error`.
    """
    names = predictions.class_names
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "predicted_label", *[f"prob_{name}" for name in names], "error"])
        for file_path, probs, index in zip(predictions.paths, predictions.probabilities,
                                           predictions.predicted, strict=True):
            writer.writerow([str(file_path), names[int(index)], *[f"{p:.6f}" for p in probs], ""])
        for file_path, reason in predictions.unreadable:
            writer.writerow([file_path, "", *[""] * len(names), reason])
