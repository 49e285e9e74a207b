"""Running a trained model over images: class probabilities, the enhancer's output, a folder of files.

    result = predict_folder(run.model, run.variables, run.class_names, "cells/", run.config.data)
    write_predictions_csv("preds.csv", result.paths, result.probabilities(), result.class_names,
                          unreadable=result.unreadable)

`write_predictions_csv` is the one per-image CSV schema of the project: `evaluate.py` writes it with the
true labels of a split, `predict.py` for a folder of unlabelled (and possibly unreadable) files.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from urnet_jax import compiler_options
from urnet_jax.adapt_bn import adapt_batch_stats
from urnet_jax.calibration import temperature_scaled
from urnet_jax.data import load_image
from urnet_jax.data.images import IMAGE_EXTENSIONS, is_image_name
from urnet_jax.data.transforms import model_input
from urnet_jax.errors import DataError
from urnet_jax.models.composite import imagenet_normalize
from urnet_jax.steps import to_unit_range


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


@functools.partial(compiler_options.jit, static_argnames=("model", "bypass_enhancer"))
def class_logits(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
                 bypass_enhancer: bool = False) -> jax.Array:
    """Logits (N, K) float32 of `model` (an EnhanceClassify) for uint8 images (N, H, W, 3), eval mode.

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
    return logits.astype(jnp.float32)


def class_probabilities(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
                        bypass_enhancer: bool = False) -> jax.Array:
    """Softmax probabilities (N, K) float32 of `class_logits`."""
    return jax.nn.softmax(class_logits(model, variables, images, bypass_enhancer), axis=-1)


@functools.partial(compiler_options.jit, static_argnames=("model",))
def enhanced_images(model: nn.Module, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
    """What the classifier of `model` (an EnhanceClassify with an enhancer) sees, before ImageNet
    normalisation: the enhancer's output (N, H, W, 3) float32 in [0, 1] for uint8 images (N, H, W, 3).

    One compiled program; applied eagerly, every layer would be compiled (and, on a GPU, autotuned) on
    its own.
    """
    enhanced = model.apply(variables, to_unit_range(images), train=False, method="enhance")
    return enhanced.astype(jnp.float32)


def batched_logits(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray,
                   batch_size: int) -> np.ndarray:
    """`class_logits` (N, K) float32 over uint8 `images` (N, H, W, 3) in fixed-size batches (one compilation)."""
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        padded = np.zeros((batch_size, *batch.shape[1:]), batch.dtype)
        padded[:len(batch)] = batch
        outputs.append(np.asarray(class_logits(model, variables, padded))[:len(batch)])
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def batched_probabilities(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray,
                          batch_size: int) -> np.ndarray:
    """Softmax probabilities (N, K) float32 of `batched_logits`."""
    logits = batched_logits(model, variables, images, batch_size)
    return np.asarray(jax.nn.softmax(logits, axis=-1)) if len(logits) else logits


@dataclasses.dataclass
class FolderPredictions:
    """Predictions for the readable images of a folder: `logits` (len(paths), K) float32."""

    class_names: list[str]
    paths: list[pathlib.Path]
    logits: np.ndarray
    unreadable: list[tuple[str, str]]  # (path, reason)

    def probabilities(self, temperature: float = 1.0) -> np.ndarray:
        """softmax(logits / temperature) (len(paths), K); temperature from the run's calibration."""
        return temperature_scaled(self.logits, temperature)

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=-1) if len(self.paths) else np.zeros(0, np.int64)


ImageReader = Callable[[pathlib.Path], np.ndarray]


def image_reader(data_config: Mapping[str, Any]) -> ImageReader:
    """path -> the uint8 (S, S, 3) image a model trained with `data_config` (config.data) sees:
    `urnet_jax.data.transforms.model_input` of the decoded file (S = data.image_size); raises DataError
    naming the file when it cannot be decoded."""
    return lambda path: model_input(load_image(str(path)), data_config)


def _read_images(paths: Iterable[pathlib.Path], read: ImageReader,
                 unreadable: list[tuple[str, str]]) -> tuple[list[pathlib.Path], list[np.ndarray]]:
    """Decodes `paths`; the ones that fail are appended to `unreadable` with the reason."""
    good, images = [], []
    for path in paths:
        try:
            image = np.asarray(read(path), dtype=np.uint8)
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"decoded to shape {image.shape}")
        except Exception as error:  # noqa: BLE001 - any decoding failure is reported, never fatal.
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            reason = reason.removeprefix(f"{path}: ")  # load_image's messages start with the path
            unreadable.append((str(path), reason))
            continue
        good.append(path)
        images.append(image)
    return good, images


