"""The study's results in the paper's Table 3 layout (mean ± std over seeds), paired comparisons of the
ablation's models, test errors by class, the comparison with a baseline study, the outcome of phase 1
(enhancer pre-training) of each pre-trained run (`phase1`), the verdict of the study's decision rule
(`decision`), the runs on the study's external image sets
beside their own test split (`external`) and the model variant a cross-lab study's rule recommends
(`recommendation`), as Markdown; a tuning study (`report: 'validation'`) gets the
validation-only table of `tuning` instead.

`results_block` writes the tables of each data variant, then those of each external set, between the markers
`<!-- results:begin NAME -->` and `<!-- results:end NAME -->` (NAME: the results folder's name);
`replace_block` puts them into a document, leaving the text around them alone, and `check_document` tells
whether a document's tables are up to date. Statistics come from `seed_stats` (pandas: means, sample standard
deviations over seeds, paired by seed; scipy: the t-interval); numbers are in percent with two decimals.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from urnet_jax import config as config_lib
from urnet_jax.data.plan import VARIANTS
from urnet_jax.errors import ConfigError
from urnet_jax.evaluation.report import MISSING, markdown_table, table3
from urnet_jax.models.registry import display_name
from urnet_jax.study import decision, external, paired, phase1, recommendation, rules, tuning
from urnet_jax.study.results import (FinishedRun, collect_finished_runs, column_header, epoch_to_epoch_change,
                                     is_number, ordered, read_baseline, read_comparisons, read_study_config,
                                     unselected_accuracy)
from urnet_jax.study.seed_stats import (Pick, aggregate_metrics, common_classes, difference_cell, mean_std_points,
                                        paired_differences, t_interval)
from urnet_jax.study.sweep import ABLATION_MODELS, IGNORED_KEYS, runs_on

MARKER_BEGIN = "<!-- results:begin {name} -->"
MARKER_END = "<!-- results:end {name} -->"
DATA_DESCRIPTIONS = {"raw": "the stained PBC images as they are",
                     "stainfree_proxy": "the same images through the stain-free proxy, a degradation, "
                                        "not stain-free data",
                     "severe_proxy": "the same images through the severe proxy (the stain-free proxy with lower "
                                     "contrast, more blur and noise, at the run's data.severe_* strength)"}
# The paper's ablation questions as paired comparisons: (first model, second model, what first - second measures).
PAIRED_COMPARISONS = (("net2", "net1", "a plain ResUNet enhancer"),
                      ("net3", "net1", "the UR-Net enhancer, not pre-trained"),
                      ("net4", "net1", "the full UR-Net"),
                      ("net3", "net2", "the UR-Net modifications"),
                      ("net4", "net3", "phase-1 enhancer pre-training"))
# config.json keys summarised under each table (their values are shared by every run of a study).
PROTOCOL_KEYS = ("model.classifier", "model.classifier_width", "model.enhancer_width", "model.pretrained",
                 "data.image_size", "data.train_size", "data.test_fraction", "data.seed", "train.epochs",
                 "optimizer.name", "optimizer.lr", "optimizer.schedule", "optimizer.warmup_steps",
                 "optimizer.momentum", "optimizer.weight_decay", "batch_size", "precision")

# ----------------------------------------------------------------------------------------------------
# Tables.


def _cell_values(line: str) -> list[str]:
    """The cells of one row of a Markdown table."""
    return [cell.strip() for cell in line.strip()[1:-1].split("|")]


def _shared_value(runs: Sequence[FinishedRun], key: str) -> Any:
    """The config.json value of a dotted key in `runs`; a list of the distinct values when they differ."""
    values = []
    for run in runs:
        value = config_lib.flatten(run.config).get(key)
        if value not in values:
            values.append(value)
    return values[0] if len(values) == 1 else values


def _display(value: Any) -> str:
    """A config value for a table or a sentence ('none' for '' and None; 'mixed: ...' for a list)."""
    if isinstance(value, list):
        return "mixed: " + ", ".join(_display(v) for v in value)
    if value in ("", None):
        return "none"
    return display_name(value) if isinstance(value, str) else str(value)


def mean_std_table(cells: Mapping[str, Sequence[FinishedRun]]) -> str:
    """The Table-3 layout with 'mean ± std' (%) over each column's runs, for {column header: runs}.

    Two rows on top name the column's enhancer and its phase-1 epochs; below the paper's rows come the
    test accuracies not selected on the test set, and the last row counts the runs (seeds) of each cell.
    A std needs two runs (a cell of one run shows its value alone); an empty column shows n/a.
    """
    empty: dict[str, Any] = {"classes": [], "per_class": {}, "accuracy": None,
                             "macro": {"recall": None, "precision": None, "f1": None}}
    statistics = {header: aggregate_metrics([run.metrics for run in runs]) if runs else (empty, empty)
                  for header, runs in cells.items()}
    mean_lines = table3({header: mean for header, (mean, _) in statistics.items()}).splitlines()
    std_lines = table3({header: std for header, (_, std) in statistics.items()}).splitlines()
    rows = []
    for mean_line, std_line in zip(mean_lines[2:], std_lines[2:], strict=True):
        label, *means = _cell_values(mean_line)
        stds = _cell_values(std_line)[1:]
        rows.append([label, *(mean if std == MISSING else f"{mean} ± {std}" for mean, std in zip(means, stds))])

    def describe(key: str) -> list[str]:
        return [_display(_shared_value(runs, key)) if runs else MISSING for runs in cells.values()]

    def unselected(last_epochs: int) -> list[str]:
        return [mean_std_points([v for v in (unselected_accuracy(run, last_epochs) for run in runs) if v is not None])
                for runs in cells.values()]

    rows = [["enhancer", *describe("model.enhancer")],
            ["enhancer pre-training epochs (phase 1)", *describe("pretrain.epochs")],
            *rows,
            ["test accuracy, last epoch (not selected)", *unselected(1)],
            ["test accuracy, mean of the last 3 epochs", *unselected(3)],
            ["finished seeds", *(str(len(runs)) for runs in cells.values())]]
    return markdown_table(_cell_values(mean_lines[0]), rows)


def paired_table(runs: Sequence[FinishedRun], classes: Sequence[str]) -> str | None:
    """The PAIRED_COMPARISONS of one data variant's runs as a Markdown table (None when no pair has a
    shared seed): test accuracy and each class's recall, first model minus second, paired by seed."""
    by_model = {model: [run for run in runs if run.model == model] for model in {run.model for run in runs}}
    columns: list[tuple[str, Pick]] = [("test accuracy", lambda run: run.metrics["accuracy"]),
                                       ("last-epoch test accuracy", lambda run: unselected_accuracy(run, 1))]
    columns += [(f"recall {name}", lambda run, name=name: run.metrics["per_class"][name]["recall"])
                for name in classes]
    rows = []
    for first, second, measures in PAIRED_COMPARISONS:
        accuracy, *others = [paired_differences(by_model.get(first, []), by_model.get(second, []), pick)
                             for _, pick in columns]
        if accuracy:
            rows.append([f"{column_header(first)} − {column_header(second)}", measures, str(len(accuracy)),
                         difference_cell(accuracy), t_interval(accuracy), *map(difference_cell, others)])
    if not rows:
        return None
    return markdown_table(["comparison", "what it measures", "seeds", "test accuracy", "95% t-interval (accuracy)",
                           *(label for label, _ in columns[1:])], rows)


