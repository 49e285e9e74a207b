"""The evaluation figures (matplotlib, Agg backend): confusion matrices, training curves, raw vs enhanced
images, Grad-CAM overlays and robustness curves. Every function writes one PNG to `path`."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first.
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 110


def _save(figure: plt.Figure, path: str | pathlib.Path) -> None:
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)


def plot_confusion_matrix(matrix: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str],
                          path: str | pathlib.Path) -> None:
    """Two panels: counts, and rows normalised to % of each true class (rows = true, columns = predicted)."""
    matrix = np.asarray(matrix, dtype=np.int64)
    support = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(100.0 * matrix, support, out=np.zeros(matrix.shape), where=support > 0)
    size = 2.2 + 0.9 * len(class_names)
    figure, axes = plt.subplots(1, 2, figsize=(2 * size + 2.5, size), layout="constrained")
    panels = ((matrix, "counts", "{:d}"), (normalised, "% of true class (recall on the diagonal)", "{:.1f}"))
    for axis, (values, title, fmt) in zip(axes, panels):
        image = axis.imshow(values, cmap="Blues", vmin=0, vmax=max(values.max(), 1e-9))
        figure.colorbar(image, ax=axis, shrink=0.8)
        for (row, column), value in np.ndenumerate(values):
            colour = "white" if value > 0.55 * values.max() else "black"
            axis.text(column, row, fmt.format(value), ha="center", va="center", color=colour)
        ticks = np.arange(len(class_names))
        axis.set_xticks(ticks, class_names, rotation=30, ha="right")
        axis.set_yticks(ticks, class_names)
        axis.set_xlabel("predicted class")
        axis.set_ylabel("true class")
        axis.set_title(title)
    _save(figure, path)


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str | pathlib.Path) -> None:
    """Train/test loss and accuracy per epoch from metrics.jsonl rows, both phases.

    Rows: {'phase': 1|2, 'epoch', 'train_loss', 'test_loss', 'train_accuracy', 'test_accuracy', 'best',
    'selected_on'}; phase 1 (enhancer pre-training) has reconstruction MSE losses and no accuracy; rows
    without test metrics (train.test_every_epoch=False) leave gaps the test curve bridges. A panel without data
    says so instead of staying blank.
    """
    panels = (
        (1, "loss", "phase 1: enhancer pre-training", "reconstruction MSE"),
        (2, "loss", "phase 2: joint training", "cross-entropy"),
        (2, "accuracy", "phase 2: joint training", "accuracy (%)"),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 3.6), layout="constrained")
    for axis, (phase, metric, title, ylabel) in zip(axes, panels):
        phase_rows = [row for row in rows if row.get("phase") == phase]
        scale = 100.0 if metric == "accuracy" else 1.0
        for split, style in (("train", "-o"), ("test", "-s")):
            points = [(row["epoch"], scale * row[f"{split}_{metric}"]) for row in phase_rows
                      if row.get(f"{split}_{metric}") is not None]
            if points:
                axis.plot(*zip(*points), style, markersize=3, label=split)
        best = [row for row in phase_rows if row.get("best")]
        if best and best[-1].get(f"test_{metric}") is not None:
            row = best[-1]
            axis.plot(row["epoch"], scale * row[f"test_{metric}"], "*", color="crimson", markersize=12,
                      label=f"kept (best on {row.get('selected_on', 'test')})")
        if axis.lines:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "not run" if not phase_rows else "no data", ha="center", va="center",
                      transform=axis.transAxes, color="grey")
        axis.set_title(title, fontsize=10)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epoch")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    _save(figure, path)


def _class_rows(labels: Sequence[int], num_classes: int) -> list[list[int]]:
    """Example indices grouped by true class (one list per class, in class order)."""
    return [[i for i, label in enumerate(labels) if label == c] for c in range(num_classes)]


def _panel_grid(labels: Sequence[int], class_names: Sequence[str], panels_per_example: int,
                panel_inches: float = 2.0) -> tuple[plt.Figure, np.ndarray, list[list[int]]]:
    """A figure with one row per class and `panels_per_example` axes per example (all axes off)."""
    rows = _class_rows(labels, len(class_names))
    columns = max([len(row) for row in rows] + [1]) * panels_per_example
    figure, axes = plt.subplots(len(rows), columns, squeeze=False, layout="constrained",
                                figsize=(panel_inches * columns, panel_inches * len(rows) + 0.6))
    for axis in axes.flat:
        axis.axis("off")
    return figure, axes, rows


def plot_image_pairs(raw: np.ndarray, enhanced: np.ndarray | None, labels: Sequence[int],
                     class_names: Sequence[str], path: str | pathlib.Path, enhancer_name: str = "",
                     preprocessing: str = "none") -> None:
    """Raw vs enhanced images (N, H, W, 3) in [0, 1]; one row per true class, pairs side by side.

    `enhanced=None` (a run without an enhancer) shows the raw images only, with a note saying so;
    `preprocessing` names a fixed step (data.preprocessing, e.g. 'clahe') already applied to `raw`.
    """
    panels = 1 if enhanced is None else 2
    figure, axes, rows = _panel_grid(labels, class_names, panels)
    for class_index, examples in enumerate(rows):
        for slot, example in enumerate(examples):
            for panel in range(panels):
                axis = axes[class_index, slot * panels + panel]
                axis.imshow(np.clip(raw[example] if panel == 0 else enhanced[example], 0.0, 1.0),
                            interpolation="nearest")
                axis.set_title(f"{class_names[class_index]}: {'raw' if panel == 0 else 'enhanced'}",
                               fontsize=9)
    if enhanced is None and preprocessing != "none":
        figure.suptitle(f"No learned enhancer: the classifier sees these images after fixed {preprocessing.upper()}.")
    elif enhanced is None:
        figure.suptitle("No enhancer in this run: the classifier sees these raw images unchanged.")
    else:
        figure.suptitle(f"Raw vs enhanced images ({enhancer_name or 'enhancer'} output)")
    _save(figure, path)


def plot_gradcam(images: np.ndarray, heatmaps: np.ndarray, labels: Sequence[int], predicted: Sequence[int],
                 class_names: Sequence[str], path: str | pathlib.Path, title: str = "") -> None:
    """Images (N, H, W, 3) in [0, 1] with their Grad-CAM heatmaps (N, H, W) in [0, 1] overlaid; one row
    per true class, each example shown plain and overlaid."""
    figure, axes, rows = _panel_grid(labels, class_names, 2)
    for class_index, examples in enumerate(rows):
        for slot, example in enumerate(examples):
            image = np.clip(images[example], 0.0, 1.0)
            plain, overlay = axes[class_index, 2 * slot], axes[class_index, 2 * slot + 1]
            plain.imshow(image, interpolation="nearest")
            plain.set_title(f"true {class_names[class_index]}", fontsize=9)
            overlay.imshow(image, interpolation="nearest")
            overlay.imshow(heatmaps[example], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            overlay.set_title(f"pred. {class_names[predicted[example]]}", fontsize=9)
    figure.suptitle(title or "Grad-CAM of the predicted class, last convolutional stage")
    _save(figure, path)


def plot_robustness(results: Mapping[str, Any], path: str | pathlib.Path) -> None:
    """Accuracy (%) vs severity, one panel per perturbation, one line per mode (`robustness_curves` output)."""
    perturbations = results["perturbations"]
    figure, axes = plt.subplots(1, len(perturbations), figsize=(3.6 * len(perturbations), 3.4),
                                squeeze=False, sharey=True, layout="constrained")
    for axis, (kind, curve) in zip(axes[0], perturbations.items()):
        for mode, accuracy in curve["accuracy"].items():
            axis.plot(curve["severity"], 100.0 * np.asarray(accuracy), marker="o",
                      label=mode.replace("_", " "))
        axis.set_title(kind)
        axis.set_xlabel(curve["units"], fontsize=8)
        axis.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy (%)")
    axes[0, 0].legend(fontsize=8)
    figure.suptitle(f"Accuracy under perturbations ({results['num_examples']} images)")
    _save(figure, path)


def plot_study_curves(curves: Mapping[str, Mapping[str, Sequence[Sequence[tuple[int, float]]]]],
                      path: str | pathlib.Path) -> None:
    """Phase-2 test accuracy (%) per epoch of a study: one panel per data variant, one colour per model,
    a thin line per seed and a thick line for the mean over the seeds that reached each epoch.

    curves: {data variant: {model: [[(epoch, test accuracy in [0, 1]), ...] for each seed]}}.
    """
    figure, axes = plt.subplots(1, max(len(curves), 1), figsize=(5.5 * max(len(curves), 1), 3.8),
                                squeeze=False, sharey=True, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (variant, by_model) in zip(axes[0], curves.items()):
        for colour, (model, seeds) in zip(colours, by_model.items()):
            per_epoch: dict[int, list[float]] = {}
            for seed_curve in seeds:
                epochs, accuracy = zip(*seed_curve)
                axis.plot(epochs, 100.0 * np.asarray(accuracy), color=colour, alpha=0.35, linewidth=0.8)
                for epoch, value in seed_curve:
                    per_epoch.setdefault(epoch, []).append(value)
            epochs = sorted(per_epoch)
            axis.plot(epochs, [100.0 * np.mean(per_epoch[e]) for e in epochs], color=colour, linewidth=2.2,
                      label=f"{model} ({len(seeds)} seed{'s' if len(seeds) != 1 else ''})")
        axis.set_title(f"data variant: {variant}", fontsize=10)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("phase-2 epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    axes[0, 0].set_ylabel("test accuracy (%)")
    figure.suptitle("Test accuracy after every joint-training epoch (thin: one seed; thick: mean over seeds)")
    _save(figure, path)
