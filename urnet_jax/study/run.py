"""The study runner: trains and evaluates every unfinished run of a study config, one after another.

Run `<model>-<data variant>-seed<seed>` trains in OUT/<run>/ (`urnet_jax.trainer.train_and_evaluate`) and is
then evaluated on the test split (`urnet_jax.evaluation.runner.evaluate_run`) twice: with its last epoch's
weights into OUT/<run>/eval_last/, then with the checkpoint selected during training into OUT/<run>/eval/
(both with per-image predictions, for the paired comparisons of `paired`). A run is finished when
OUT/<run>/eval/metrics.json exists and parses: finished runs are skipped, unfinished ones resume from their
checkpoints, so the study can be stopped and restarted at any point. The runs of one data variant share the
prepared data set OUT/_prepared/<variant>/ (one per data seed with seed groups, and one per model variant
that changes data.*); the subset is a folder of links, OUT/_prepared/subset/.

A phase-1-only run (train.epochs 0: an enhancer pre-trained and nothing else, e.g. a candidate of a study that
tunes phase 1) has no classifier to evaluate: its kept phase-1 row of metrics.jsonl (epoch, PSNR and MSE on
the selection split) is written to OUT/<run>/eval/phase1.json, which marks it finished instead.

A study with a pretrained classifier (`sweep`: 'pretrained_classifier') first trains it, once per data seed,
as OUT/standin_dataseed<k>/ (evaluated on its own test split into its eval/), then the runs that load it;
with 'standins_dir' it loads the finished stand-ins of another study's folder instead (checked, never trained).
A stand-in counts as finished only with its checkpoints: in a fresh clone, which holds its committed results
but no checkpoints, the study trains it again (printing the recorded and the new test accuracy). On another
CPU the same config can train other weights (float rounding differs between instruction sets), so every run
records what it loaded (its pretrained.json, `workdir.write_pretrained_record`) and the report flags a seed
whose runs loaded different weights.

Locations in a finished run's config.json and in OUT/study.json (data.dir, data.prepared_dir,
model.pretrained) are written relative to the directory the study runs from (the repository root in every
documented command, like the --config and --out paths), so that committed results hold no machine's
absolute paths; they do not count when a finished run is compared with the study's config.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import pathlib
import shutil
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from urnet_jax import config as config_lib, trainer
from urnet_jax.data.folders import resolve_class_folders, scan_class_files
from urnet_jax.data.prepare import exclusive_lock
from urnet_jax.errors import ConfigError, DataError, RunError
from urnet_jax.evaluation import runner
from urnet_jax.run_log import rough_duration
from urnet_jax.study.paired import EVALUATION_FOLDERS
from urnet_jax.study.results import PHASE1_RESULT
from urnet_jax.study.sweep import (IGNORED_KEYS, STANDIN_NAME, check_study_config, data_seed_of, external_sets,
                                   plain, plan_runs, plan_standins, unused_keys)
from urnet_jax.workdir import read_metrics_rows

LOCATION_KEYS = (("data", "dir"), ("data", "prepared_dir"), ("data", "split_dir"), ("model", "pretrained"))
LAST_EPOCH_FOLDER = EVALUATION_FOLDERS["last"]  # the last epoch's evaluation (eval/: the selected checkpoint's)


def link_subset(source: str | os.PathLike, class_map: Any, per_class: int, seed: int,
                out_dir: str | os.PathLike) -> pathlib.Path:
    """Links `per_class` images of every class of `source` (all of a class that has fewer) into
    out_dir/<source folder>/<file>, keeping the class folders, and returns out_dir.

    The choice: a permutation seeded by (seed, class index) over each class's files in path order. A
    matching out_dir (same source, size, seed and files, recorded in out_dir/.subset.json) is reused;
    concurrent callers take turns (a lock file beside out_dir).
    """
    source = pathlib.Path(source).expanduser().resolve()
    out_dir = pathlib.Path(out_dir)
    class_folders = resolve_class_folders(source, plain(class_map))
    files = scan_class_files(source, class_folders)
    chosen: list[str] = []
    for index, class_name in enumerate(class_folders):
        members = [f for f in files if f.class_name == class_name]
        picked = np.random.default_rng([seed, index]).permutation(len(members))[:per_class]
        chosen.extend(str(members[i].path.relative_to(source)) for i in sorted(picked))
    record = {"source": str(source), "per_class": per_class, "seed": seed, "files": chosen}
    stamp = out_dir / ".subset.json"
    with exclusive_lock(out_dir.parent / f".{out_dir.name}.lock"):
        try:
            if json.loads(stamp.read_text()) == record:
                return out_dir
        except (OSError, ValueError):
            pass
        shutil.rmtree(out_dir, ignore_errors=True)
        for relative in chosen:
            link = out_dir / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source / relative)
        stamp.write_text(json.dumps(record) + "\n")
    return out_dir


def _with_locations(config: Mapping[str, Any], place: Callable[[pathlib.Path], str]) -> dict[str, Any]:
    """A copy of a nested config dict with every non-empty LOCATION_KEYS path replaced by place(path)."""
    result = json.loads(json.dumps(config))
    for section, key in LOCATION_KEYS:
        if result.get(section, {}).get(key):
            result[section][key] = place(pathlib.Path(result[section][key]).expanduser())
    return result


def absolute_locations(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with its locations absolute (a relative one taken from the working directory)."""
    return _with_locations(config, lambda path: str(path.resolve()))


