"""Classification metrics in the paper's Table-3 terms: per-class recall, precision, F1, and macro averages.

Conventions (identical to scikit-learn's `precision_recall_fscore_support(..., zero_division=0)`):
  * confusion_matrix[t, p] counts examples of true class t predicted as class p (rows = truth);
  * a class that is never predicted has precision 0; a class absent from the labels has recall 0;
    F1 is 0 when precision + recall is 0;
  * macro averages are unweighted means over all classes (the paper's "average" rows), including
    classes with zero predictions or zero support.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(labels: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray,
                     num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    for name, values in (("label", labels), ("prediction", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} outside [0, {num_classes})")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0."""
    numerator = numerator.astype(np.float64)
    denominator = denominator.astype(np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)


def metrics_from_confusion(matrix: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """The metrics.json dictionary of a confusion matrix (rows = truth); all rates are fractions in [0, 1].

    Returns {"classes", "accuracy", "per_class": {name: {"recall", "precision", "f1", "support"}},
    "macro": {"recall", "precision", "f1"}, "confusion_matrix": [[int]]}.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    if matrix.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix of shape {matrix.shape} for {len(class_names)} classes")
    true_positives = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    recall = _safe_divide(true_positives, support)
    precision = _safe_divide(true_positives, predicted)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    total = matrix.sum()
    return {
        "classes": list(class_names),
        "accuracy": float(true_positives.sum() / total) if total else 0.0,
        "per_class": {
            name: {"recall": float(recall[i]), "precision": float(precision[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "macro": {"recall": float(recall.mean()), "precision": float(precision.mean()),
                  "f1": float(f1.mean())},
        "confusion_matrix": matrix.tolist(),
    }


def classification_metrics(labels: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray,
                           class_names: Sequence[str]) -> dict[str, Any]:
    """metrics.json for integer `labels` and `predictions` (class indices into `class_names`)."""
    return metrics_from_confusion(confusion_matrix(labels, predictions, len(class_names)), class_names)


def saturated_fraction(images: np.ndarray, margin: float = 0.01) -> float:
    """The fraction of values of float `images` in [0, 1] (any shape) within `margin` of 0 or 1.

    For an enhancer's sigmoid output, near 1 means the output has become a binary map: a saturated
    sigmoid passes almost no gradient back to the enhancer.
    """
    values = np.asarray(images, dtype=np.float32)
    if values.size == 0:
        raise ValueError("no values to measure")
    return float(np.mean((values <= margin) | (values >= 1.0 - margin)))
