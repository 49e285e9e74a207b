"""Finished runs of a results folder read back from their files (config.json, eval/metrics.json,
metrics.jsonl: the phase-1 rows and the phase-2 test accuracies, eval/<external set>/metrics.json, and the
folder's study.json), and the per-run numbers the report derives from them."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from urnet_jax import config as config_lib, workdir as workdir_lib
from urnet_jax.data.plan import VARIANTS
from urnet_jax.errors import ConfigError
from urnet_jax.evaluation.report import read_evaluated_run
from urnet_jax.study.sweep import ABLATION_MODELS, NAME_PART, RUN_NAME

PHASE1_RESULT = pathlib.Path("eval") / "phase1.json"  # marks a finished phase-1-only run (`run`)
TABLE3_KEYS = ("recall", "precision", "f1")
TABLE3_FIELDS = "classes, per_class recall/precision/f1, macro, accuracy, confusion_matrix"


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """A finished run read back from its committed files."""

    name: str
    model: str
    data_variant: str
    seed: int
    config: Mapping[str, Any]
    metrics: Mapping[str, Any]
    # (epoch, test accuracy in [0, 1]) after every phase-2 epoch, from metrics.jsonl.
    test_accuracy_curve: tuple[tuple[int, float], ...] = ()
    # The well-formed phase-1 (enhancer pre-training) rows of metrics.jsonl, in epoch order.
    phase1_rows: tuple[Mapping[str, Any], ...] = ()
    # The dotted keys its config.json holds (`config` also has those added since, at their defaults).
    recorded_keys: frozenset[str] = frozenset()
    # What its classifier started from (pretrained.json, `workdir.write_pretrained_record`); None when the
    # run has no model.pretrained or finished before runs recorded it.
    pretrained: Mapping[str, Any] | None = None


def is_number(value: Any) -> bool:
    """Whether a parsed JSON value is a number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def has_table3_numbers(metrics: Any) -> bool:
    """Whether a parsed metrics.json holds every number of the Table-3 layout."""
    try:
        classes, confusion = metrics["classes"], metrics["confusion_matrix"]
        return (is_number(metrics["accuracy"]) and all(is_number(metrics["macro"][k]) for k in TABLE3_KEYS)
                and all(is_number(metrics["per_class"][name][k]) for name in classes for k in TABLE3_KEYS)
                and len(confusion) == len(classes)
                and all(len(row) == len(classes) and all(map(is_number, row)) for row in confusion))
    except (KeyError, TypeError):
        return False


def _rows_of_phase(rows: Sequence[Any], phase: int) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl that are JSON objects of `phase` with an integer epoch."""
    return [row for row in rows if isinstance(row, dict) and row.get("phase") == phase
            and isinstance(row.get("epoch"), int)]


def _phase2_curve(rows: Sequence[Any]) -> tuple[tuple[int, float], ...]:
    """(epoch, test accuracy) of every well-formed phase-2 row of a run's metrics.jsonl rows."""
    return tuple((row["epoch"], row["test_accuracy"]) for row in _rows_of_phase(rows, 2)
                 if is_number(row.get("test_accuracy")))


def collect_finished_runs(results_dir: str | os.PathLike) -> list[FinishedRun]:
    """Every finished run (a <model>-<variant>-seed<N> folder with eval/metrics.json, or with eval/phase1.json
    for a phase-1-only run, whose `metrics` are then {}) of a results folder, in name order. A missing folder
    has none.

    Raises ConfigError when a file does not parse or config.json disagrees with the folder's name.
    """
    results_dir = pathlib.Path(results_dir)
    if not results_dir.is_dir():
        return []
    runs = []
    for child in sorted(results_dir.iterdir()):
        match = RUN_NAME.match(child.name)
        if not (match and child.is_dir()):
            continue
        phase1_only = not (child / "eval" / "metrics.json").is_file()
        if phase1_only and not (child / PHASE1_RESULT).is_file():
            continue
        try:
            saved, metrics = read_evaluated_run(child) if not phase1_only else (_read_json(child / "config.json"), {})
            config = config_lib.saved_config(saved).to_dict()  # keys added since the run at their defaults
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if not phase1_only and not has_table3_numbers(metrics):
            raise ConfigError(f"{child / 'eval' / 'metrics.json'} lacks some of {TABLE3_FIELDS}")
        seed, variant = int(match["seed"]), match["data"]
        saved_seed, saved_variant = saved.get("seed"), saved.get("data", {}).get("variant")
        if (saved_seed, saved_variant) != (seed, variant):
            raise ConfigError(f"{child / 'config.json'} has seed {saved_seed!r} and data.variant {saved_variant!r}, "
                              f"but the folder's name says seed {seed} and {variant!r}")
        rows = workdir_lib.read_metrics_rows(child)
        runs.append(FinishedRun(name=child.name, model=match["model"], data_variant=variant, seed=seed,
                                config=config, metrics=metrics, test_accuracy_curve=_phase2_curve(rows),
                                phase1_rows=tuple(_rows_of_phase(rows, 1)),
                                recorded_keys=frozenset(config_lib.flatten(saved)),
                                pretrained=_pretrained_record(child)))
    return runs