def relative_locations(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with its locations relative to the working directory."""
    return _with_locations(config, lambda path: os.path.relpath(path.resolve()))


def make_locations_relative(workdir: pathlib.Path) -> None:
    """Rewrites the run's config.json (written by training, with absolute paths) with relative locations."""
    path = workdir / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps(relative_locations(saved), indent=2, sort_keys=True) + "\n")


def read_finished_metrics(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's eval/metrics.json when it exists and parses (the run is finished), else None."""
    try:
        metrics = json.loads((pathlib.Path(workdir) / "eval" / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and "accuracy" in metrics else None


def read_phase1_result(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """A finished phase-1-only run's eval/phase1.json (its kept phase-1 row) when it exists and parses, else None."""
    try:
        kept = json.loads((pathlib.Path(workdir) / PHASE1_RESULT).read_text())
    except (OSError, ValueError):
        return None
    return kept if isinstance(kept, dict) and kept.get("phase") == 1 else None


def is_finished(workdir: pathlib.Path) -> bool:
    """Whether the run in `workdir` is evaluated (eval/metrics.json) or, trained in phase 1 only, has its
    eval/phase1.json."""
    return read_finished_metrics(workdir) is not None or read_phase1_result(workdir) is not None


def finished_config_differences(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> list[str]:
    """How a finished run's config.json differs from the study's config of that run (IGNORED_KEYS aside, and
    the settings neither uses: `unused_keys`, e.g. phase 1's optimiser in runs without phase 1)."""
    try:
        saved = json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError):
        return ["no readable config.json"]
    # Both with every key (the run's missing ones at the defaults of its time) and through JSON (tuples as lists).
    saved_config = config_lib.saved_config(saved).to_dict()
    ignored = IGNORED_KEYS | (unused_keys(saved_config) & unused_keys(config.to_dict()))
    return config_lib.config_differences(absolute_locations(saved_config), absolute_locations(config.to_dict()),
                                         ignored=ignored)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@dataclasses.dataclass
class StudyOutcome:
    """What one invocation of the runner did, by run name."""

    trained: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)  # 'name: one-line reason'
    not_started: list[str] = dataclasses.field(default_factory=list)  # left for later by `limit`


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path, show_progress: bool,
                        last_epoch: bool, external: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """Trains (or resumes) and evaluates one run on the test split; returns its test metrics (metrics.json),
    or for a phase-1-only run (train.epochs 0) its kept phase-1 row (eval/phase1.json).

    With `last_epoch`, the last epoch's weights (the 'latest' checkpoint) are evaluated first, into
    workdir/eval_last/; then the `external` sets ({name: {data_dir, class_map, adapt_bn}}) with the selected
    checkpoint, into workdir/eval/<name>/; then the selected ('best') checkpoint on the test split into
    workdir/eval/, whose metrics.json, written last, marks the run finished.
    """
    config_lib.validate(config)  # again: model.pretrained may name a run trained since the study was planned
    trainer.train_and_evaluate(config, workdir, show_progress=show_progress)
    if config.train.epochs == 0:
        return _record_phase1_result(workdir)
    if last_epoch:
        shutil.rmtree(workdir / "eval", ignore_errors=True)
        runner.evaluate_run(workdir, "latest", "test", progress=show_progress)
        shutil.rmtree(workdir / LAST_EPOCH_FOLDER, ignore_errors=True)
        os.replace(workdir / "eval", workdir / LAST_EPOCH_FOLDER)
    for name, external_set in (external or {}).items():
        runner.evaluate_external(workdir, external_set["data_dir"], external_set["class_map"], name=name,
                                 adapt_bn=external_set["adapt_bn"], progress=show_progress)
    metrics = runner.evaluate_run(workdir, "best", "test", progress=show_progress)
    make_locations_relative(workdir)
    return metrics


def _record_phase1_result(workdir: pathlib.Path) -> dict[str, Any]:
    """Writes a phase-1-only run's kept phase-1 row (metrics.jsonl) to eval/phase1.json and returns it."""
    kept = [row for row in read_metrics_rows(workdir)
            if isinstance(row, dict) and row.get("phase") == 1 and row.get("best") is True]
    if not kept:
        raise RunError(f"{workdir / 'metrics.jsonl'} marks no phase-1 epoch as kept")
    (workdir / PHASE1_RESULT).parent.mkdir(parents=True, exist_ok=True)
    (workdir / PHASE1_RESULT).write_text(json.dumps(kept[-1], indent=2, sort_keys=True) + "\n")
    make_locations_relative(workdir)
    return kept[-1]


def _finished_line(result: Mapping[str, Any]) -> str:
    """What a finished run reached: its test accuracy and macro F1, or a phase-1-only run's kept PSNR."""
    if result.get("phase") == 1:
        split = result.get("selected_on")
        psnr = result.get(f"{split}_psnr", float("nan"))
        return f"phase 1 kept epoch {result.get('epoch')}, {split} PSNR {psnr:.2f} dB"
    return f"test accuracy {100 * result['accuracy']:.2f}%, macro F1 {100 * result['macro']['f1']:.2f}%"


def _check_borrowed_standins(standins: Sequence[Any], standins_root: pathlib.Path) -> None:
    """ConfigError unless every stand-in run is finished in `standins_root` with the study's configuration."""
    for standin in standins:
        workdir = standins_root / standin.name
        if read_finished_metrics(workdir) is None or not config_lib.is_run_directory(workdir):
            raise ConfigError(f"standins_dir: {workdir} is not a finished run with its checkpoints (run the "
                              f"study that owns it first: it trains its stand-ins again when their checkpoints "
                              f"are missing)")
        differences = finished_config_differences(workdir, standin.config)
        if differences:
            raise ConfigError(f"standins_dir: {workdir} was trained with another configuration "
                              f"({'; '.join(differences[:3])})")


def run_study(study: ml_collections.ConfigDict, out_dir: str | os.PathLike, only: Sequence[str] = (),
              limit: int | None = None, delete_checkpoints: bool = False,
              prepared_root: str | os.PathLike | None = None, show_progress: bool = True) -> StudyOutcome:
    """Trains and evaluates every unfinished run of `study` (see the module docstring); never raises for a
    failed run (it is listed in the outcome), but ConfigError/DataError for a bad study config or data folder.
    A KeyboardInterrupt (TrainingStopped included) ends the study.

    When the study has a pretrained classifier, its runs (one per data seed of the selected runs,
    OUT/standin_dataseed<k>/) come first; a run whose classifier failed is not started (listed as failed).
    Their checkpoints are kept whatever `delete_checkpoints` says: the study's runs load them.

    only: glob patterns of run names (fnmatch; a run is selected when any matches; empty: every run).
    limit: the most runs to train in this call (finished runs do not count).
    delete_checkpoints: remove OUT/<run>/checkpoints/ once the run is evaluated.
    prepared_root: where the prepared data sets and the subset's links go (default OUT/_prepared).
    """
    out_dir = pathlib.Path(out_dir).expanduser().resolve()
    prepared_root = pathlib.Path(prepared_root or out_dir / "_prepared").expanduser().resolve()
    check_study_config(study)
    data_dir = None
    if study.subset_per_class:
        data_dir = link_subset(study.base.data.dir, study.base.data.class_map, study.subset_per_class,
                               study.base.data.seed, prepared_root / "subset")
    standins_root = pathlib.Path(study.get("standins_dir") or out_dir).expanduser().resolve()
    runs = plan_runs(study, prepared_root, data_dir, standins_root)
    selected = [run for run in runs if not only or any(fnmatch.fnmatchcase(run.name, p) for p in only)]
    if not selected:
        raise ConfigError(f"--only {' '.join(only)} matches none of the {len(runs)} runs (e.g. {runs[0].name})")
    standins = plan_standins(study, prepared_root, [data_seed_of(study, run.seed) for run in selected])
    if study.get("standins_dir"):
        _check_borrowed_standins(standins, standins_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {**study.to_dict(), "base": relative_locations(study.base.to_dict())}
    if study.get("standins_dir"):
        record["standins_dir"] = os.path.relpath(standins_root)
    if standins:
        record["pretrained_classifier"] = relative_locations(study.pretrained_classifier.to_dict())
    for external in record.get("external", {}).values():
        external["data_dir"] = os.path.relpath(pathlib.Path(external["data_dir"]).expanduser().resolve())
    (out_dir / "study.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")

    outcome = StudyOutcome()
    attempts = 0
    study_start = time.monotonic()
    study_runs = {run.name for run in selected}
    everything = [*selected] if study.get("standins_dir") else [*standins, *selected]
    for position, run in enumerate(everything, start=1):
        prefix = f"[{position}/{len(everything)}] {run.name}"
        workdir = out_dir / run.name
        is_study_run = run.name in study_runs
        standin = STANDIN_NAME.format(data_seed=run.config.data.seed)
        if is_study_run and standins and any(line.startswith(f"{standin}: ") for line in outcome.failed):
            outcome.failed.append(f"{run.name}: its pretrained classifier {standin} failed")
            print(f"{prefix}: not started: its pretrained classifier {standin} failed", flush=True)
            continue
        recorded = None
        if is_finished(workdir):
            differences = finished_config_differences(workdir, run.config)
            if differences:
                reason = f"finished with another configuration ({'; '.join(differences[:3])})"
                outcome.failed.append(f"{run.name}: {reason}")
                print(f"{prefix}: {reason}", flush=True)
                continue
            if is_study_run or config_lib.is_run_directory(workdir):
                outcome.skipped.append(run.name)
                print(f"{prefix}: finished already, skipped", flush=True)
                continue
            # A stand-in's results without its checkpoints (a fresh clone: checkpoints are not committed). Its
            # eval/metrics.json goes first, so that a retraining stopped halfway does not count as finished.
            recorded = read_finished_metrics(workdir)
            print(f"{prefix}: its results are here but not the checkpoints the study's runs load: training it "
                  f"again ({_finished_line(recorded)} recorded)", flush=True)
            (workdir / "eval" / "metrics.json").unlink()
        if limit is not None and attempts >= limit:
            outcome.not_started.append(run.name)
            continue
        attempts += 1
        run_start = time.monotonic()
        print(f"{prefix}: training in {workdir} (study time so far {rough_duration(run_start - study_start)})",
              flush=True)
        try:
            result = _train_and_evaluate(run.config, workdir, show_progress, last_epoch=is_study_run,
                                          external=external_sets(study, run.model) if is_study_run else {})
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the study
            reason = _one_line(error)
            if not isinstance(error, (ConfigError, DataError, RunError)):
                workdir.mkdir(parents=True, exist_ok=True)
                (workdir / "error.log").write_text(traceback.format_exc())
                reason = f"{type(error).__name__}: {reason} (traceback in {workdir / 'error.log'})"
            outcome.failed.append(f"{run.name}: {reason}")
            print(f"{prefix}: FAILED after {rough_duration(time.monotonic() - run_start)}: {reason}", flush=True)
            continue
        finally:
            jax.clear_caches()  # this run's compiled programs (dozens of runs in one process must not pile them up)
        if delete_checkpoints and is_study_run:  # a pretrained classifier's are read by the study's runs
            shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        outcome.trained.append(run.name)
        print(f"{prefix}: finished in {rough_duration(time.monotonic() - run_start)}: {_finished_line(result)}"
              + (f" (recorded before: {_finished_line(recorded)})" if recorded else "")
              + f" (study time {rough_duration(time.monotonic() - study_start)})", flush=True)
    return outcome
