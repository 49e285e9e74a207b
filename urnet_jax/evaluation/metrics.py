"""Classification metrics in the paper's Table-3 terms: per-class recall, precision, F1, and macro averages.

Computed by scikit-learn (`confusion_matrix`, `precision_recall_fscore_support(..., zero_division=0)`):
  * confusion_matrix[t, p] counts examples of true class t predicted as class p (rows = truth);
  * a class that is never predicted has precision 0; a class absent from the labels has recall 0;
    F1 is 0 when precision + recall is 0;
  * macro averages are unweighted means over all classes (the paper's "average" rows), including
    classes with zero predictions or zero support.
scikit-learn computes F1 as 2 TP / (2 TP + FP + FN); as 2 P R / (P + R) it can differ in the last bit
(about 1e-16), far below the two decimals of the reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as sklearn_metrics


def _class_indices(values: Sequence[int] | np.ndarray, name: str, num_classes: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"{name} outside [0, {num_classes})")
    return values


def confusion_matrix(labels: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray,
                     num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    labels = _class_indices(labels, "label", num_classes)
    predictions = _class_indices(predictions, "prediction", num_classes)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    if not labels.size:
        return np.zeros((num_classes, num_classes), np.int64)
    return sklearn_metrics.confusion_matrix(labels, predictions, labels=np.arange(num_classes)).astype(np.int64)


def classification_metrics(labels: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray,
                           class_names: Sequence[str]) -> dict[str, Any]:
    """The metrics.json dictionary of integer `labels` and `predictions` (class indices into
    `class_names`); all rates are fractions in [0, 1].

    Returns {"classes", "accuracy", "per_class": {name: {"recall", "precision", "f1", "support"}},
    "macro": {"recall", "precision", "f1"}, "confusion_matrix": [[int]]}.
    """
    matrix = confusion_matrix(labels, predictions, len(class_names))
    if matrix.sum():
        precision, recall, f1, _ = sklearn_metrics.precision_recall_fscore_support(
            labels, predictions, labels=np.arange(len(class_names)), zero_division=0)
    else:
        precision = recall = f1 = np.zeros(len(class_names))
    support = matrix.sum(axis=1)
    total = matrix.sum()
    return {
        "classes": list(class_names),
        "accuracy": float(np.trace(matrix) / total) if total else 0.0,
        "per_class": {
            name: {"recall": float(recall[i]), "precision": float(precision[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "macro": {"recall": float(recall.mean()), "precision": float(precision.mean()),
                  "f1": float(f1.mean())},
        "confusion_matrix": matrix.tolist(),
    }


def metrics_from_confusion(matrix: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """`classification_metrics` of the examples a confusion matrix (rows = truth) counts."""
    matrix = np.asarray(matrix, dtype=np.int64)
    if matrix.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix of shape {matrix.shape} for {len(class_names)} classes")
    classes = np.arange(len(class_names))
    labels = np.repeat(classes, matrix.sum(axis=1))
    predictions = np.concatenate([np.repeat(classes, row) for row in matrix])
    return classification_metrics(labels, predictions, class_names)


def saturated_fraction(images: np.ndarray, margin: float = 0.01) -> float:
    """The fraction of values of float `images` in [0, 1] (any shape) within `margin` of 0 or 1.

    For an enhancer's sigmoid output, near 1 means the output has become a binary map: a saturated
    sigmoid passes almost no gradient back to the enhancer.
    """
    values = np.asarray(images, dtype=np.float32)
    if values.size == 0:
        raise ValueError("no values to measure")
    return float(np.mean((values <= margin) | (values >= 1.0 - margin)))