def _pretrained_record(run_dir: pathlib.Path) -> dict[str, Any] | None:
    """<run_dir>/pretrained.json, None when absent; ConfigError when it is not a record with a body digest."""
    path = run_dir / workdir_lib.PRETRAINED_RECORD
    if not path.is_file():
        return None
    record = _read_json(path)
    if not (isinstance(record, dict) and isinstance(record.get("body_sha256"), str)):
        raise ConfigError(f"{path} is not a pretrained-classifier record (no body_sha256)")
    return record


def _read_json(path: pathlib.Path) -> Any:
    """The parsed JSON file; ConfigError (one line) when it is missing or does not parse."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None


def read_external_metrics(run_dir: pathlib.Path, set_name: str) -> dict[str, Any] | None:
    """A run's metrics.json on the external set `set_name` (RUN/eval/<set_name>/metrics.json), None when the
    run has none. Raises ConfigError when it does not parse or lacks a number of the Table-3 layout."""
    path = run_dir / "eval" / set_name / "metrics.json"
    if not path.is_file():
        return None
    metrics = _read_json(path)
    if not has_table3_numbers(metrics):
        raise ConfigError(f"{path} lacks some of {TABLE3_FIELDS}")
    return metrics


def read_study_config(results_dir: pathlib.Path) -> ml_collections.ConfigDict | None:
    """The study config recorded in a results folder's study.json (None when it is missing or not a JSON object)."""
    try:
        record = json.loads((results_dir / "study.json").read_text())
    except (OSError, ValueError):
        return None
    return ml_collections.ConfigDict(record) if isinstance(record, dict) else None


def read_baseline(results_dir: pathlib.Path) -> str:
    """The baseline named in a results folder's study.json ('' when there is none)."""
    try:
        baseline = json.loads((results_dir / "study.json").read_text()).get("baseline", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return baseline if isinstance(baseline, str) and NAME_PART.match(baseline) else ""


def read_comparisons(results_dir: pathlib.Path) -> list[tuple[str, str]]:
    """The (first, second) model pairs named by `comparisons` in a results folder's study.json ([] when
    it has none: the report then compares every pair)."""
    try:
        pairs = json.loads((results_dir / "study.json").read_text()).get("comparisons", [])
    except (OSError, ValueError, AttributeError):
        return []
    if not (isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 for p in pairs)):
        raise ConfigError(f"{results_dir / 'study.json'}: 'comparisons' must be a list of [first, second] model names")
    return [(str(first), str(second)) for first, second in pairs]


def ordered(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """Distinct `values`, those in `preferred` first in its order, the others sorted."""
    distinct = set(values)
    return [v for v in preferred if v in distinct] + sorted(distinct - set(preferred))


def column_header(model: str) -> str:
    """'net4' -> 'Net4'."""
    return model[:1].upper() + model[1:]


def learning_curves(results_dir: str | os.PathLike) -> dict[str, dict[str, list[list[tuple[int, float]]]]]:
    """{data variant: {model header: [[(epoch, test accuracy in [0, 1]), ...] for each finished seed]}}: the
    phase-2 curves of the finished runs that have one, variants and models in the report's order."""
    runs = [run for run in collect_finished_runs(results_dir) if run.test_accuracy_curve]
    curves: dict[str, dict[str, list[list[tuple[int, float]]]]] = {}
    for variant in ordered([run.data_variant for run in runs], VARIANTS):
        for model in ordered([run.model for run in runs], ABLATION_MODELS):
            for run in sorted((r for r in runs if (r.data_variant, r.model) == (variant, model)), key=lambda r: r.seed):
                curves.setdefault(variant, {}).setdefault(column_header(model), []).append(
                    list(run.test_accuracy_curve))
    return curves


def unselected_accuracy(run: FinishedRun, last_epochs: int) -> float | None:
    """The mean test accuracy (in [0, 1]) over the run's last `last_epochs` phase-2 epochs: a number not
    selected on the test set, unlike the kept (best) checkpoint's. None without a curve."""
    values = [accuracy for _, accuracy in run.test_accuracy_curve[-last_epochs:]]
    return float(np.mean(values)) if values else None


def epoch_to_epoch_change(run: FinishedRun, last_epochs: int = 5) -> float | None:
    """How much the phase-2 test accuracy jumps between consecutive epochs late in training, where it
    should have settled: the mean absolute difference (in [0, 1]) over the last `last_epochs` epochs.
    None with fewer than two epochs."""
    values = np.asarray([accuracy for _, accuracy in run.test_accuracy_curve[-last_epochs:]], np.float64)
    return float(np.abs(np.diff(values)).mean()) if len(values) > 1 else None
