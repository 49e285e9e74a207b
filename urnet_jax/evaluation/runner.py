"""`evaluate.py`'s work: evaluate a trained run on a split and write metrics, predictions, figures, report.

Outputs in <workdir>/eval/: metrics.json, predictions.csv, report.md, confusion_matrix.png, curves.png,
enhanced.png, gradcam.png, enhancer_output.json (runs with an enhancer: how saturated its output is on
the figure's images), and with `perturb=True` robustness.json and robustness.png.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

import urnet_jax.data as data_lib
from urnet_jax.evaluation import figures, report
from urnet_jax.evaluation.gradcam import gradcam
from urnet_jax.evaluation.metrics import classification_metrics, saturated_fraction
from urnet_jax.evaluation.robustness import robustness_curves
from urnet_jax.errors import ConfigError, DataError
from urnet_jax.inference import class_probabilities, enhanced_images, write_predictions_csv
from urnet_jax.steps import to_unit_range
from urnet_jax.workdir import Run, load_run, read_metrics_rows

# Values of the enhancer's output within this distance of 0 or 1 count as saturated (enhancer_output.json).
SATURATION_MARGIN = 0.01


def _predict_split(run: Run, split: str, num_examples: int, batch_size: int, examples_per_class: int,
                   progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, list[np.ndarray]]]:
    """Probabilities (N, K), labels (N,), manifest indices (N,) of a split, and the first
    `examples_per_class` uint8 images of every true class."""
    probabilities, labels, indices = [], [], []
    examples: dict[int, list[np.ndarray]] = {c: [] for c in range(len(run.class_names))}
    batches = data_lib.eval_batches(run.prepared_dir, split, batch_size)
    for batch in tqdm(batches, total=math.ceil(num_examples / batch_size), desc=f"evaluate {split}",
                      unit="batch", disable=not progress):
        mask = np.asarray(batch["mask"], bool)
        probs = np.asarray(class_probabilities(run.model, run.variables, batch["image"]))
        probabilities.append(probs[mask])
        labels.append(np.asarray(batch["label"])[mask])
        indices.append(np.asarray(batch["index"])[mask])
        for image, label in zip(np.asarray(batch["image"])[mask], labels[-1]):
            if len(examples[int(label)]) < examples_per_class:
                examples[int(label)].append(image)
    if not probabilities or sum(len(p) for p in probabilities) == 0:
        raise DataError(f"the {split} split of {run.prepared_dir} is empty")
    return np.concatenate(probabilities), np.concatenate(labels), np.concatenate(indices), examples


def _kept_epoch(rows: Sequence[Mapping[str, Any]], checkpoint: str) -> str:
    """A description of which phase-2 epoch the evaluated checkpoint is, from metrics.jsonl."""
    joint = [row for row in rows if row.get("phase") == 2]
    if not joint:
        return f"checkpoint '{checkpoint}'"
    if checkpoint != "best":
        return f"checkpoint '{checkpoint}' (the most recent one; metrics.jsonl records {len(joint)} phase-2 epochs)"
    best = [row for row in joint if row.get("best")]
    if not best:
        return f"checkpoint '{checkpoint}'"
    accuracy = best[-1].get("test_accuracy")
    during = f", test accuracy {100 * accuracy:.2f}% when saved" if accuracy is not None else ""
    return (f"checkpoint 'best' (highest test accuracy during training): phase-2 epoch {best[-1]['epoch']} of "
            f"{len(joint)}{during}")


def _describe_run(run: Run, workdir: pathlib.Path, checkpoint: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    model, data = run.config.model, run.config.data
    enhancer = "no enhancer" if model.enhancer == "none" else f"enhancer {model.enhancer}" + (
        f" (width {model.enhancer_width})" if model.enhancer_width else "")
    classifier = f"classifier {model.classifier}" + (
        f" (width {model.classifier_width})" if model.classifier_width else "")
    source = f"images from `{data.dir}`" if data.dir else "the built-in synthetic data set"
    if data.dir and "pbc" in pathlib.Path(data.dir).name.lower():
        source += " (stained PBC images)"
    variant = f"variant `{data.variant}`" + (
        " (a documented degradation standing in for stain-free images: a proxy, not stain-free data)"
        if data.variant == "stainfree_proxy" else "")
    return [f"workdir `{workdir}`", f"model: {enhancer} + {classifier}",
            f"data: {source}, {variant}, {data.image_size} px, classes {', '.join(run.class_names)}",
            _kept_epoch(rows, checkpoint)]


def _example_arrays(examples: Mapping[int, Sequence[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray([c for c, images in examples.items() for _ in images], np.int64)
    images = np.stack([image for c in examples for image in examples[c]])
    return images, labels


def _figures(run: Run, out: pathlib.Path, split: str, metrics: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
             examples: Mapping[int, Sequence[np.ndarray]]) -> list[tuple[str, str, str]]:
    """Writes the four figures (and, with an enhancer, enhancer_output.json); returns (heading, file name,
    caption) for the report."""
    names = run.class_names
    figures.plot_confusion_matrix(metrics["confusion_matrix"], names, out / "confusion_matrix.png")
    figures.plot_curves(rows, out / "curves.png")
    images, labels = _example_arrays(examples)
    unit = np.asarray(to_unit_range(images))
    has_enhancer = run.config.model.enhancer != "none"
    enhanced = np.asarray(enhanced_images(run.model, run.variables, images)) if has_enhancer else None
    figures.plot_image_pairs(unit, enhanced, labels, names, out / "enhanced.png", run.config.model.enhancer)
    heatmaps, explained = gradcam(run.model, run.variables, unit, return_class=True)
    figures.plot_gradcam(unit, heatmaps, labels, explained, names, out / "gradcam.png",
                         f"Grad-CAM of the predicted class, {run.config.model.classifier}'s last conv stage")
    if has_enhancer:
        saturation = _write_enhancer_saturation(unit, enhanced, out / "enhancer_output.json")
        enhanced_caption = (
            f"{split.capitalize()} images (left) and the enhancer's output that the classifier sees (right). "
            f"{100 * saturation['output']:.1f}% of the output values shown are within {SATURATION_MARGIN} of 0 "
            f"or 1 (saturated), against {100 * saturation['input']:.1f}% of the input values "
            "(enhancer_output.json).")
    else:
        enhanced_caption = f"This run has no enhancer: the figure shows the raw {split} images the classifier sees."
    return [
        ("Confusion matrix", "confusion_matrix.png",
         "Rows are true classes, columns predicted classes; right: rows normalised to 100%."),
        ("Training curves", "curves.png",
         "Per-epoch train/test loss and accuracy from metrics.jsonl (phase 1: enhancer reconstruction MSE); "
         "the star marks the weights kept as 'best'."),
        ("Raw vs enhanced images", "enhanced.png", enhanced_caption),
        ("Grad-CAM", "gradcam.png",
         "Grad-CAM heatmaps of the predicted class over the input image (through the enhancer when there "
         "is one), from the classifier's last convolutional stage; red = strongest evidence."),
    ]


def _write_enhancer_saturation(unit_images: np.ndarray, enhanced: np.ndarray, path: pathlib.Path) -> dict[str, Any]:
    """Writes how saturated the enhancer's output is on the figure's example images (and, for reference,
    the input); returns the dictionary written."""
    saturation = {"examples": len(enhanced), "margin": SATURATION_MARGIN,
                  "output": saturated_fraction(enhanced, SATURATION_MARGIN),
                  "input": saturated_fraction(unit_images, SATURATION_MARGIN)}
    path.write_text(json.dumps(saturation, indent=2) + "\n")
    return saturation


def measure_robustness(run: Run, split: str, num_examples: int, batch_size: int,
                       progress: bool = True) -> dict[str, Any]:
    """`robustness_curves` of the run with its enhancer and, when it has one, with `enhance()` bypassed."""
    has_enhancer = run.config.model.enhancer != "none"

    def predictor(bypass: bool):
        return lambda images: np.asarray(class_probabilities(run.model, run.variables, images, bypass)).argmax(-1)

    predict = ({"with_enhancer": predictor(False), "without_enhancer": predictor(True)} if has_enhancer
               else {"without_enhancer": predictor(False)})
    results = robustness_curves(predict, data_lib.eval_batches(run.prepared_dir, split, batch_size),
                                num_batches=math.ceil(num_examples / batch_size), seed=int(run.config.seed),
                                progress=progress)
    results["split"] = split
    results["note"] = ("without_enhancer = the same trained run with enhance() bypassed (the classifier sees "
                       "the perturbed raw image, ImageNet-normalised), not a separately trained model"
                       if has_enhancer else "this run has no enhancer")
    return results


def evaluate_run(workdir: str | pathlib.Path, checkpoint: str = "best", split: str = "test",
                 batch_size: int | None = None, examples_per_class: int = 3, perturb: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Evaluates the run in `workdir` and writes <workdir>/eval/*; returns the metrics.json dictionary.

    Raises ConfigError/DataError (one-line messages) for a missing run, checkpoint or split.
    """
    workdir = pathlib.Path(workdir)
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r} (expected train or test)")
    if examples_per_class < 1:
        raise ConfigError(f"examples per class must be >= 1, got {examples_per_class}")
    run = load_run(workdir, checkpoint)
    batch_size = batch_size or int(run.config.eval_batch_size)
    out = workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    manifest = data_lib.read_manifest(run.prepared_dir, split)
    probabilities, labels, indices, examples = _predict_split(run, split, len(manifest), batch_size,
                                                              examples_per_class, progress)
    metrics = classification_metrics(labels, probabilities.argmax(axis=-1), run.class_names)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions_csv(out / "predictions.csv", [manifest[int(index)]["path"] for index in indices],
                          probabilities, run.class_names, true_labels=labels)
    rows = read_metrics_rows(workdir)
    figure_list = _figures(run, out, split, metrics, rows, examples)
    robustness = None
    if perturb:
        robustness = measure_robustness(run, split, len(manifest), batch_size, progress)
        (out / "robustness.json").write_text(json.dumps(robustness, indent=2) + "\n")
        figures.plot_robustness(robustness, out / "robustness.png")
    name = workdir.resolve().name
    text = report.run_report(name, metrics, _describe_run(run, workdir, checkpoint, rows), figure_list,
                             split=split, robustness=robustness)
    (out / "report.md").write_text(text)
    return metrics
