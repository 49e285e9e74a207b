"""`evaluate.py`'s work: evaluate a trained run on a split, or on an external class-per-folder image set.

`evaluate_run` writes to <workdir>/eval/: metrics.json, predictions.csv (the evaluated split, one row per
image with its file), predictions_test.csv and predictions_val.csv (when the run has a validation split;
`split_predictions`), reliability.png, report.md, confusion_matrix.png, curves.png, enhanced.png,
gradcam.png, enhancer_output.json (runs with an enhancer: how saturated its output is on the figure's
images), and with `perturb=True` robustness.json and robustness.png. It fits temperature scaling
(`urnet_jax.calibration`) on the validation split (on the test split when the run has none, said so in
the report) and stores <workdir>/calibration.json and heldout_predictions.npz, which `predict.py` reads.

`evaluate_external` evaluates the run on another lab's images (folders mapped to the run's classes as in
training) and writes metrics.json, external.json, predictions.csv (unreadable files listed with their
reason), report.md and the figures to <workdir>/eval/<name>/. With adapt_bn=True the BatchNorm statistics
are first re-estimated on those images (`urnet_jax.adapt_bn`), in memory only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

import urnet_jax.data as data_lib
from urnet_jax import calibration as calibration_lib
from urnet_jax.data.folders import resolve_class_folders, scan_class_files
from urnet_jax.errors import ConfigError, DataError
from urnet_jax.evaluation import figures, report
from urnet_jax.evaluation.gradcam import gradcam
from urnet_jax.evaluation.metrics import classification_metrics, saturated_fraction
from urnet_jax.evaluation.robustness import robustness_curves
from urnet_jax.evaluation.split_predictions import (
    predictions_file,
    write_split_predictions,
)
from urnet_jax.inference import (
    adapted_variables,
    class_logits,
    class_probabilities,
    enhanced_images,
    image_reader,
    predict_files,
    write_predictions_csv,
)
from urnet_jax.steps import to_unit_range
from urnet_jax.workdir import Run, load_run, read_metrics_rows

# Values of the enhancer's output within this distance of 0 or 1 count as saturated (enhancer_output.json).
SATURATION_MARGIN = 0.01
EXTERNAL_FILE = "external.json"
RELIABILITY_FIGURE = "reliability.png"


@dataclasses.dataclass
class SplitOutputs:
    """A split's logits (N, K) float32, labels (N,), manifest indices (N,), and the first few uint8
    images of every true class (for the figures)."""

    logits: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    examples: dict[int, list[np.ndarray]]

    @property
    def probabilities(self) -> np.ndarray:
        return calibration_lib.temperature_scaled(self.logits)


def _predict_split(run: Run, split: str, num_examples: int, batch_size: int, examples_per_class: int,
                   progress: bool) -> SplitOutputs:
    logits, labels, indices = [], [], []
    examples: dict[int, list[np.ndarray]] = {c: [] for c in range(len(run.class_names))}
    batches = data_lib.eval_batches(run.prepared_dir, split, batch_size)
    for batch in tqdm(batches, total=math.ceil(num_examples / batch_size), desc=f"evaluate {split}",
                      unit="batch", disable=not progress):
        mask = np.asarray(batch["mask"], bool)
        logits.append(np.asarray(class_logits(run.model, run.variables, batch["image"]))[mask])
        labels.append(np.asarray(batch["label"])[mask])
        indices.append(np.asarray(batch["index"])[mask])
        for image, label in zip(np.asarray(batch["image"])[mask], labels[-1]):
            if len(examples[int(label)]) < examples_per_class:
                examples[int(label)].append(image)
    if not logits or sum(len(values) for values in logits) == 0:
        raise DataError(f"the {split} split of {run.prepared_dir} is empty")
    return SplitOutputs(np.concatenate(logits), np.concatenate(labels), np.concatenate(indices), examples)


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
    chosen_on = best[-1].get("selected_on", "test")  # runs from before validation selection chose on test
    accuracy = best[-1].get(f"{chosen_on}_accuracy")
    during = f", {chosen_on} accuracy {100 * accuracy:.2f}% when saved" if accuracy is not None else ""
    return (f"checkpoint 'best' (highest {chosen_on} accuracy during training): phase-2 epoch {best[-1]['epoch']} "
            f"of {len(joint)}{during}")


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


def _figures(run: Run, variables: Mapping[str, Any], out: pathlib.Path, source: str, metrics: Mapping[str, Any],
             rows: Sequence[Mapping[str, Any]] | None, examples: Mapping[int, Sequence[np.ndarray]]
             ) -> list[tuple[str, str, str]]:
    """Writes the figures (training curves only when `rows` is given; with an enhancer also
    enhancer_output.json) for images of `source` (e.g. "Test"); returns (heading, file name, caption)
    for the report."""
    names = run.class_names
    figure_list = [("Confusion matrix", "confusion_matrix.png",
                    "Rows are true classes, columns predicted classes; right: rows normalised to 100%.")]
    figures.plot_confusion_matrix(metrics["confusion_matrix"], names, out / "confusion_matrix.png")
    if rows is not None:
        figures.plot_curves(rows, out / "curves.png")
        figure_list.append(("Training curves", "curves.png",
                            "Per-epoch train/test loss and accuracy from metrics.jsonl (phase 1: enhancer "
                            "reconstruction MSE); the star marks the weights kept as 'best'."))
    images, labels = _example_arrays(examples)
    unit = np.asarray(to_unit_range(images))
    has_enhancer = run.config.model.enhancer != "none"
    enhanced = np.asarray(enhanced_images(run.model, variables, images)) if has_enhancer else None
    preprocessing = run.config.data.get("preprocessing", "none")
    figures.plot_image_pairs(unit, enhanced, labels, names, out / "enhanced.png", run.config.model.enhancer,
                             preprocessing)
    heatmaps, explained = gradcam(run.model, variables, unit, return_class=True)
    figures.plot_gradcam(unit, heatmaps, labels, explained, names, out / "gradcam.png",
                         f"Grad-CAM of the predicted class, {run.config.model.classifier}'s last conv stage")
    if has_enhancer:
        saturation = _write_enhancer_saturation(unit, enhanced, out / "enhancer_output.json")
        enhanced_caption = (
            f"{source} images (left) and the enhancer's output that the classifier sees (right). "
            f"{100 * saturation['output']:.1f}% of the output values shown are within {SATURATION_MARGIN} of 0 "
            f"or 1 (saturated), against {100 * saturation['input']:.1f}% of the input values "
            "(enhancer_output.json).")
    elif preprocessing != "none":
        enhanced_caption = (f"This run has no learned enhancer; its images pass a fixed {preprocessing.upper()} "
                            f"step (data.preprocessing) when they are read: the figure shows {source.lower()} "
                            "images after it, as the classifier sees them.")
    else:
        enhanced_caption = f"This run has no enhancer: the figure shows the raw {source.lower()} images the " \
                           "classifier sees."
    return figure_list + [
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


def calibrate_run(workdir: pathlib.Path, out: pathlib.Path, heldout: calibration_lib.HeldOutPredictions,
                  fallback: bool) -> list[str]:
    """Fits temperature scaling on `heldout`, stores calibration.json and heldout_predictions.npz in
    `workdir`, draws the reliability diagrams to out/reliability.png; returns the report's section
    (fallback=True: the run has no validation split and the test split was used)."""
    fitted = calibration_lib.calibrate(heldout)
    calibration_lib.write_calibration(workdir, fitted)
    calibration_lib.write_heldout(workdir, heldout)
    diagrams = {"before (T = 1)": calibration_lib.reliability_diagram(
                    calibration_lib.temperature_scaled(heldout.logits), heldout.labels, fitted.bins),
                f"after (T = {fitted.temperature:.3g})": calibration_lib.reliability_diagram(
                    calibration_lib.temperature_scaled(heldout.logits, fitted.temperature), heldout.labels,
                    fitted.bins)}
    calibration_lib.plot_reliability_diagrams(diagrams, out / RELIABILITY_FIGURE)
    return report.calibration_section(fitted, heldout.describe(), fallback, RELIABILITY_FIGURE)


def evaluate_run(workdir: str | pathlib.Path, checkpoint: str = "best", split: str = "test",
                 batch_size: int | None = None, examples_per_class: int = 3, perturb: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Evaluates the run in `workdir` and writes <workdir>/eval/* and its calibration (see the module
    docstring); returns the metrics.json dictionary of `split`.

    Raises ConfigError/DataError (one-line messages) for a missing run, checkpoint or split.
    """
    workdir = pathlib.Path(workdir)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"unknown split {split!r} (expected train, val or test)")
    if examples_per_class < 1:
        raise ConfigError(f"examples per class must be >= 1, got {examples_per_class}")
    run = load_run(workdir, checkpoint)
    batch_size = batch_size or int(run.config.eval_batch_size)
    sizes = data_lib.load_info(run.prepared_dir).num_examples
    has_val = sizes.get("val", 0) > 0
    if split == "val" and not has_val:
        raise ConfigError(f"the run's data set ({run.prepared_dir}) has no validation split")
    out = workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    outputs = {name: _predict_split(run, name, sizes[name], batch_size, examples_per_class, progress)
               for name in dict.fromkeys([split, "test", *(["val"] if has_val else [])])}
    evaluated = outputs[split]
    metrics = classification_metrics(evaluated.labels, evaluated.logits.argmax(axis=-1), run.class_names)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    manifest = data_lib.read_manifest(run.prepared_dir, split)
    write_predictions_csv(out / "predictions.csv", [manifest[int(index)]["path"] for index in evaluated.indices],
                          evaluated.probabilities, run.class_names, true_labels=evaluated.labels)
    for name in ("val", "test"):
        if name in outputs:
            write_split_predictions(predictions_file(out, name), outputs[name].indices, outputs[name].labels,
                                    outputs[name].probabilities, run.class_names)
    heldout_split = "val" if has_val else "test"
    heldout = calibration_lib.HeldOutPredictions(heldout_split, checkpoint, outputs[heldout_split].logits,
                                                 outputs[heldout_split].labels)
    calibration_section = calibrate_run(workdir, out, heldout, fallback=not has_val)
    rows = read_metrics_rows(workdir)
    figure_list = _figures(run, run.variables, out, split.capitalize(), metrics, rows, evaluated.examples)
    robustness = None
    if perturb:
        robustness = measure_robustness(run, split, sizes[split], batch_size, progress)
        (out / "robustness.json").write_text(json.dumps(robustness, indent=2) + "\n")
        figures.plot_robustness(robustness, out / "robustness.png")
    name = workdir.resolve().name
    text = report.run_report(name, metrics, _describe_run(run, workdir, checkpoint, rows), figure_list,
                             split=split, robustness=robustness)
    (out / "report.md").write_text(text + "\n".join(calibration_section) + "\n")
    return metrics


