"""Markdown reports in the paper's layouts: Table 3 (per-class recall/precision/F1, macro averages, test
accuracy; runs as columns), Table 2 (test accuracy, enhancer rows x classifier columns) and Table 4 (the
comparison methods, with the paper's reported numbers beside each run for reference), and the external
validation table (each run's own test split and every external set evaluated into <run>/eval/<name>/).

All numbers are percentages with two decimals, as in the paper. Averages are unweighted means over
the classes (macro), as the paper's "average" rows.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from urnet_jax.errors import ConfigError
from urnet_jax.models import registry
from urnet_jax.models.registry import display_name

MISSING = "n/a"
EXTERNAL_FILE = "external.json"  # marks <run>/eval/<name>/ as an external evaluation

# The paper's reported numbers (%, its private stain-free data): Table 4's test accuracies, and for UR-Net
# (Table 3's Net4) the per-class recall / precision / F1.
PAPER_TABLE4_ACCURACY = {"Jeon et al. 2022": 81.44, "Shahzad et al. 2021": 80.96, "Huang et al. 2018": 81.79,
                         "Sharma et al. 2018": 82.27, "UR-Net": 83.34}
PAPER_URNET_PER_CLASS = {
    "recall": {"granulocyte": 91.52, "monocyte": 65.90, "lymphocyte": 92.63, "average": 83.35},
    "precision": {"granulocyte": 92.40, "monocyte": 92.39, "lymphocyte": 71.46, "average": 85.42},
    "f1": {"granulocyte": 91.96, "monocyte": 76.93, "lymphocyte": 80.68, "average": 83.19},
}


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100.0 * value:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines)


def _table3_rows(runs: Mapping[str, Mapping[str, Any]], accuracy_label: str = "test accuracy"
                 ) -> tuple[list[str], list[list[str]]]:
    """(classes, rows) of `table3`: each row is its label then one formatted cell per run."""
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
    return classes, rows


def table3(runs: Mapping[str, Mapping[str, Any]], accuracy_label: str = "test accuracy") -> str:
    """Table 3 layout for runs {column name: metrics.json dict}; classes in the first run's order
    (plus any class only later runs have); a class a run lacks shows n/a."""
    return markdown_table(["", *runs], _table3_rows(runs, accuracy_label)[1])


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


def paper_method(config: Mapping[str, Any]) -> str | None:
    """The paper's Table 4 row a run's config.json reimplements, or None: by enhancer (UR-Net, RSGUNet =
    Huang et al., dynamic enhancement = Sharma et al.), else a CLAHE input (Shahzad et al.), else a
    ResNet-50 without enhancement (Jeon et al.)."""
    enhancer, classifier = model_names(config)
    if enhancer != registry.NO_ENHANCER:
        return registry.spec(enhancer).paper_method or None
    if config.get("data", {}).get("preprocessing") == "clahe":
        return "Shahzad et al. 2021"
    return "Jeon et al. 2022" if classifier == "resnet50" else None


def _paper_column(method: str, classes: Sequence[str]) -> list[str]:
    """A Table 4 column of the paper's numbers for `method` (rows as in `table3`); n/a where not reported."""
    column = []
    for metric in ("recall", "precision", "f1"):
        reported = PAPER_URNET_PER_CLASS[metric] if method == "UR-Net" else {}
        column += [f"{reported[name]:.2f}" if name in reported else MISSING for name in (*classes, "average")]
    return column + [f"{PAPER_TABLE4_ACCURACY[method]:.2f}"]


def table4(runs: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]]) -> str:
    """Table 4 layout for runs {name: (config, metrics)}: the Table 3 rows (recall / precision / F1 per
    class and average, accuracy), each run's column headed by its model's display names and followed by
    the paper's numbers for the method its config reimplements (once per method)."""
    classes, rows = _table3_rows({name: metrics for name, (_, metrics) in runs.items()})
    header = [""]
    columns: list[list[str]] = [[row[0] for row in rows]]
    shown: set[str] = set()
    for position, (name, (config, _)) in enumerate(runs.items(), start=1):
        enhancer, classifier = model_names(config)
        header.append(f"{name} ({display_name(enhancer)} + {display_name(classifier)})")
        columns.append([row[position] for row in rows])
        method = paper_method(config)
        if method is not None and method not in shown:
            shown.add(method)
            header.append(f"paper: {method}")
            columns.append(_paper_column(method, classes))
    return markdown_table(header, [list(cells) for cells in zip(*columns)])


