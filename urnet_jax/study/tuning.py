"""The report of a tuning study: a setting chosen on the validation split, never on test.

A study config with `report: 'validation'` (e.g. configs/severe_tuning.py) is a tuning study: each of its
model variants is one candidate setting, and its report (`tuning_block`, in place of the test-split tables of
`report`) shows, per candidate, the settings that differ between candidates and the validation accuracy and
balanced accuracy of every seed at the selected epoch (phase 2's last row marked 'best' in metrics.jsonl) and
at the last epoch. With `target_range: (low, high)` (validation balanced accuracy at the selected epoch, in
percent, mean over seeds), it names the candidate whose mean is nearest the middle of the range among those
inside it, or says that none is. Test numbers are in the runs' files but never read here.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from urnet_jax import config as config_lib, workdir as workdir_lib
from urnet_jax.evaluation.report import MISSING, markdown_table
from urnet_jax.study.results import FinishedRun, is_number
from urnet_jax.study.sweep import IGNORED_KEYS

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


def choose(means: Mapping[str, float], target_range: Sequence[float]) -> str | None:
    """The candidate whose mean lies in [low, high] nearest (low + high) / 2; None when none lies inside."""
    low, high = target_range
    inside = {name: mean for name, mean in means.items() if low <= mean <= high}
    return min(inside, key=lambda name: abs(inside[name] - (low + high) / 2)) if inside else None


def validation_by_candidate(results_dir: pathlib.Path, runs: Sequence[FinishedRun]) -> dict[str, dict[str, list]]:
    """{model variant: {key of `validation_at_selected_and_last`: one value per seed}}, in run order; a
    variant none of whose runs has validation rows maps to {}."""
    numbers = {run.name: validation_at_selected_and_last(results_dir / run.name) for run in runs}
    columns: dict[str, dict[str, list]] = {}
    for run in runs:
        column = columns.setdefault(run.model, {})
        for key, value in (numbers[run.name] or {}).items():
            column.setdefault(key, []).append(value)
    return columns


def candidate_means(columns: Mapping[str, Mapping[str, list]]) -> dict[str, float]:
    """{model variant: mean validation balanced accuracy at the selected epoch} of `validation_by_candidate`."""
    return {model: float(np.mean(column["val_balanced_accuracy"])) for model, column in columns.items() if column}


def tuning_block(results_dir: pathlib.Path, runs: Sequence[FinishedRun], study: ml_collections.ConfigDict) -> list[str]:
    """The Markdown lines of a tuning study's report (see the module docstring)."""
    settings = candidate_settings(runs)
    keys = sorted({key for values in settings.values() for key in values})
    columns = validation_by_candidate(results_dir, runs)
    means = candidate_means(columns)
    rows = []
    for model, column in columns.items():
        rows.append([model, *(str(settings[model].get(key)) for key in keys), str(len(column.get("val_accuracy", []))),
                     _mean_cell(column.get("val_accuracy", [])), _mean_cell(column.get("val_balanced_accuracy", [])),
                     _mean_cell(column.get("last_val_accuracy", [])),
                     _mean_cell(column.get("last_val_balanced_accuracy", []))])
    lines = ["Validation split only (the test split is never read for this choice); mean ± std over seeds, percent.",
             "", markdown_table(["candidate", *keys, "seeds", "val accuracy (selected epoch)",
                                 "val balanced accuracy (selected epoch)", "val accuracy (last epoch)",
                                 "val balanced accuracy (last epoch)"], rows), ""]
    target = study.get("target_range") if study is not None else None
    if target:
        chosen = choose(means, target)
        lines += [f"Target: validation balanced accuracy at the selected epoch in [{target[0]}, {target[1]}]. "
                  + (f"Chosen: **{chosen}** (mean {means[chosen]:.2f})." if chosen else
                     "No candidate lies inside the range yet."), ""]
    return lines
