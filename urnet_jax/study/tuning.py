"""The report of a tuning study: a setting chosen on the validation split, never on test.

A study config with `report: 'validation'` (e.g. configs/severe_tuning.py) is a tuning study: each of its
model variants is one candidate setting, and its report (`tuning_block`, in place of the test-split tables of
`report`) shows, per candidate, the settings that differ between candidates and the validation accuracy and
balanced accuracy of every seed at the selected epoch (phase 2's last row marked 'best' in metrics.jsonl) and
at the last epoch; for candidates with phase 1, the kept enhancer's validation PSNR (dB) and MSE. The
candidates are compared on `tuning_metric` (mean over seeds): 'val_balanced_accuracy' (percent, at the
selected epoch; the default) or 'phase1_psnr' (e.g. candidates that train phase 1 only, train.epochs 0). With
`target_range: (low, high)` of that metric, it names the candidate inside the range nearest its middle
(`target_rule` 'nearest_middle', the default) or the highest inside it ('highest'), or says that none is.
Test numbers are in the runs' files but never read here; a phase-1 row kept on another split than
validation counts as missing.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from urnet_jax import config as config_lib, workdir as workdir_lib
from urnet_jax.evaluation.report import MISSING, markdown_table
from urnet_jax.study.phase1 import phase1_outcome
from urnet_jax.study.results import FinishedRun, is_number
from urnet_jax.study.sweep import IGNORED_KEYS, TARGET_RULES, TUNING_METRICS

VALIDATION_KEYS = ("val_accuracy", "val_balanced_accuracy")
NOT_SETTINGS = frozenset({"seed", "data.split_dir", "model.pretrained"}) | IGNORED_KEYS  # differ, yet no candidate


def validation_at_selected_and_last(run_dir: pathlib.Path) -> dict[str, float] | None:
    """{'selected_epoch', 'val_accuracy', 'val_balanced_accuracy', 'last_epoch', 'last_val_accuracy',
    'last_val_balanced_accuracy'} (accuracies in percent) from a run's phase-2 rows of metrics.jsonl; None
    when no phase-2 row holds both validation numbers."""
    rows = [row for row in workdir_lib.read_metrics_rows(run_dir) if isinstance(row, dict) and row.get("phase") == 2
            and isinstance(row.get("epoch"), int) and all(is_number(row.get(key)) for key in VALIDATION_KEYS)]
    if not rows:
        return None
    selected = [row for row in rows if row.get("best") is True] or rows
    chosen, last = selected[-1], rows[-1]
    return {"selected_epoch": chosen["epoch"], "last_epoch": last["epoch"],
            **{key: 100 * chosen[key] for key in VALIDATION_KEYS},
            **{f"last_{key}": 100 * last[key] for key in VALIDATION_KEYS}}


def phase1_on_validation(run: FinishedRun) -> dict[str, float] | None:
    """{'phase1_epoch', 'phase1_psnr' (dB), 'phase1_mse'} of the run's kept phase-1 enhancer on the validation
    split; None when the run has no phase 1 or kept it on another split (the paper's test-selection option)."""
    outcome = phase1_outcome(run)
    if outcome is None or outcome.kept.get("selected_on") != "val":
        return None
    psnr, mse = outcome.selection_value("psnr"), outcome.selection_value("mse")
    if psnr is None or mse is None:
        return None
    return {"phase1_epoch": outcome.kept["epoch"], "phase1_psnr": psnr, "phase1_mse": mse}


def candidate_settings(runs: Sequence[FinishedRun]) -> dict[str, dict[str, Any]]:
    """{model variant: {dotted key: value}} for the config keys whose values differ between the runs
    (seeds, locations and bookkeeping aside)."""
    flat = {run.name: config_lib.flatten(run.config) for run in runs}
    keys = sorted({key for values in flat.values() for key in values} - NOT_SETTINGS)
    differing = [key for key in keys if len({repr(values.get(key)) for values in flat.values()}) > 1]
    return {run.model: {key: flat[run.name].get(key) for key in differing} for run in runs}


def _mean_cell(values: Sequence[float]) -> str:
    if not values:
        return MISSING
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def choose(means: Mapping[str, float], target_range: Sequence[float], rule: str = TARGET_RULES[0]) -> str | None:
    """The candidate whose mean lies in [low, high]: nearest (low + high) / 2 (rule 'nearest_middle') or the
    highest (rule 'highest'); None when none lies inside."""
    low, high = target_range
    inside = {name: mean for name, mean in means.items() if low <= mean <= high}
    if not inside:
        return None
    if rule == "highest":
        return max(inside, key=inside.__getitem__)
    return min(inside, key=lambda name: abs(inside[name] - (low + high) / 2))


def validation_by_candidate(results_dir: pathlib.Path, runs: Sequence[FinishedRun]) -> dict[str, dict[str, list]]:
    """{model variant: {key of `validation_at_selected_and_last` or `phase1_on_validation`: one value per
    seed}}, in run order; a variant none of whose runs has such numbers maps to {}."""
    columns: dict[str, dict[str, list]] = {}
    for run in runs:
        column = columns.setdefault(run.model, {})
        numbers = {**(validation_at_selected_and_last(results_dir / run.name) or {}),
                   **(phase1_on_validation(run) or {})}
        for key, value in numbers.items():
            column.setdefault(key, []).append(value)
    return columns


def candidate_means(columns: Mapping[str, Mapping[str, list]], metric: str = TUNING_METRICS[0]) -> dict[str, float]:
    """{model variant: mean of `metric` over its seeds} of `validation_by_candidate` (variants without it left out)."""
    return {model: float(np.mean(column[metric])) for model, column in columns.items() if column.get(metric)}


PHASE2_COLUMNS = {"val_accuracy": "val accuracy (selected epoch)",
                  "val_balanced_accuracy": "val balanced accuracy (selected epoch)",
                  "last_val_accuracy": "val accuracy (last epoch)",
                  "last_val_balanced_accuracy": "val balanced accuracy (last epoch)"}
PHASE1_COLUMNS = {"phase1_psnr": "phase-1 val PSNR (dB, kept epoch)", "phase1_mse": "phase-1 val MSE (kept epoch)"}
METRIC_NAMES = {"val_balanced_accuracy": "validation balanced accuracy at the selected epoch",
                "phase1_psnr": "phase-1 validation PSNR (dB) of the kept enhancer"}


def _mse_cell(values: Sequence[float]) -> str:
    return MISSING if not values else " / ".join(f"{value:.3g}" for value in values)


def tuning_block(results_dir: pathlib.Path, runs: Sequence[FinishedRun], study: ml_collections.ConfigDict) -> list[str]:
    """The Markdown lines of a tuning study's report (see the module docstring)."""
    settings = candidate_settings(runs)
    keys = sorted({key for values in settings.values() for key in values})
    columns = validation_by_candidate(results_dir, runs)
    shown = {key: title for key, title in {**PHASE2_COLUMNS, **PHASE1_COLUMNS}.items()
             if any(column.get(key) for column in columns.values())}
    seeds = {model: sum(run.model == model for run in runs) for model in columns}
    rows = [[model, *(str(settings[model].get(key)) for key in keys), str(seeds[model]),
             *((_mse_cell if key == "phase1_mse" else _mean_cell)(column.get(key, [])) for key in shown)]
            for model, column in columns.items()]
    units = [text for key, text in (("val_accuracy", "accuracies in percent"),
                                    ("phase1_mse", "MSE: one value per seed")) if key in shown]
    lines = ["Validation split only (the test split is never read for this choice); mean ± std over seeds"
             + (f" ({'; '.join(units)})" if units else "") + ".",
             "", markdown_table(["candidate", *keys, "seeds", *shown.values()], rows), ""]
    target = study.get("target_range") if study is not None else None
    if target:
        metric = study.get("tuning_metric", TUNING_METRICS[0])
        rule = study.get("target_rule", TARGET_RULES[0])
        means = candidate_means(columns, metric)
        chosen = choose(means, target, rule)
        which = "the highest" if rule == "highest" else "nearest the middle"
        lines += [f"Target: {METRIC_NAMES[metric]} in [{target[0]}, {target[1]}], {which} inside the range. "
                  + (f"Chosen: **{chosen}** (mean {means[chosen]:.2f})." if chosen else
                     "No candidate lies inside the range yet."), ""]
    return lines