def baseline_table(runs: Sequence[FinishedRun], baseline_runs: Sequence[FinishedRun]) -> str | None:
    """Each model of one data variant against the same model of a baseline study, paired by seed (None
    when no run has a baseline run of the same name): this study's number minus the baseline's for the
    selected and unselected test accuracies, and each study's epoch-to-epoch change of test accuracy."""
    differences: list[tuple[str, Pick]] = [("test accuracy", lambda run: run.metrics["accuracy"]),
                                           ("last-epoch test accuracy", lambda run: unselected_accuracy(run, 1)),
                                           ("mean of the last 3 epochs", lambda run: unselected_accuracy(run, 3))]
    rows = []
    for model in ordered([run.model for run in runs], ABLATION_MODELS):
        here = [run for run in runs if run.model == model]
        there = {run.seed: run for run in baseline_runs if run.model == model}
        paired = [run for run in here if run.seed in there]
        if not paired:
            continue
        swings = [(epoch_to_epoch_change(run), epoch_to_epoch_change(there[run.seed])) for run in paired]
        swings = [pair for pair in swings if None not in pair]
        rows.append([column_header(model), str(len(paired)),
                     *(difference_cell(paired_differences(here, list(there.values()), pick)) for _, pick in differences),
                     mean_std_points([here_swing for here_swing, _ in swings]),
                     mean_std_points([there_swing for _, there_swing in swings])])
    if not rows:
        return None
    return markdown_table(["model", "seeds", *(f"{label}, difference" for label, _ in differences),
                           "epoch-to-epoch change, this study", "epoch-to-epoch change, baseline"], rows)