def external_sets(directory: str | pathlib.Path) -> dict[str, Mapping[str, Any]]:
    """{name: metrics.json} of the external evaluations in <directory>/eval/<name>/, sorted by name."""
    sets = {}
    for path in sorted((pathlib.Path(directory) / "eval").glob(f"*/{EXTERNAL_FILE}")):
        try:
            sets[path.parent.name] = json.loads((path.parent / "metrics.json").read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"cannot read the external evaluation {path.parent}: {error}") from None
    return sets


def external_table(runs: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Accuracy, balanced accuracy (macro recall) and per-class recall (%) of {run: {set: metrics.json}},
    one row per run and set."""
    classes: list[str] = []
    for sets in runs.values():
        for metrics in sets.values():
            classes.extend(name for name in metrics["classes"] if name not in classes)
    rows = []
    for run, sets in runs.items():
        for name, metrics in sets.items():
            images = sum(map(sum, metrics["confusion_matrix"]))
            rows.append([run, name, str(images), _percent(metrics["accuracy"]), _percent(metrics["macro"]["recall"]),
                         *[_percent(metrics["per_class"][c]["recall"] if c in metrics["per_class"] else None)
                           for c in classes]])
    return markdown_table(["run", "images", "n", "accuracy", "balanced accuracy", *[f"recall {c}" for c in classes]],
                          rows)


def calibration_section(calibration: Any, heldout: str, fallback: bool, figure: str) -> list[str]:
    """report.md lines on a fitted temperature (a `urnet_jax.calibration.Calibration`) and its reliability
    diagram; fallback=True says that the run has no validation split, so the test split was used."""
    source = (f"the {heldout}: this run has no validation split, so the temperature was fitted on the test "
              "split, and test-split calibration numbers are optimistic" if fallback else f"the {heldout}")
    return ["## Calibration (temperature scaling)", "",
            f"Temperature T = {calibration.temperature:.4g}, fitted on {source}. "
            f"Expected calibration error ({calibration.bins} bins): {100 * calibration.ece_before:.2f}% before, "
            f"{100 * calibration.ece_after:.2f}% after; negative log-likelihood {calibration.nll_before:.4f} -> "
            f"{calibration.nll_after:.4f} nats per image. Stored in calibration.json (predict.py uses it).", "",
            f"![Reliability diagram]({figure})", "",
            "Accuracy per confidence bin against the diagonal of perfect calibration, before and after.", ""]


def unreadable_section(unreadable: Sequence[tuple[str, str]]) -> list[str]:
    """report.md lines listing the files that could not be read (skipped)."""
    lines = ["## Unreadable files (skipped)", "", f"{len(unreadable)} file(s)."]
    return lines + ([""] if not unreadable else ["", *[f"- `{path}`: {reason}" for path, reason in unreadable], ""])


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
    """Markdown comparing evaluated runs: Table 3 layout (runs as columns), Table 2 layout, Table 4 layout
    with the paper's numbers, and, when any run has external evaluations, the external validation table."""
    runs = {name: read_evaluated_run(d) for name, d in zip(run_names(directories), directories)}
    parts = ["# Comparison of runs", "", "## Per-class results (the paper's Table 3 layout, %)", "",
             table3({name: metrics for name, (_, metrics) in runs.items()}), "",
             "Averages are unweighted means over the classes (macro)."]
    with_config = {name: run for name, run in runs.items() if run[0].get("model")}
    if with_config:
        parts += ["", "## Accuracy by enhancer and classifier (the paper's Table 2 layout, %)", "",
                  table2(with_config), "",
                  "## Comparison methods (the paper's Table 4 layout, %)", "", table4(with_config), "",
                  "The `paper:` columns are the numbers the paper reports on its private stain-free data "
                  "(test accuracy of each method; per-class numbers for UR-Net only, Table 3's Net4), shown "
                  "for reference: they are not measurements on this run's data."]
    missing = [name for name in runs if name not in with_config]
    if missing:
        parts += ["", f"Not in Table 2 or Table 4 (no config.json): {', '.join(missing)}."]
    external = {name: {"own test split": metrics, **external_sets(directory)}
                for (name, (_, metrics)), directory in zip(runs.items(), directories)}
    if any(len(sets) > 1 for sets in external.values()):
        parts += ["", "## External validation (%)", "", external_table(external), "",
                  "Balanced accuracy is the unweighted mean of the per-class recalls. External sets are "
                  "evaluated with `evaluate.py --workdir RUN --data-dir DIR --name NAME`."]
    return "\n".join(parts) + "\n"
