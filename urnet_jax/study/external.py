"""A study's runs on its external image sets (the study config's `external`, e.g. another lab's cells) beside
their own test split, as Markdown for the report's generated block.

For each external set that RESULTS_DIR/study.json declares and each data variant: one row per model variant
the set applies to, with the number of seeds and, for the own test split (RUN/eval/metrics.json) and the
external set (RUN/eval/<set>/metrics.json, the same checkpoint) side by side, the mean ± sample standard
deviation over seeds of accuracy, balanced accuracy (the mean recall over the classes the set has images
of) and each class's recall, plus the gap own-test − external balanced accuracy, run by run (paired by
seed). Numbers are in percent with two decimals. Runs without the external metrics.json are left out of
the table and counted.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from urnet_jax.data.plan import VARIANTS
from urnet_jax.errors import ConfigError
from urnet_jax.evaluation.report import markdown_table
from urnet_jax.study.results import (FinishedRun, column_header, ordered, read_external_metrics,
                                     read_study_config)
from urnet_jax.study.seed_stats import common_classes, mean_std_points
from urnet_jax.study.sweep import ABLATION_MODELS, external_sets

OWN_TEST = "own test"
MetricsPick = Callable[[Mapping[str, Any]], "float | None"]


def class_recall(metrics: Mapping[str, Any], class_name: str) -> float | None:
    """A class's recall in a metrics.json (a fraction); None when the set has no image of that class."""
    per_class = metrics["per_class"][class_name]
    return None if per_class.get("support") == 0 else per_class["recall"]


def balanced_accuracy(metrics: Mapping[str, Any]) -> float:
    """The mean recall over the classes a metrics.json has images of (scikit-learn's balanced accuracy; its
    macro recall when every class has images), a fraction."""
    recalls = [recall for recall in (class_recall(metrics, name) for name in metrics["classes"]) if recall is not None]
    return sum(recalls) / len(recalls)


def _mean_std_cell(metrics: Sequence[Mapping[str, Any]], pick: MetricsPick) -> str:
    """'mean ± std' (%) of pick(metrics.json) over the runs it gives a number for."""
    return mean_std_points([value for value in map(pick, metrics) if value is not None])


def comparison_table(evaluated: Sequence[tuple[FinishedRun, Mapping[str, Any]]], set_name: str) -> str:
    """The Markdown table of (run, its metrics.json on `set_name`) pairs: one row per model variant, with its
    seeds, then each number (%, mean ± sample std over seeds) on the own test split and on `set_name`."""
    classes = common_classes([metrics for run, external in evaluated for metrics in (run.metrics, external)])
    recalls: list[tuple[str, MetricsPick]] = [
        (f"recall {name}", lambda metrics, name=name: class_recall(metrics, name)) for name in classes]

    def headers(label: str) -> list[str]:
        return [f"{label}, {OWN_TEST}", f"{label}, {set_name}"]

    rows = []
    for model in ordered([run.model for run, _ in evaluated], ABLATION_MODELS):
        of_model = sorted(((run, external) for run, external in evaluated if run.model == model),
                          key=lambda pair: pair[0].seed)
        own, there = [run.metrics for run, _ in of_model], [external for _, external in of_model]

        def side_by_side(pick: MetricsPick) -> list[str]:
            return [_mean_std_cell(own, pick), _mean_std_cell(there, pick)]

        gaps = [balanced_accuracy(mine) - balanced_accuracy(theirs) for mine, theirs in zip(own, there)]
        rows.append([column_header(model), str(len(of_model)), *side_by_side(lambda metrics: metrics["accuracy"]),
                     *side_by_side(balanced_accuracy), mean_std_points(gaps, signed=True),
                     *(cell for _, pick in recalls for cell in side_by_side(pick))])
    return markdown_table(["model", "seeds", *headers("accuracy"), *headers("balanced accuracy"),
                           f"gap: balanced accuracy, {OWN_TEST} − {set_name}",
                           *(header for label, _ in recalls for header in headers(label))], rows)


def _set_description(external: ml_collections.ConfigDict) -> str:
    """How a study evaluates on one external set: its folder, BatchNorm statistics, model variants."""
    statistics = ("re-estimated on its images before the evaluation (the checkpoint unchanged)"
                  if external.get("adapt_bn", False) else "of the checkpoint")
    models = ", ".join(f"`{model}`" for model in external.get("models", ())) or "all"
    return (f"Images: `{external.data_dir}`, each run's selected checkpoint, BatchNorm statistics {statistics}; "
            f"model variants: {models}.")


def external_sections(results_dir: str | pathlib.Path, runs: Sequence[FinishedRun]) -> list[str]:
    """The Markdown paragraphs (each followed by an empty string) on every external set declared by
    results_dir/study.json, per data variant of the finished `runs`; [] when it declares none."""
    results_dir = pathlib.Path(results_dir)
    study = read_study_config(results_dir)
    declared = study.get("external", {}) if study is not None else {}
    if not declared:
        return []
    name = results_dir.resolve().name
    try:
        applies = {model: set(external_sets(study, model)) for model in {run.model for run in runs}}
        descriptions = {set_name: _set_description(external) for set_name, external in declared.items()}
    except (AttributeError, KeyError, TypeError):
        raise ConfigError(f"{results_dir / 'study.json'}: 'external' must map set names to {{data_dir, class_map, "
                          f"adapt_bn, models}}") from None
    parts: list[str] = []
    for set_name in declared:
        if not runs:
            parts += [f"#### `results/{name}` on the external set `{set_name}`", "", descriptions[set_name], "",
                      f"No finished runs in `results/{name}` yet.", ""]
        for variant in ordered([run.data_variant for run in runs], VARIANTS):
            of_variant = [run for run in runs if run.data_variant == variant and set_name in applies[run.model]]
            external_metrics = {run.name: read_external_metrics(results_dir / run.name, set_name) for run in of_variant}
            evaluated = [(run, external_metrics[run.name]) for run in of_variant
                         if external_metrics[run.name] is not None]
            missing = [run.name for run in of_variant if external_metrics[run.name] is None]
            parts += [f"#### `results/{name}` on the external set `{set_name}`, data variant `{variant}`", "",
                      descriptions[set_name], ""]
            if evaluated:
                seeds = sorted({run.seed for run, _ in evaluated})
                parts += [comparison_table(evaluated, set_name), "",
                          f"Mean ± sample standard deviation over the seeds ({', '.join(map(str, seeds))}) of the "
                          f"runs evaluated on both, in %; a cell without ± has one seed. {OWN_TEST.capitalize()}: "
                          f"each run's own test split (eval/metrics.json); `{set_name}`: eval/{set_name}/metrics.json. "
                          f"Balanced accuracy: the mean recall over the classes with images in the set; a class "
                          f"without images in a set has no recall there (n/a). Gap: own-test minus `{set_name}` "
                          f"balanced accuracy, run by run (paired by seed), in percentage points.", ""]
            else:
                parts += [f"No finished run has a `{set_name}` evaluation yet.", ""]
            if missing:
                parts += [f"Finished runs without a `{set_name}` evaluation (no eval/{set_name}/metrics.json), left "
                          f"out: {len(missing)} ({', '.join(missing)}).", ""]
    return parts