def _external_classes(run: Run, data_dir: pathlib.Path, class_map: Any) -> dict[str, tuple[str, ...]]:
    """The run's class name -> the folders of `data_dir` mapped to it by `class_map` (names matched
    case-insensitively); DataError when a mapped class is not one of the run's."""
    by_lower = {name.lower(): name for name in run.class_names}
    classes = {}
    for class_name, folders in resolve_class_folders(data_dir, class_map).items():
        if class_name.lower() not in by_lower:
            raise DataError(f"folder(s) {', '.join(folders)} of {data_dir} map to class '{class_name}', which the "
                            f"run does not have (its classes: {', '.join(run.class_names)})")
        classes[by_lower[class_name.lower()]] = folders
    return classes


def _check_name(name: str, out: pathlib.Path) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ConfigError(f"--name must be a plain folder name, got {name!r}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder; choose another --name")


def evaluate_external(workdir: str | pathlib.Path, data_dir: str | pathlib.Path, class_map: Any = None,
                      name: str | None = None, checkpoint: str = "best", batch_size: int | None = None,
                      examples_per_class: int = 3, adapt_bn: bool = False, progress: bool = True
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluates the run in `workdir` on the class-per-folder image set `data_dir`, its folders mapped by
    `class_map` ("wbc3", "folders", a dict; default: the run's own data.class_map) to the run's classes,
    every image read as in training (`inference.image_reader`); writes <workdir>/eval/<name>/ (default
    name: the folder's name). Returns (metrics.json, external.json) dictionaries.

    Unreadable files are skipped and listed. Raises DataError (one line, nothing written) when a folder
    maps to no class of the run or no image is readable.
    """
    workdir, data_dir = pathlib.Path(workdir), pathlib.Path(data_dir)
    run = load_run(workdir, checkpoint)
    class_map = run.config.data.class_map if class_map is None else class_map
    if hasattr(class_map, "to_dict"):
        class_map = class_map.to_dict()
    name = name or data_dir.resolve().name
    out = workdir / "eval" / name
    _check_name(name, out)
    classes = _external_classes(run, data_dir, class_map)
    files = scan_class_files(data_dir, classes)
    if not files:
        raise DataError(f"no image files in the class folders of {data_dir}")
    batch_size = batch_size or int(run.config.eval_batch_size)
    read = image_reader(run.config.data)
    paths = [source.path for source in files]
    variables = adapted_variables(run.model, run.variables, paths, read, batch_size, progress) if adapt_bn \
        else run.variables
    result = predict_files(run.model, variables, run.class_names, paths, read, batch_size, progress)
    if not result.paths:
        raise DataError(f"no readable image in {data_dir} ({len(result.unreadable)} unreadable files, e.g. "
                        f"{result.unreadable[0][0]}: {result.unreadable[0][1]})")
    class_of = {source.path: run.class_names.index(source.class_name) for source in files}
    labels = np.asarray([class_of[path] for path in result.paths], np.int64)
    metrics = classification_metrics(labels, result.predicted, run.class_names)
    details = {"data_dir": str(data_dir.resolve()), "class_map": class_map,
               "folders": {class_name: list(folders) for class_name, folders in classes.items()},
               "checkpoint": checkpoint, "adapt_bn": adapt_bn, "images": len(result.paths),
               "balanced_accuracy": metrics["macro"]["recall"],
               "unreadable": [list(entry) for entry in result.unreadable]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / EXTERNAL_FILE).write_text(json.dumps(details, indent=2) + "\n")
    write_predictions_csv(out / "predictions.csv", result.paths, result.probabilities(), run.class_names,
                          true_labels=labels, unreadable=result.unreadable)
    examples: dict[int, list[np.ndarray]] = {c: [] for c in range(len(run.class_names))}
    for path, label in zip(result.paths, labels):
        if len(examples[int(label)]) < examples_per_class:
            examples[int(label)].append(np.asarray(read(path), np.uint8))
    examples = {c: images for c, images in examples.items() if images}
    figure_list = _figures(run, variables, out, "External", metrics, None, examples)
    description = _describe_run(run, workdir, checkpoint, read_metrics_rows(workdir)) + [
        f"external images: `{data_dir}` ({len(result.paths)} readable, {len(result.unreadable)} unreadable), "
        f"folders mapped by class map {class_map!r}: " + "; ".join(
            f"{class_name} <- {', '.join(folders)}" for class_name, folders in classes.items()),
        "BatchNorm statistics re-estimated on these images (--adapt-bn; the checkpoint is unchanged)"
        if adapt_bn else "BatchNorm statistics of the checkpoint (no adaptation)"]
    text = report.run_report(f"{workdir.resolve().name} on {name}", metrics, description, figure_list,
                             split=name)
    (out / "report.md").write_text(text + "\n".join(report.unreadable_section(result.unreadable)) + "\n")
    return metrics, details