def _baseline_settings(runs: Sequence[FinishedRun], baseline_runs: Sequence[FinishedRun]) -> list[str]:
    """The config differences ('key: baseline != this') between paired runs, each once, in the keys either
    run's config.json records (locations and bookkeeping aside, as for skipping finished runs; a key added
    since both runs holds the value derived from their settings, not a setting of its own)."""
    by_name = {run.name: run for run in baseline_runs}
    found: list[str] = []
    for run in runs:
        if run.name in by_name:
            recorded = run.recorded_keys | by_name[run.name].recorded_keys
            ignored = IGNORED_KEYS | (frozenset(config_lib.flatten(run.config)) - recorded)
            for line in config_lib.config_differences(by_name[run.name].config, run.config, ignored=ignored):
                if line not in found:
                    found.append(line)
    return found


def error_table(cells: Mapping[str, Sequence[FinishedRun]], classes: Sequence[str]) -> str:
    """Test errors as 'true -> predicted' rows (every ordered pair of distinct classes), one column per
    {header: runs}: the mean number of images over the column's runs (from the confusion matrices)."""
    rows = []
    for true in classes:
        for predicted in classes:
            if true == predicted:
                continue
            row = [f"{true} → {predicted}"]
            for runs in cells.values():
                counts = [run.metrics["confusion_matrix"][run.metrics["classes"].index(true)]
                          [run.metrics["classes"].index(predicted)] for run in runs
                          if true in run.metrics["classes"] and predicted in run.metrics["classes"]]
                row.append(f"{np.mean(counts):.1f}" if counts else MISSING)
            rows.append(row)
    return markdown_table(["true → predicted", *cells], rows)


NOT_PLANNED = "—"  # a progress-table cell of a model the study does not run on that data variant


def progress_table(study: Mapping[str, Any], runs: Sequence[FinishedRun]) -> str:
    """Which of the study config's runs (models x data variants x seeds) have finished, as Markdown: one row
    per data variant, one column per model ('finished/planned', then the finished seeds when some are
    missing; NOT_PLANNED where the study does not run that model on that variant), a last column per variant, and
    a closing sentence with the total."""
    seeds = [int(seed) for seed in study["seeds"]]
    models = ordered(list(study["models"]), ABLATION_MODELS)
    finished = {(run.model, run.data_variant, run.seed) for run in runs}

    def cell(done: Sequence[int] | None) -> str:
        if done is None:
            return NOT_PLANNED
        count = f"{len(done)}/{len(seeds)}"
        return f"{count} ({', '.join(map(str, done))})" if 0 < len(done) < len(seeds) else count

    rows, total, planned = [], 0, 0
    for variant in study["data_variants"]:
        done = [[seed for seed in seeds if (model, variant, seed) in finished]
                if runs_on(study, model, variant) else None for model in models]
        finished_here = sum(len(seeds_done) for seeds_done in done if seeds_done is not None)
        planned_here = len(seeds) * sum(seeds_done is not None for seeds_done in done)
        total, planned = total + finished_here, planned + planned_here
        rows.append([f"`{variant}`", *map(cell, done), f"{finished_here}/{planned_here}"])
    table = markdown_table(["data variant", *map(column_header, models), "finished"], rows)
    not_run = f"; {NOT_PLANNED}: a model the study does not run on that data variant" if planned < (
        len(seeds) * len(models) * len(study["data_variants"])) else ""
    return (f"{table}\n\nFinished runs of the study config (seeds in brackets where some are missing{not_run}): "
            f"{total} of {planned}.")