def image_batches(paths: Sequence[pathlib.Path], read: ImageReader, batch_size: int,
                  unreadable: list[tuple[str, str]], progress: bool = False, desc: str = "read"
                  ) -> Iterator[tuple[list[pathlib.Path], np.ndarray]]:
    """(readable paths, uint8 images (n, S, S, 3)) per chunk of `batch_size` files (n <= batch_size;
    chunks without a readable file are left out); unreadable files are appended to `unreadable`."""
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", disable=not progress):
        good, images = _read_images(paths[start:start + batch_size], read, unreadable)
        if good:
            yield good, np.stack(images)


def adapted_variables(model: nn.Module, variables: Mapping[str, Any], paths: Sequence[pathlib.Path],
                      read: ImageReader, batch_size: int, progress: bool = False) -> dict[str, Any]:
    """`variables` with the BatchNorm statistics re-estimated on the readable images of `paths`
    (`urnet_jax.adapt_bn.adapt_batch_stats`, in memory: nothing stored changes)."""
    batches = (images for _, images in image_batches(paths, read, batch_size, [], progress, "adapt BN"))
    return adapt_batch_stats(model, variables, batches)


def predict_files(model: nn.Module, variables: Mapping[str, Any], class_names: Sequence[str],
                  paths: Sequence[pathlib.Path], read: ImageReader, batch_size: int = 64,
                  progress: bool = True) -> FolderPredictions:
    """Classifies the files `paths`; unreadable files are collected, not raised."""
    unreadable: list[tuple[str, str]] = []
    good_paths: list[pathlib.Path] = []
    logits = []
    for chunk_paths, images in image_batches(paths, read, batch_size, unreadable, progress, "predict"):
        good_paths.extend(chunk_paths)
        logits.append(batched_logits(model, variables, images, batch_size))
    return FolderPredictions(
        class_names=list(class_names), paths=good_paths,
        logits=np.concatenate(logits) if logits else np.zeros((0, len(class_names)), np.float32),
        unreadable=unreadable)


def folder_images(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """`find_images(folder)`; DataError when `folder` is not a directory or holds no image file."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a directory")
    paths = find_images(folder)
    if not paths:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}")
    return paths


def predict_folder(model: nn.Module, variables: Mapping[str, Any], class_names: Sequence[str],
                   folder: str | pathlib.Path, data_config: Mapping[str, Any], batch_size: int = 64,
                   adapt_bn: bool = False, progress: bool = True) -> FolderPredictions:
    """Classifies every image of `folder` (see `find_images`), read as a model trained with `data_config`
    sees it; unreadable files are collected, not raised. adapt_bn=True first re-estimates the BatchNorm
    statistics on the folder's images (`adapted_variables`).

    Raises DataError when `folder` is not a directory or holds no image file.
    """
    paths = folder_images(folder)
    read = image_reader(data_config)
    if adapt_bn:
        variables = adapted_variables(model, variables, paths, read, batch_size, progress)
    return predict_files(model, variables, class_names, paths, read, batch_size, progress)


def write_predictions_csv(path: str | pathlib.Path, paths: Sequence[str | pathlib.Path], probabilities: np.ndarray,
                          class_names: Sequence[str], true_labels: Sequence[int] | np.ndarray | None = None,
                          unreadable: Sequence[tuple[str, str]] = ()) -> None:
    """Writes one row per file: path, true_label, predicted_label, prob_<class>... (6 decimals), error.

    `probabilities` (len(paths), K) belong to `paths`; `true_labels` (class indices, when known) fill
    true_label, else it stays empty. Each `unreadable` (path, reason) adds a row with only the path and
    the reason in `error`.
    """
    if true_labels is None:
        true_names = [""] * len(paths)
    else:
        true_names = [class_names[int(label)] for label in true_labels]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true_label", "predicted_label", *[f"prob_{name}" for name in class_names],
                         "error"])
        for file_path, true_name, probs in zip(paths, true_names, probabilities, strict=True):
            writer.writerow([str(file_path), true_name, class_names[int(np.argmax(probs))],
                             *[f"{p:.6f}" for p in probs], ""])
        for file_path, reason in unreadable:
            writer.writerow([file_path, "", "", *[""] * len(class_names), reason])
