"""Markdown reports in the paper's layouts: Table 3 (per-class recall/precision/F1, macro averages, test
accuracy; runs as columns) and Table 2 (test accuracy, enhancer rows x classifier columns).

All numbers are percentages with two decimals, as in the paper. Averages are unweighted means over
the classes (macro), as the paper's "average" rows.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from urnet_jax.errors import ConfigError
from urnet_jax.models.registry import display_name

MISSING = "n/a"


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100.0 * value:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def table3(runs: Mapping[str, Mapping[str, Any]], accuracy_label: str = "test accuracy") -> str:
    """Table 3 layout for runs {column name: metrics.json dict}; classes in the first run's order
    (plus any class only later runs have); a class a run lacks shows n/a."""
    classes: list[str] = []
    for metrics in runs.values():
        classes.extend(name for name in metrics["classes"] if name not in classes)
    rows = []
    for metric, label in (("recall", "recall"), ("precision", "precision"), ("f1", "F1")):
        for name in classes:
            rows.append([f"{label} {name}"] + [
                _percent(metrics["per_class"][name][metric] if name in metrics["per_class"] else None)
                for metrics in runs.values()])
        rows.append([f"{label} average"] + [_percent(metrics["macro"][metric]) for metrics in runs.values()])
    rows.append([accuracy_label] + [_percent(metrics["accuracy"]) for metrics in runs.values()])
    return markdown_table(["", *runs], rows)


def model_names(config: Mapping[str, Any]) -> tuple[str, str]:
    """(enhancer, classifier) registry names of a run's config.json ('none' for no enhancer)."""
    model = config.get("model", {})
    return str(model.get("enhancer") or "none"), str(model.get("classifier", "?"))


def table2(runs: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]]) -> str:
    """Table 2 layout (accuracy %, enhancer rows x classifier columns) for runs {name: (config, metrics)}.

    A cell that several runs share lists every value with its run name; empty cells show n/a.
    """
    enhancers: list[str] = []
    classifiers: list[str] = []
    cells: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for name, (config, metrics) in runs.items():
        enhancer, classifier = model_names(config)
        enhancers += [enhancer] if enhancer not in enhancers else []
        classifiers += [classifier] if classifier not in classifiers else []
        cells.setdefault((enhancer, classifier), []).append((name, metrics["accuracy"]))

    def cell(key: tuple[str, str]) -> str:
        entries = cells.get(key, [])
        if len(entries) == 1:
            return _percent(entries[0][1])
        return "; ".join(f"{_percent(acc)} ({name})" for name, acc in entries) or MISSING

    header = ["enhancer \\ classifier", *map(display_name, classifiers)]
    rows = [[display_name(e)] + [cell((e, c)) for c in classifiers] for e in enhancers]
    return markdown_table(header, rows)


def robustness_table(results: Mapping[str, Any]) -> str:
    """Accuracy (%) at every perturbation and severity, one column per mode (robustness.json input)."""
    modes = list(results["modes"])
    rows = []
    for kind, curve in results["perturbations"].items():
        for level, severity in enumerate(curve["severity"]):
            accuracies = [_percent(curve["accuracy"][mode][level]) for mode in modes]
            rows.append([kind, f"{level}", f"{severity:g}", *accuracies])
    units = "; ".join(f"{kind}: {curve['units']}" for kind, curve in results["perturbations"].items())
    table = markdown_table(["perturbation", "level", "severity", *[m.replace("_", " ") for m in modes]], rows)
    return f"{table}\n\nSeverity units: {units}."


def run_report(name: str, metrics: Mapping[str, Any], details: Sequence[str],
               figures: Sequence[tuple[str, str, str]], split: str = "test",
               robustness: Mapping[str, Any] | None = None, robustness_figure: str = "robustness.png") -> str:
    """report.md of one run.

    Args:
      name: the run's name (the table's column header).
      metrics: its metrics.json dictionary.
      details: bullet lines describing the run (model, data, checkpoint, ...).
      figures: (heading, relative PNG path, caption) of each figure to embed.
      split: the evaluated split (the accuracy row is labelled "<split> accuracy").
      robustness: the robustness.json dictionary, when measured.
      robustness_figure: relative path of its plot.
    """
    total = sum(sum(row) for row in metrics["confusion_matrix"])
    parts = [f"# Evaluation of `{name}`", "", *[f"- {line}" for line in details],
             f"- {split} split: {total} images; {split} accuracy {_percent(metrics['accuracy'])}%", "",
             "## Per-class results (the paper's Table 3 layout, %)", "",
             table3({name: metrics}, accuracy_label=f"{split} accuracy"), "",
             "Averages are unweighted means over the classes (macro). A class that is never predicted "
             "has precision 0.", ""]
    for heading, path, caption in figures:
        parts += [f"## {heading}", "", f"![{heading}]({path})", "", caption, ""]
    if robustness is not None:
        bypass = ("\"without enhancer\" is this same trained run with `enhance()` bypassed (the classifier "
                  "sees the perturbed raw image), not a separately trained model. "
                  if "with_enhancer" in robustness["modes"] else "This run has no enhancer. ")
        parts += ["## Robustness: accuracy (%) under perturbations", "",
                  f"![Robustness]({robustness_figure})", "", robustness_table(robustness), "",
                  f"Level 0 is the clean image. {bypass}Measured on the {split} split "
                  f"({robustness['num_examples']} images).", ""]
    return "\n".join(parts)


def read_evaluated_run(directory: str | pathlib.Path) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(config.json, eval/metrics.json) of an evaluated workdir; config is {} when absent.

    Raises ConfigError (one line) when the run has not been evaluated or its files are unreadable.
    """
    directory = pathlib.Path(directory)
    metrics_path = directory / "eval" / "metrics.json"
    if not metrics_path.is_file():
        raise ConfigError(f"{metrics_path} not found: run `python evaluate.py --workdir {directory}` first")
    try:
        metrics = json.loads(metrics_path.read_text())
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {directory}: {error}") from None
    return config, metrics


def run_names(directories: Sequence[str | pathlib.Path]) -> list[str]:
    """Column names: each directory's base name, or its full path where base names collide."""
    paths = [pathlib.Path(d) for d in directories]
    bases = [p.resolve().name for p in paths]
    return [base if bases.count(base) == 1 else str(path) for base, path in zip(bases, paths)]


def compare_report(directories: Sequence[str | pathlib.Path]) -> str:
    """Markdown comparing evaluated runs: Table 3 layout (runs as columns), then Table 2 layout."""
    runs = {name: read_evaluated_run(d) for name, d in zip(run_names(directories), directories)}
    parts = ["# Comparison of runs", "", "## Per-class results (the paper's Table 3 layout, %)", "",
             table3({name: metrics for name, (_, metrics) in runs.items()}), "",
             "Averages are unweighted means over the classes (macro)."]
    with_config = {name: run for name, run in runs.items() if run[0].get("model")}
    if with_config:
        parts += ["", "## Accuracy by enhancer and classifier (the paper's Table 2 layout, %)", "",
                  table2(with_config)]
    missing = [name for name in runs if name not in with_config]
    if missing:
        parts += ["", f"Not in Table 2 (no config.json): {', '.join(missing)}."]
    return "\n".join(parts) + "\n"