def classifier_starts(runs: Sequence[FinishedRun]) -> str | None:
    """One paragraph on what the runs' classifiers started from (their pretrained.json), by seed, with a
    warning for a seed whose runs loaded different weights (its paired differences then mix two starts);
    None when no run loads a pretrained classifier."""
    loading = [run for run in runs if run.config.get("model", {}).get("pretrained")]
    if not loading:
        return None
    sentences = []
    for seed in sorted({run.seed for run in loading if run.pretrained is not None}):
        starts: dict[str, list[FinishedRun]] = {}
        for run in loading:
            if run.seed == seed and run.pretrained is not None:
                starts.setdefault(run.pretrained["body_sha256"][:8], []).append(run)
        described = []
        for digest, started in starts.items():
            accuracy = started[0].pretrained.get("source_test_accuracy")
            shown = f" (its test accuracy {100 * accuracy:.2f}%)" if is_number(accuracy) else ""
            models = ", ".join(column_header(run.model) for run in started)
            described.append(f"`{digest}`{shown} for {models}")
        sentence = f"seed {seed}: " + "; ".join(described)
        if len(starts) > 1:
            sentence += " (**different weights within one seed**: its paired differences mix two starts)"
        sentences.append(sentence)
    unrecorded = [run for run in loading if run.pretrained is None]
    if unrecorded:
        seeds = ", ".join(map(str, sorted({run.seed for run in unrecorded})))
        sentences.append(f"not recorded for {len(unrecorded)} run(s) of seed(s) {seeds} (finished before runs "
                         "recorded it)")
    return ("Classifier starts (each run's pretrained.json: the first 8 hex digits of the loaded weights' "
            "digest without the head, and the source run's recorded test accuracy): " + "; ".join(sentences) + ".")


def _test_images(runs: Sequence[FinishedRun]) -> str:
    """'granulocyte 125, monocyte 125, ...': the test split's images per class, or 'mixed' when runs differ."""
    splits = {tuple((name, run.metrics["per_class"][name].get("support")) for name in run.metrics["classes"])
              for run in runs}
    return ", ".join(f"{name} {count}" for name, count in splits.pop()) if len(splits) == 1 else "mixed"


# ----------------------------------------------------------------------------------------------------
# The generated block of a document.


