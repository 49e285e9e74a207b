"""Per-image predictions of a prepared split, small enough to commit: `<workdir>/eval/predictions_<split>.csv`.

One row per example of the split, in manifest order:

    index, true, predicted, prob_<class>...

index is the example's row in `urnet_jax.data.read_manifest(prepared_dir, split)`; true and predicted are
class names; the probabilities are the model's softmax (temperature 1, not calibrated) rounded to 4
decimals. Paired comparisons of runs on the same split (McNemar's test, bootstrap intervals) need only
these files, not the checkpoints.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np

from urnet_jax.errors import DataError

DECIMALS = 4


def predictions_file(eval_dir: str | pathlib.Path, split: str) -> pathlib.Path:
    """<eval_dir>/predictions_<split>.csv."""
    return pathlib.Path(eval_dir) / f"predictions_{split}.csv"


@dataclasses.dataclass(frozen=True)
class SplitPredictions:
    """A split's per-image predictions: indices, labels, predicted (N,) int; probabilities (N, K)."""

    class_names: list[str]
    indices: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray


def write_split_predictions(path: str | pathlib.Path, indices: np.ndarray, labels: np.ndarray,
                            probabilities: np.ndarray, class_names: Sequence[str]) -> None:
    """Writes the rows (see the module docstring), sorted by index; probabilities (N, K), indices and
    labels (N,) int."""
    order = np.argsort(indices, kind="stable")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "true", "predicted", *[f"prob_{name}" for name in class_names]])
        for i in order:
            writer.writerow([int(indices[i]), class_names[int(labels[i])],
                             class_names[int(np.argmax(probabilities[i]))],
                             *[f"{p:.{DECIMALS}f}" for p in probabilities[i]]])


def read_split_predictions(path: str | pathlib.Path) -> SplitPredictions:
    """The predictions written by `write_split_predictions`; DataError (one line) when missing or damaged."""
    path = pathlib.Path(path)
    try:
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            rows = list(reader)
        class_names = [column.removeprefix("prob_") for column in header[3:]]
        position = {name: i for i, name in enumerate(class_names)}
        return SplitPredictions(
            class_names=class_names,
            indices=np.asarray([int(row[0]) for row in rows], np.int64),
            labels=np.asarray([position[row[1]] for row in rows], np.int64),
            predicted=np.asarray([position[row[2]] for row in rows], np.int64),
            probabilities=np.asarray([[float(v) for v in row[3:]] for row in rows], np.float64).reshape(
                len(rows), len(class_names)))
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    except (StopIteration, ValueError, KeyError, IndexError) as error:
        raise DataError(f"{path} is damaged: {type(error).__name__}: {error}") from None