def results_block(results_dir: str | os.PathLike) -> str:
    """The generated Markdown of a results folder (between and including its markers)."""
    results_dir = pathlib.Path(results_dir)
    name = results_dir.resolve().name
    runs = collect_finished_runs(results_dir)
    parts = [MARKER_BEGIN.format(name=name),
             f"<!-- generated by `python -m urnet_jax.study report results/{name}`: edit the text outside the "
             f"markers only -->", ""]
    if not runs:
        parts += [f"No finished runs in `results/{name}` yet.", ""]
    study = read_study_config(results_dir)
    if study is not None and study.get("report") == "validation":  # a tuning study: never its test numbers
        return "\n".join([*parts, *(tuning.tuning_block(results_dir, runs, study) if runs else []),
                          MARKER_END.format(name=name)])
    models = ordered([run.model for run in runs], ABLATION_MODELS)
    baseline = read_baseline(results_dir)
    baseline_runs = collect_finished_runs(results_dir.parent / baseline) if baseline else []
    rule = rules.decision_rule(study.get("decision_rule") if study is not None else None)
    if rule is not None:
        parts += [decision.describe(rule, column_header), ""]
    if study is not None and all(key in study for key in ("models", "data_variants", "seeds")):
        parts += [progress_table(study, runs), ""]
    verdicts: dict[str, decision.Verdict] = {}
    for variant in ordered([run.data_variant for run in runs], VARIANTS):
        of_variant = [run for run in runs if run.data_variant == variant]
        # A model the study does not run on this variant gets no column, unless runs of it are here.
        cells = {column_header(model): sorted((r for r in of_variant if r.model == model), key=lambda r: r.seed)
                 for model in models if study is None or runs_on(study, model, variant)
                 or any(r.model == model for r in of_variant)}
        seeds = sorted({run.seed for run in of_variant})
        description = DATA_DESCRIPTIONS.get(variant, variant)
        parts += [f"#### `results/{name}`, data variant `{variant}`: {description}", "",
                  mean_std_table(cells), "",
                  f"Mean ± sample standard deviation over seeds ({', '.join(map(str, seeds))}), in %; a cell "
                  f"without ± has one finished seed. Averages are unweighted means over the classes (macro).", "",
                  "Settings of these runs (config.json): " + ", ".join(
                      f"`{key}` {_display(_shared_value(of_variant, key))}" for key in PROTOCOL_KEYS)
                  + f"; test images per class (eval/metrics.json): {_test_images(of_variant)}.", ""]
        starts = classifier_starts(of_variant)
        if starts is not None:
            parts += [starts, ""]
        classes = common_classes([run.metrics for run in of_variant])
        by_seed = paired_table(of_variant, classes)
        if by_seed is not None:
            parts += [by_seed, "",
                      "Paired differences in percentage points, first model minus second, over the seeds both "
                      "have finished (same seed, same data): mean ± sample standard deviation, then how many "
                      "of those seeds the first model was better/equal/worse. The t-interval (n − 1 degrees of "
                      "freedom) covers only the spread over seeds, not over other test sets.", ""]
        comparisons = read_comparisons(results_dir) or paired.all_pairs(models)
        compared_images = paired.compare({(run.model, run.seed): results_dir / run.name for run in of_variant},
                                         comparisons)
        if compared_images:
            table, note = paired.comparison_table(compared_images, column_header)
            parts += [table, "", note, ""]
        if rule is not None:
            lines, verdicts[variant] = decision.variant_lines(rule, variant, compared_images, column_header)
            parts += lines
        parts += [error_table(cells, classes), "",
                  "Test errors by true and predicted class: images, mean over each column's finished seeds "
                  "(from each run's confusion matrix).", ""]
        of_baseline = [run for run in baseline_runs if run.data_variant == variant]
        compared = baseline_table(of_variant, of_baseline)
        if compared is not None:
            settings = _baseline_settings(of_variant, of_baseline)
            parts += [f"Against the baseline study `results/{baseline}`, run by run (same model, data variant and "
                      f"seed), whose runs differ from these in: "
                      + ("; ".join(f"`{line}`" for line in settings) or "nothing (same settings)")
                      + " (baseline != this study).", "", compared, "",
                      "Differences in percentage points, this study minus the baseline, over the seeds both have "
                      "finished: mean ± sample standard deviation, then how many seeds were better/equal/worse "
                      "here. Epoch-to-epoch change: the mean absolute change of test accuracy between "
                      "consecutive epochs among the last 5 phase-2 epochs, in points, mean ± std over the same "
                      "seeds.", ""]
        parts += phase1.phase1_section(name, variant, of_variant)
    if rule is not None and runs:
        parts += decision.claim_lines(rule, verdicts)
    parts += external.external_sections(results_dir, runs)
    recommend = rules.recommendation_rule(study.get("recommendation_rule") if study is not None else None)
    if recommend is not None and runs:
        models = recommendation.rule_models(list(study.models))
        for variant, scores in recommendation.scores_by_data_variant(recommend, results_dir, runs).items():
            parts += recommendation.recommendation_lines(recommend, variant, models, scores)
    parts.append(MARKER_END.format(name=name))
    return "\n".join(parts)


def _block_span(text: str, name: str) -> tuple[int, int] | None:
    """(start, end) of the block of `name` in text (end just past the end marker), or None."""
    begin, end = MARKER_BEGIN.format(name=name), MARKER_END.format(name=name)
    start = text.find(begin)
    if start < 0:
        return None
    stop = text.find(end, start)
    if stop < 0:
        raise ConfigError(f"'{begin}' has no matching '{end}'")
    return start, stop + len(end)


def replace_block(text: str, block: str, name: str) -> str:
    """`text` with the block of `name` replaced by `block` (appended when the markers are absent)."""
    span = _block_span(text, name)
    if span is None:
        return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    return text[:span[0]] + block + text[span[1]:]


def block_names(text: str) -> list[str]:
    """The NAMEs of every `<!-- results:begin NAME -->` marker in text."""
    return re.findall(r"<!-- results:begin (\S+) -->", text)


def check_document(text: str, results_dir: str | os.PathLike) -> bool:
    """True when the document's block of results_dir equals what the results give."""
    name = pathlib.Path(results_dir).resolve().name
    span = _block_span(text, name)
    return span is not None and text[span[0]:span[1]] == results_block(results_dir)
