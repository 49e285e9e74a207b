"""The study runner (restart-skip, resume, failures, --only/--limit), its config composition, and the
results tables (mean +- std over seeds, written between markers, --check)."""

from __future__ import annotations

import ast
import json
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading

import ml_collections
import numpy as np
import pytest
from PIL import Image

from urnet_jax import cli, config as config_lib, errors, trainer
from urnet_jax.config import base_config
from urnet_jax.data.prepare import exclusive_lock
from urnet_jax.evaluation import runner
from urnet_jax.evaluation.metrics import metrics_from_confusion
from urnet_jax.study import __main__ as study_cli, paired, report, results as study_results, run as study_run, rules, sweep

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ["granulocyte", "monocyte", "lymphocyte"]
# The tiny classifier and data of tests/test_training.py, without an enhancer (the fastest model to compile
# and train), one epoch.
TINY_BASE = {
    "model": {"enhancer_width": 4, "classifier": "resnet18", "classifier_width": 4},
    "data": {"allow_synthetic": True, "image_size": 96, "synthetic_per_class": 10, "train_size": 32},
    "pretrain": {"epochs": 0}, "train": {"epochs": 1}, "batch_size": 8, "eval_batch_size": 8,
    "optimizer": {"lr": 0.05}, "checkpoint": {"every_steps": 0, "keep": 1}, "log_every_steps": 1,
}
TINY_MODELS = {"tiny": {"model": {"enhancer": "none"}}}


def tiny_study(seeds=(1, 2), models=None) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"base": sweep.with_overrides(base_config(), TINY_BASE),
                                      "models": models or TINY_MODELS, "data_variants": ("raw",), "seeds": seeds,
                                      "subset_per_class": 0, "baseline": ""})


def write_tiny_study_file(folder: pathlib.Path, seeds: tuple[int, ...]) -> str:
    """A study config file of the tiny study (data only, as configs/study_*.py)."""
    path = folder / "study.py"
    path.write_text(
        "import ml_collections\nfrom urnet_jax.config import base_config\n\n\ndef get_config():\n"
        f"    base = base_config()\n    base.update({TINY_BASE!r})\n"
        f"    return ml_collections.ConfigDict({{'base': base, 'models': {TINY_MODELS!r}, 'data_variants': ('raw',),\n"
        f"                                      'seeds': {seeds!r}, 'subset_per_class': 0, 'baseline': ''}})\n")
    return str(path)


class Spy:
    """Wraps a function, recording the workdir of every call."""

    def __init__(self, function):
        self.function = function
        self.workdirs: list[str] = []

    def __call__(self, config_or_workdir, *args, **kwargs):
        workdir = args[0] if args and isinstance(config_or_workdir, ml_collections.ConfigDict) else config_or_workdir
        self.workdirs.append(pathlib.Path(workdir).name)
        return self.function(config_or_workdir, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# The runner on real (tiny) training and evaluation.


def test_runner_skips_finished_runs_and_reruns_only_an_unfinished_one(tmp_path, monkeypatch):
    out = tmp_path / "results" / "tiny"
    train_spy, evaluate_spy = Spy(trainer.train_and_evaluate), Spy(runner.evaluate_run)
    monkeypatch.setattr(trainer, "train_and_evaluate", train_spy)
    monkeypatch.setattr(runner, "evaluate_run", evaluate_spy)

    first = study_run.run_study(tiny_study(), out, show_progress=False)
    names = ["tiny-raw-seed1", "tiny-raw-seed2"]
    assert first.trained == names and not first.failed and not first.skipped
    for name in names:
        for path in ("config.json", "metrics.jsonl", "eval/metrics.json", "eval_last/metrics.json", "checkpoints/best"):
            assert (out / name / path).exists(), (name, path)
        assert json.loads((out / name / "config.json").read_text())["seed"] == int(name[-1])
    # One prepared data set for both runs, at OUT/_prepared/<variant>; config.json names it relative to the
    # working directory.
    assert sorted(p.name for p in (out / "_prepared").iterdir()) == ["raw"]
    prepared = {json.loads((out / n / "config.json").read_text())["data"]["prepared_dir"] for n in names}
    assert len(prepared) == 1 and not pathlib.Path(*prepared).is_absolute()
    assert pathlib.Path(*prepared).resolve() == (out / "_prepared" / "raw").resolve()

    second = study_run.run_study(tiny_study(), out, show_progress=False)
    assert second.skipped == names and not second.trained
    # Each run evaluated twice (last epoch, then the selected checkpoint); nothing ran again.
    assert train_spy.workdirs == names and evaluate_spy.workdirs == [name for name in names for _ in "12"]

    rows_before = (out / names[1] / "metrics.jsonl").read_text()
    (out / names[1] / "eval" / "metrics.json").unlink()
    third = study_run.run_study(tiny_study(), out, show_progress=False)
    assert third.skipped == names[:1] and third.trained == names[1:]
    assert train_spy.workdirs == [*names, names[1]]
    assert evaluate_spy.workdirs == [name for name in [*names, names[1]] for _ in "12"]
    assert (out / names[1] / "metrics.jsonl").read_text() == rows_before  # resumed at its end: no new epoch
    assert study_run.read_finished_metrics(out / names[1]) is not None


def phase1_tuning_study() -> ml_collections.ConfigDict:
    """The tiny study as a tuning study of phase 1: a UR-Net enhancer pre-trained for one epoch, no phase 2."""
    study = tiny_study(seeds=(1,), models={"lr_a": {"pretrain": {"optimizer": {"lr": 1e-3}}},
                                           "lr_b": {"pretrain": {"optimizer": {"lr": 2e-2}}}})
    study.base = sweep.with_overrides(study.base, {
        "model": {"enhancer": "urnet"}, "data": {"val_fraction": 0.2}, "train": {"epochs": 0, "select_on": "val"},
        "pretrain": {"epochs": 1, "optimizer": {"name": "adamw"}}})
    study.report, study.tuning_metric = "validation", "phase1_psnr"
    study.target_range, study.target_rule = (0.0, 100.0), "highest"
    return study


def test_a_phase1_only_run_is_finished_by_its_kept_phase1_row_and_its_tuning_report_chooses_on_psnr(
        tmp_path, monkeypatch):
    """train.epochs 0: no classifier to evaluate; the kept phase-1 row goes to eval/phase1.json, which marks the
    run finished (skipped on the next call), and the tuning report reads the validation PSNR from the runs."""
    out = tmp_path / "results" / "phase1_tuning"
    evaluate_spy = Spy(runner.evaluate_run)
    monkeypatch.setattr(runner, "evaluate_run", evaluate_spy)
    first = study_run.run_study(phase1_tuning_study(), out, show_progress=False, delete_checkpoints=True)
    assert first.trained == ["lr_a-raw-seed1", "lr_b-raw-seed1"] and not first.failed
    assert evaluate_spy.workdirs == []  # no test split read
    psnrs = {}
    for name in first.trained:
        kept = json.loads((out / name / "eval" / "phase1.json").read_text())
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert kept == [row for row in rows if row["phase"] == 1 and row["best"]][-1]
        assert kept["selected_on"] == "val" and not (out / name / "eval" / "metrics.json").exists()
        assert not any(row["phase"] == 2 for row in rows)
        psnrs[name.split("-")[0]] = kept["val_psnr"]
    second = study_run.run_study(phase1_tuning_study(), out, show_progress=False)
    assert second.skipped == first.trained and not second.trained

    finished = study_results.collect_finished_runs(out)
    assert [run.name for run in finished] == first.trained and all(run.metrics == {} for run in finished)
    block = report.results_block(out)
    assert "phase-1 val PSNR (dB, kept epoch)" in block and "val accuracy" not in block
    best = max(psnrs, key=psnrs.get)
    assert f"Chosen: **{best}** (mean {psnrs[best]:.2f})." in block
    for name, psnr in psnrs.items():
        assert f"| {name} | {'0.001' if name == 'lr_a' else '0.02'} | 1 | {psnr:.2f} |" in block


def test_a_phase1_only_run_belongs_to_a_tuning_study(tmp_path):
    study = phase1_tuning_study()
    study.report = "test"
    del study["tuning_metric"], study["target_range"], study["target_rule"]
    with pytest.raises(errors.ConfigError, match="run lr_a-raw-seed1: train.epochs is 0 .* tuning study"):
        sweep.plan_runs(study, tmp_path)
    for key, value, message in (("tuning_metric", "psnr", "'tuning_metric' must be one of"),
                                ("target_rule", "lowest", "'target_rule' must be one of")):
        bad = phase1_tuning_study()
        bad[key] = value
        with pytest.raises(errors.ConfigError, match=message):
            sweep.check_study_config(bad)


# ----------------------------------------------------------------------------------------------------
# The runner's bookkeeping, with training and evaluation replaced by stand-ins.


@pytest.fixture
def fake_runs(monkeypatch):
    """trainer.train_and_evaluate / evaluate_run stand-ins: they write config.json and eval/metrics.json at once;
    a run whose seed is in `fail_seeds` raises the given error from training."""
    calls: list[str] = []
    fail_seeds: dict[int, Exception] = {}

    def fake_train(config, workdir, show_progress=True):
        workdir = pathlib.Path(workdir)
        calls.append(workdir.name)
        if config.seed in fail_seeds:
            raise fail_seeds[config.seed]
        (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config_lib.resolve_config(config).to_dict()))
        return []

    def fake_evaluate(workdir, checkpoint="best", split="test", **kwargs):
        metrics = metrics_from_confusion(np.eye(3, dtype=int) * 5 + 1, CLASSES)
        (pathlib.Path(workdir) / "eval").mkdir(exist_ok=True)
        (pathlib.Path(workdir) / "eval" / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(trainer, "train_and_evaluate", fake_train)
    monkeypatch.setattr(runner, "evaluate_run", fake_evaluate)
    return calls, fail_seeds


def test_runner_continues_after_a_failed_run_and_exits_non_zero(tmp_path, fake_runs, capsys):
    calls, fail_seeds = fake_runs
    fail_seeds[2] = errors.RunError("non-finite loss (nan) in phase 2 epoch 1 step 3")
    fail_seeds[3] = KeyError("boom")
    outcome = study_run.run_study(tiny_study(seeds=(1, 2, 3, 4)), tmp_path, show_progress=False)
    assert outcome.trained == ["tiny-raw-seed1", "tiny-raw-seed4"]
    assert outcome.failed[0] == "tiny-raw-seed2: non-finite loss (nan) in phase 2 epoch 1 step 3"
    assert outcome.failed[1].startswith("tiny-raw-seed3: KeyError: 'boom' (traceback in ")
    assert "KeyError" in (tmp_path / "tiny-raw-seed3" / "error.log").read_text()
    output = capsys.readouterr().out
    assert "[2/4] tiny-raw-seed2: FAILED after" in output and "[4/4] tiny-raw-seed4: finished in" in output

    config_file = write_tiny_study_file(tmp_path, (1, 2, 3, 4))
    assert study_cli.main(["study", "run", "--config", config_file, "--out", str(tmp_path), "--noprogress"]) == 1
    captured = capsys.readouterr()
    assert "tiny-raw-seed1: finished already, skipped" in captured.out
    assert "2 run(s) failed:" in captured.err and "tiny-raw-seed2: non-finite loss" in captured.err


@pytest.mark.parametrize("stop, expected_status, message", [
    (errors.TrainingStopped(signal.SIGTERM, "stopped by SIGTERM after a checkpoint at step 7: run the same "
                                         "command again to resume"),
     128 + signal.SIGTERM, "interrupted: stopped by SIGTERM after a checkpoint at step 7"),
    # Ctrl-C outside the training loop (e.g. while a finished run is evaluated): no empty message.
    (KeyboardInterrupt(), 128 + signal.SIGINT, "interrupted: run the same command again to resume"),
])
def test_a_stop_signal_ends_the_study_instead_of_failing_the_run(tmp_path, fake_runs, capsys, stop,
                                                                  expected_status, message):
    calls, fail_seeds = fake_runs
    fail_seeds[2] = stop
    config_file = write_tiny_study_file(tmp_path, (1, 2, 3))
    status = study_cli.main(["study", "run", "--config", config_file, "--out", str(tmp_path / "out"), "--noprogress"])
    assert status == expected_status
    assert calls == ["tiny-raw-seed1", "tiny-raw-seed2"]  # seed 3 is not started
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "tiny-raw-seed2" / "error.log").exists()


def test_runner_only_limit_and_delete_checkpoints(tmp_path, fake_runs):
    calls, _ = fake_runs
    config = tiny_study(seeds=(1, 2, 3), models={"net1": {"model": {"enhancer": "none"}}, "net3": {}})
    outcome = study_run.run_study(config, tmp_path, only=["net3-*"], limit=2, show_progress=False)
    assert outcome.trained == ["net3-raw-seed1", "net3-raw-seed2"] and outcome.not_started == ["net3-raw-seed3"]
    outcome = study_run.run_study(config, tmp_path, limit=2, delete_checkpoints=True, show_progress=False)
    assert outcome.skipped == ["net3-raw-seed1", "net3-raw-seed2"]
    assert outcome.trained == ["net1-raw-seed1", "net1-raw-seed2"]  # seed by seed, then model by model
    assert outcome.not_started == ["net1-raw-seed3", "net3-raw-seed3"]
    assert (tmp_path / "net3-raw-seed1" / "checkpoints").is_dir()  # kept by default
    assert not (tmp_path / "net1-raw-seed1" / "checkpoints").exists()
    assert (tmp_path / "net1-raw-seed1" / "eval" / "metrics.json").is_file()
    with pytest.raises(errors.ConfigError, match="matches none of the 6 runs"):
        study_run.run_study(config, tmp_path, only=["net9-*"], show_progress=False)


def standin_study(seeds=(1, 2, 3), data_seeds=(11, 11, 12)) -> ml_collections.ConfigDict:
    """The tiny study on partition 'b', each seed group starting from a classifier trained on partition 'a'."""
    study = tiny_study(seeds=seeds)
    study.base.data.partition = "b"
    study.base.data.val_fraction = 0.2
    standin = sweep.with_overrides(study.base, {"model": {"enhancer": "none"}, "data": {"partition": "a"}})
    study.pretrained_classifier = standin
    study.data_seeds = data_seeds
    study.comparisons = (("tiny", "tiny2"),)
    study.models = {"tiny": {"model": {"enhancer": "none"}}, "tiny2": {"model": {"enhancer": "none"}}}
    return study


def test_the_pretrained_classifier_is_trained_once_per_data_seed_before_the_runs_that_load_it(tmp_path, fake_runs):
    calls, fail_seeds = fake_runs
    out = tmp_path / "out"
    outcome = study_run.run_study(standin_study(), out, show_progress=False, delete_checkpoints=True)
    assert calls[:2] == ["standin_dataseed11", "standin_dataseed12"] and len(calls) == 2 + 6 and not outcome.failed
    for name in ("tiny-raw-seed1", "tiny2-raw-seed2", "tiny-raw-seed3"):
        saved = json.loads((out / name / "config.json").read_text())
        data_seed = 12 if name.endswith("3") else 11
        assert saved["data"]["seed"] == data_seed and saved["data"]["partition"] == "b"
        assert pathlib.Path(saved["model"]["pretrained"]).resolve() == (out / f"standin_dataseed{data_seed}").resolve()
        assert pathlib.Path(saved["data"]["prepared_dir"]).name == f"raw-dataseed{data_seed}"
        assert (out / name / "eval_last" / "metrics.json").is_file() and not (out / name / "checkpoints").exists()
    standin = json.loads((out / "standin_dataseed11" / "config.json").read_text())
    assert (standin["data"]["partition"], standin["data"]["seed"], standin["model"]["enhancer"]) == ("a", 11, "none")
    assert (out / "standin_dataseed11" / "checkpoints").is_dir()  # kept: the study's runs load it
    assert not (out / "standin_dataseed11" / "eval_last").exists()
    assert json.loads((out / "study.json").read_text())["comparisons"] == [["tiny", "tiny2"]]

    # --only: the stand-in of the selected runs' data seed alone; a failed stand-in stops its runs.
    calls.clear()
    fail_seeds[13] = errors.DataError("no images in partition a")
    outcome = study_run.run_study(standin_study(data_seeds=(11, 11, 13)), tmp_path / "other", only=["*-seed3"],
                                  show_progress=False)
    assert calls == ["standin_dataseed13"]
    assert outcome.failed == ["standin_dataseed13: no images in partition a",
                              "tiny-raw-seed3: its pretrained classifier standin_dataseed13 failed",
                              "tiny2-raw-seed3: its pretrained classifier standin_dataseed13 failed"]


def test_a_stand_in_without_its_checkpoints_is_trained_again_and_study_runs_are_not(tmp_path, fake_runs, capsys,
                                                                                    monkeypatch):
    """A fresh clone holds a stand-in's committed results but not its checkpoints, which the study's runs
    load: the study trains the stand-in again (saying so, with the recorded numbers); a finished study run
    without checkpoints stays finished; a retraining stopped halfway trains again; a borrowed stand-in without
    checkpoints is a one-line error."""
    calls, _ = fake_runs
    out = tmp_path / "out"
    study_run.run_study(standin_study(), out, only=["*-seed1"], show_progress=False, delete_checkpoints=True)
    shutil.rmtree(out / "standin_dataseed11" / "checkpoints")
    assert not (out / "tiny-raw-seed1" / "checkpoints").exists()
    calls.clear()
    capsys.readouterr()
    outcome = study_run.run_study(standin_study(), out, only=["*-seed1"], show_progress=False)
    assert calls == ["standin_dataseed11"] and outcome.trained == ["standin_dataseed11"] and not outcome.failed
    assert outcome.skipped == ["tiny-raw-seed1", "tiny2-raw-seed1"]
    printed = capsys.readouterr().out
    assert ("standin_dataseed11: its results are here but not the checkpoints the study's runs load: training it "
            "again (test accuracy") in printed and "(recorded before: test accuracy" in printed
    assert (out / "standin_dataseed11" / "checkpoints").is_dir()
    # A retraining stopped halfway (checkpoints written, no evaluation) is not finished: it trains again.
    shutil.rmtree(out / "standin_dataseed11" / "checkpoints")
    fake_train = trainer.train_and_evaluate

    def stopped_halfway(config, workdir, show_progress=True):
        (pathlib.Path(workdir) / "checkpoints").mkdir()
        raise errors.RunError("stopped halfway")

    monkeypatch.setattr(trainer, "train_and_evaluate", stopped_halfway)
    outcome = study_run.run_study(standin_study(), out, only=["*-seed1"], show_progress=False)
    assert outcome.failed[0] == "standin_dataseed11: stopped halfway"
    assert not (out / "standin_dataseed11" / "eval" / "metrics.json").exists()
    monkeypatch.setattr(trainer, "train_and_evaluate", fake_train)
    calls.clear()
    assert study_run.run_study(standin_study(), out, only=["*-seed1"], show_progress=False).trained == [
        "standin_dataseed11"] and calls == ["standin_dataseed11"]
    calls.clear()  # now complete: nothing to train
    assert study_run.run_study(standin_study(), out, only=["*-seed1"], show_progress=False).trained == [] and not calls
    shutil.rmtree(out / "standin_dataseed11" / "checkpoints")
    borrower = standin_study()
    borrower.standins_dir = str(out)
    with pytest.raises(errors.ConfigError, match="standin_dataseed11 is not a finished run with its checkpoints"):
        study_run.run_study(borrower, tmp_path / "tuning", only=["*-seed1"], show_progress=False)
    assert not calls


def test_a_study_can_load_the_stand_ins_of_another_studys_folder(tmp_path, fake_runs):
    """standins_dir: the runs load the owner's finished stand-ins, none is trained; a missing or differently
    configured stand-in is a one-line ConfigError before any run starts."""
    calls, _ = fake_runs
    owner = tmp_path / "owner"
    study_run.run_study(standin_study(), owner, only=["tiny-*-seed1"], show_progress=False)
    calls.clear()
    borrower = standin_study()
    borrower.standins_dir = str(owner)
    outcome = study_run.run_study(borrower, tmp_path / "tuning", only=["*-seed1", "*-seed2"], show_progress=False)
    assert calls == ["tiny-raw-seed1", "tiny2-raw-seed1", "tiny-raw-seed2", "tiny2-raw-seed2"] and not outcome.failed
    saved = json.loads((tmp_path / "tuning" / "tiny-raw-seed1" / "config.json").read_text())
    assert pathlib.Path(saved["model"]["pretrained"]).resolve() == (owner / "standin_dataseed11").resolve()
    assert not (tmp_path / "tuning" / "standin_dataseed11").exists()
    with pytest.raises(errors.ConfigError, match="standin_dataseed12 is not a finished run"):
        study_run.run_study(borrower, tmp_path / "tuning", only=["*-seed3"], show_progress=False)
    other = standin_study()
    other.pretrained_classifier.optimizer.lr = 0.5
    other.standins_dir = str(owner)
    with pytest.raises(errors.ConfigError, match="trained with another configuration"):
        study_run.run_study(other, tmp_path / "tuning2", only=["*-seed1"], show_progress=False)
    alone = tiny_study()
    alone.standins_dir = str(owner)
    with pytest.raises(errors.ConfigError, match="needs 'pretrained_classifier'"):
        study_run.run_study(alone, tmp_path / "tuning3", show_progress=False)


def test_external_sets_are_evaluated_for_the_model_variants_they_name(tmp_path, fake_runs, monkeypatch, pbc_dir):
    """configs/cross_lab.py's shape: every run evaluated on an external set, the BatchNorm ones also with
    adapted statistics; the test split's metrics.json is written last (it marks the run finished)."""
    calls, _ = fake_runs
    evaluated = []

    def fake_external(workdir, data_dir, class_map=None, name=None, adapt_bn=False, **kwargs):
        assert not (pathlib.Path(workdir) / "eval" / "metrics.json").exists()
        evaluated.append((pathlib.Path(workdir).name, name, class_map, adapt_bn))
        return {}, {}

    monkeypatch.setattr(runner, "evaluate_external", fake_external)
    study = tiny_study(seeds=(1,), models={"tiny": {}, "tiny_gn": {"model": {"norm": "group"}}})
    study.external = {"lab": {"data_dir": str(tmp_path), "class_map": "wbc3"},
                      "lab_adapted": {"data_dir": str(tmp_path), "class_map": "wbc3", "adapt_bn": True,
                                      "models": ("tiny",)}}
    outcome = study_run.run_study(study, tmp_path / "out", show_progress=False)
    assert not outcome.failed and len(calls) == 2
    assert sorted(evaluated) == [("tiny-raw-seed1", "lab", "wbc3", False),
                                 ("tiny-raw-seed1", "lab_adapted", "wbc3", True),
                                 ("tiny_gn-raw-seed1", "lab", "wbc3", False)]
    recorded = json.loads((tmp_path / "out" / "study.json").read_text())["external"]["lab"]["data_dir"]
    assert not pathlib.Path(recorded).is_absolute() and pathlib.Path(recorded).resolve() == tmp_path.resolve()
    study.external.lab_adapted.models = ("unknown",)
    with pytest.raises(errors.ConfigError, match="external set lab_adapted: 'models' must name model variants"):
        sweep.plan_runs(study, tmp_path)
    cross_lab = cli.load_config_file(str(REPO_ROOT / "configs" / "cross_lab.py"))
    runs = sweep.plan_runs(cross_lab, tmp_path / "prepared")
    assert len(runs) == 6 * 3 and {run.config.train.select_on for run in runs} == {"val"}
    assert "tecom_adapt_bn" not in sweep.external_sets(cross_lab, "groupnorm")
    assert set(sweep.external_sets(cross_lab, "crop")) == {"tecom", "tecom_adapt_bn"}


def test_study_config_checks_the_pretrained_classifier_and_seed_groups(tmp_path):
    same_half = standin_study()
    same_half.pretrained_classifier.data.partition = "b"
    with pytest.raises(errors.ConfigError, match="two halves of the training split"):
        sweep.plan_runs(same_half, tmp_path)
    other_width = standin_study()
    other_width.pretrained_classifier.model.classifier_width = 8
    with pytest.raises(errors.ConfigError,
                       match="run tiny-raw-seed1: the pretrained classifier's model.classifier_width 8"):
        sweep.plan_runs(other_width, tmp_path)
    with pytest.raises(errors.ConfigError, match="'data_seeds' must give one integer >= 0 per seed"):
        sweep.plan_runs(standin_study(data_seeds=(1, 2)), tmp_path)
    unknown = standin_study()
    unknown.comparisons = (("tiny", "net9"),)
    with pytest.raises(errors.ConfigError, match="'comparisons' must pair two distinct model variants"):
        sweep.plan_runs(unknown, tmp_path)


def test_a_finished_run_of_another_configuration_is_reported_not_skipped(tmp_path, fake_runs):
    calls, _ = fake_runs
    study_run.run_study(tiny_study(seeds=(1,)), tmp_path, show_progress=False)
    changed = tiny_study(seeds=(1,))
    changed.base.train.epochs = 5
    outcome = study_run.run_study(changed, tmp_path, show_progress=False)
    assert outcome.failed == ["tiny-raw-seed1: finished with another configuration (train.epochs: 1 != 5)"]
    assert calls == ["tiny-raw-seed1"]
    # Phase 1's settings do not count for a run without phase 1 (the tiny model has no enhancer), nor the
    # severe proxy's strength for a run on raw images ...
    calls.clear()
    other_phase1 = tiny_study(seeds=(1,))
    other_phase1.base.pretrain.optimizer.lr = 0.5
    other_phase1.base.data.severe_contrast = (0.2, 0.3)
    assert study_run.run_study(other_phase1, tmp_path, show_progress=False).skipped == ["tiny-raw-seed1"]
    # ... but do for one with it.
    enhanced = {"pre": {"model": {"enhancer": "urnet"}, "pretrain": {"epochs": 1}}}
    study_run.run_study(tiny_study(seeds=(1,), models=enhanced), tmp_path, show_progress=False)
    other_phase1 = tiny_study(seeds=(1,), models=enhanced)
    other_phase1.base.pretrain.optimizer.lr = 0.5
    outcome = study_run.run_study(other_phase1, tmp_path, show_progress=False)
    assert len(outcome.failed) == 1 and "pretrain.optimizer.lr" in outcome.failed[0]


# ----------------------------------------------------------------------------------------------------
# Config composition and naming.


def test_study_cpu_composes_the_ablation_from_the_net_configs(tmp_path):
    config = cli.load_config_file(str(REPO_ROOT / "configs" / "study_cpu.py"))
    assert config.models.to_dict() == {
        "net1": {"model": {"enhancer": "none"}, "pretrain": {"epochs": 0}},
        "net2": {"model": {"enhancer": "resunet"}, "pretrain": {"epochs": 0}},
        "net3": {"pretrain": {"epochs": 0}},
        "net4": {},
    }
    for name in sweep.ABLATION_MODELS:  # the overrides over base_config() give back configs/netK.py
        rebuilt = sweep.with_overrides(base_config(), config.models[name])
        assert rebuilt.to_dict() == cli.load_config_file(str(REPO_ROOT / "configs" / f"{name}.py")).to_dict()
    assert config.base.data.dir == str(REPO_ROOT.parent / "shared" / "data" / "pbc")

    runs = sweep.plan_runs(config, tmp_path / "prepared", data_dir=str(tmp_path))
    assert len(runs) == 24
    assert [run.name for run in runs[:9]] == [
        "net1-raw-seed1", "net2-raw-seed1", "net3-raw-seed1", "net4-raw-seed1", "net1-stainfree_proxy-seed1",
        "net2-stainfree_proxy-seed1", "net3-stainfree_proxy-seed1", "net4-stainfree_proxy-seed1", "net1-raw-seed2"]
    by_name = {run.name: run.config for run in runs}
    net1, net4 = by_name["net1-raw-seed1"], by_name["net4-stainfree_proxy-seed3"]
    assert (net1.model.enhancer, net1.pretrain.epochs) == ("none", 0)
    assert (by_name["net2-raw-seed1"].model.enhancer, by_name["net2-raw-seed1"].pretrain.epochs) == ("resunet", 0)
    assert (by_name["net3-raw-seed1"].model.enhancer, by_name["net3-raw-seed1"].pretrain.epochs) == ("urnet", 0)
    assert (net4.model.enhancer, net4.pretrain.epochs, net4.seed, net4.data.variant) == (
        "urnet", config.base.pretrain.epochs, 3, "stainfree_proxy")
    assert net4.pretrain.epochs > 0
    assert net4.data.prepared_dir == str((tmp_path / "prepared" / "stainfree_proxy").resolve())
    assert {run.config.data.seed for run in runs} == {config.base.data.seed}  # one split for every run
    for run in runs:  # one protocol: runs differ only in the model variant's keys, seed, data variant and folders
        assert {line.split(":")[0] for line in config_lib.config_differences(config.base.to_dict(), run.config.to_dict())
                } <= {"model.enhancer", "pretrain.epochs", "seed", "data.variant", "data.dir", "data.prepared_dir"}
        assert run.config.model.classifier == "resnet18" and run.config.data.image_size == 96
    gpu = sweep.plan_runs(cli.load_config_file(str(REPO_ROOT / "configs" / "study_gpu.py")), tmp_path, str(tmp_path))
    assert len(gpu) == 24 and gpu[0].config.model.classifier == "resnet101" and gpu[0].config.data.image_size == 200
    # The follow-up differs from study_cpu in the schedule and in running the proxy alone.
    cosine = cli.load_config_file(str(REPO_ROOT / "configs" / "study_cpu_cosine.py"))
    assert config_lib.config_differences(config.base.to_dict(), cosine.base.to_dict()) == [
        "optimizer.schedule: 'constant' != 'cosine'", "pretrain.optimizer.schedule: 'constant' != 'cosine'"]
    assert cosine.models.to_dict() == config.models.to_dict() and tuple(cosine.data_variants) == ("stainfree_proxy",)
    assert (cosine.seeds, cosine.subset_per_class, cosine.baseline) == (config.seeds, config.subset_per_class, "study_cpu")


def test_study_wbcatt_is_the_validated_protocol_with_a_pretrained_stand_in(tmp_path, pbc_dir):
    """configs/study_wbcatt.py: the WBCAtt split, selection on validation, the stand-in on the other half of
    the training split in two seed groups, five seeds, the controls and the paired comparisons."""
    from urnet_jax.models import conv_frontend

    study = cli.load_config_file(str(REPO_ROOT / "configs" / "study_wbcatt.py"))
    standin = cli.load_config_file(str(REPO_ROOT / "configs" / "pretrain_standin.py"))
    # The stand-in's config but for the XLA option set, which the study pins for every run (its first runs').
    assert study.pretrained_classifier.to_dict() == {**standin.to_dict(), "xla_cpu_options": "no_ynnpack"}
    assert study.base.xla_cpu_options == "no_ynnpack"
    runs = sweep.plan_runs(study, tmp_path / "prepared", out_dir=tmp_path / "out")
    # Seven models on the three data variants, and the paired-target control on the two proxies only.
    assert len(runs) == (7 * 3 + 2) * 5 and len(study.seeds) >= 5
    assert {run.data_variant for run in runs} == {"raw", "stainfree_proxy", "severe_proxy"}
    assert {run.data_variant for run in runs if run.model == "net4_stained"} == {"stainfree_proxy", "severe_proxy"}
    for run in runs:
        config = run.config
        assert config.train.select_on == "val" and config.data.split_dir == standin.data.split_dir
        assert config.xla_cpu_options == "no_ynnpack"
        assert (config.data.partition, standin.data.partition) == ("b", "a")
        assert config.model.classifier == standin.model.classifier and config.data.image_size == standin.data.image_size
        assert config.optimizer.schedule == "cosine" and config.optimizer.warmup_steps > 0
        assert config.optimizer.clip_norm > 0 and config.data.online_augment
        assert pathlib.Path(config.model.pretrained).name == f"standin_dataseed{config.data.seed}"
    assert {run.config.data.seed for run in runs} == {1, 2}  # two partitions (seed groups)
    by_name = {run.name: run.config for run in runs}
    assert by_name["net3-raw-seed1"].model.enhancer_output == "residual"
    assert by_name["net4-raw-seed1"].pretrain.epochs > 0 and by_name["net3-raw-seed1"].pretrain.epochs == 0
    # The extra-layers control: a plain front end far smaller than the parameter-matched one (its cost on a CPU).
    assert 0 < by_name["conv_frontend-raw-seed1"].model.enhancer_width < conv_frontend.width_matching_urnet(
        by_name["net4-raw-seed1"].model.enhancer_width)
    assert by_name["clahe-raw-seed1"].data.preprocessing == "clahe"
    # The paired-target control is Net4 but for phase 1's target: RSGUNet's stained originals.
    net4, stained = (config_lib.flatten(by_name[f"{name}-severe_proxy-seed1"].to_dict())
                     for name in ("net4", "net4_stained"))
    assert {key for key in net4 if net4[key] != stained[key]} == {"data.target", "data.prepared_dir"}
    assert stained["data.target"] == by_name["rsgunet-severe_proxy-seed1"].data.target == "stained"
    assert [run.name for run in sweep.plan_standins(study, tmp_path)] == ["standin_dataseed1", "standin_dataseed2"]
    assert tuple(study.comparisons[0]) == ("net4", "net1")
    rule = rules.decision_rule(study.decision_rule, models=list(study.models))  # docs/RESULTS.md's rule
    assert (rule.effect, rule.controls) == (("net4", "net1"), (("net4", "conv_frontend"), ("net4", "clahe")))
    assert (rule.metric, rule.epoch, rule.margin, rule.min_seeds) == ("balanced_accuracy", "selected", 1.5, 5)
    assert set(rule.claim_variants) == {"stainfree_proxy", "severe_proxy"}


def test_severe_tuning_runs_net1_of_the_study_at_each_strength_and_reports_validation_only(tmp_path, pbc_dir):
    """configs/severe_tuning.py: every candidate is the study's net1 run on severe_proxy but for data.severe_*,
    starting from the study's own stand-in; its report is the validation-only one."""
    tuning = cli.load_config_file(str(REPO_ROOT / "configs" / "severe_tuning.py"))
    study = cli.load_config_file(str(REPO_ROOT / "configs" / "study_wbcatt.py"))
    net1 = {run.seed: run.config for run in sweep.plan_runs(study, tmp_path, out_dir=tmp_path / "study")
            if run.name.startswith("net1-severe_proxy-")}
    assert tuning.report == "validation" and tuple(tuning.target_range) == (65.0, 75.0)
    assert tuning.standins_dir == "results/study_wbcatt" and len(tuning.models) >= 3
    candidates = sweep.plan_runs(tuning, tmp_path, out_dir=tmp_path / "study")
    assert len({tuple(run.config.data.severe_contrast) for run in candidates}) == len(tuning.models)
    for run in candidates:
        differences = {key for key, value in config_lib.flatten(run.config.to_dict()).items()
                       if value != config_lib.flatten(net1[run.seed].to_dict()).get(key)}
        assert differences <= {"data.severe_contrast", "data.severe_blur_sigma", "data.severe_noise_std",
                               "data.prepared_dir"}
    with pytest.raises(errors.ConfigError, match="target_range"):
        sweep.check_study_config(ml_collections.ConfigDict({**tuning.to_dict(), "target_range": (75.0, 65.0)}))


def test_the_study_uses_the_severe_proxy_strength_its_committed_tuning_chose():
    """configs/study_wbcatt.py's data.severe_* are the candidate that results/severe_tuning's validation numbers
    choose (the same rule as its report), so neither can change without the other."""
    from urnet_jax.study import tuning as tuning_lib

    folder = REPO_ROOT / "results" / "severe_tuning"
    runs = study_results.collect_finished_runs(folder)
    if not runs:
        pytest.skip("results/severe_tuning holds no finished run")
    config = cli.load_config_file(str(REPO_ROOT / "configs" / "severe_tuning.py"))
    means = tuning_lib.candidate_means(tuning_lib.validation_by_candidate(folder, runs))
    chosen = tuning_lib.choose(means, config.target_range)
    assert chosen is not None, f"no tuning candidate inside {tuple(config.target_range)}: {means}"
    study = cli.load_config_file(str(REPO_ROOT / "configs" / "study_wbcatt.py"))
    for key, value in config.models[chosen].data.items():
        assert tuple(study.base.data[key]) == tuple(value), key


# Phase-1 tuning configs: (file, the study's model and data variant whose seed-1 run each candidate is).
PHASE1_TUNINGS = [("phase1_tuning", "net4", "raw", 1), ("phase1_tuning_rsgunet", "rsgunet", "severe_proxy", 1),
                  ("phase1_tuning_net4_stained", "net4_stained", "severe_proxy", 4)]


@pytest.mark.parametrize("config_name, model, data_variant, seed", PHASE1_TUNINGS)
def test_phase1_tuning_runs_a_model_of_the_study_phase1_only_at_each_learning_rate(tmp_path, config_name, model,
                                                                                    data_variant, seed, pbc_dir):
    """configs/phase1_tuning*.py: every candidate is the study's <model>-<variant>-seed<seed> (its data seed and
    stand-in) but for train.epochs (0) and phase 1's learning rate, chosen by the highest validation PSNR inside
    the config's target range."""
    tuning = cli.load_config_file(str(REPO_ROOT / "configs" / f"{config_name}.py"))
    study = cli.load_config_file(str(REPO_ROOT / "configs" / "study_wbcatt.py"))
    reference = next(run.config for run in sweep.plan_runs(study, tmp_path, out_dir=tmp_path / "study")
                     if run.name == f"{model}-{data_variant}-seed{seed}")
    assert (tuning.report, tuning.tuning_metric, tuning.target_rule) == ("validation", "phase1_psnr", "highest")
    assert tuning.standins_dir == "results/study_wbcatt"
    assert tuning.target_range[0] <= reference.pretrain.min_psnr
    candidates = sweep.plan_runs(tuning, tmp_path, out_dir=tmp_path / "study")
    assert len({run.config.pretrain.optimizer.lr for run in candidates}) == len(tuning.models) >= 3
    for run in candidates:
        differences = {key for key, value in config_lib.flatten(run.config.to_dict()).items()
                       if value != config_lib.flatten(reference.to_dict()).get(key)}
        # data.prepared_dir: a model variant that changes data.* prepares into '<variant>-dataseed<k>-<candidate>'.
        assert "train.epochs" in differences <= {"train.epochs", "pretrain.optimizer.lr", "data.prepared_dir"}


@pytest.mark.parametrize("config_name, model, data_variant, seed", PHASE1_TUNINGS)
def test_the_study_uses_the_phase1_learning_rate_its_committed_tuning_chose(tmp_path, config_name, model,
                                                                            data_variant, seed, pbc_dir):
    """configs/study_wbcatt.py's phase-1 learning rate of <model> is the candidate that
    results/<config_name>'s validation PSNRs choose (the rule of its report)."""
    from urnet_jax.study import tuning as tuning_lib

    folder = REPO_ROOT / "results" / config_name
    runs = study_results.collect_finished_runs(folder)
    if not runs:
        pytest.skip(f"results/{config_name} holds no finished run")
    config = cli.load_config_file(str(REPO_ROOT / "configs" / f"{config_name}.py"))
    means = tuning_lib.candidate_means(tuning_lib.validation_by_candidate(folder, runs), config.tuning_metric)
    chosen = tuning_lib.choose(means, config.target_range, config.target_rule)
    assert chosen is not None, f"no phase-1 candidate inside {tuple(config.target_range)}: {means}"
    study = cli.load_config_file(str(REPO_ROOT / "configs" / "study_wbcatt.py"))
    model_runs = [run for run in sweep.plan_runs(study, tmp_path, out_dir=tmp_path / "study")
                  if run.name.startswith(f"{model}-")]
    assert model_runs, f"the study plans no run of {model}"
    for run in model_runs:
        assert run.config.pretrain.optimizer.lr == config.models[chosen].pretrain.optimizer.lr, run.name


def test_a_study_runs_a_model_only_on_the_data_variants_it_names(tmp_path):
    study = tiny_study(models={"tiny": {"model": {"enhancer": "none"}}, "other": {"model": {"enhancer": "none"}}})
    study.data_variants = ("raw", "stainfree_proxy")
    assert len(sweep.plan_runs(study, tmp_path)) == 8
    study.model_data_variants = {"other": ("stainfree_proxy",)}
    assert sorted(run.name for run in sweep.plan_runs(study, tmp_path)) == [
        "other-stainfree_proxy-seed1", "other-stainfree_proxy-seed2", "tiny-raw-seed1", "tiny-raw-seed2",
        "tiny-stainfree_proxy-seed1", "tiny-stainfree_proxy-seed2"]
    for bad in ({"other": ("severe_proxy",)}, {"missing": ("raw",)}, {"other": ()}):
        study.model_data_variants = bad
        with pytest.raises(errors.ConfigError, match="study 'model_data_variants' must map model variants"):
            sweep.plan_runs(study, tmp_path)


def test_bad_study_configs_give_one_line_errors(tmp_path):
    bad_key = tiny_study(models={"net1": {"model": {"enhancerr": "none"}}})
    with pytest.raises(errors.ConfigError, match="model variant net1: unknown config key model.enhancerr"):
        sweep.plan_runs(bad_key, tmp_path)
    bad_variant = tiny_study()
    bad_variant.data_variants = ("raw", "stain-free")
    with pytest.raises(errors.ConfigError, match="unknown data variant 'stain-free'"):
        sweep.plan_runs(bad_variant, tmp_path)
    with pytest.raises(errors.ConfigError, match="seeds' must be distinct"):
        sweep.plan_runs(tiny_study(seeds=(1, 1)), tmp_path)
    bad_value = tiny_study(models={"net1": {"train": {"epochs": -1}}})
    with pytest.raises(errors.ConfigError, match="run net1-raw-seed1: train.epochs must be an integer >= 0"):
        sweep.plan_runs(bad_value, tmp_path)


def test_study_configs_are_data(tmp_path):
    """configs/study_*.py import nothing from urnet_jax, and loading one loads no code that trains,
    evaluates or reports (only the config schema, through configs/net4.py)."""
    files = sorted((REPO_ROOT / "configs").glob("study_*.py"))
    assert len(files) == 4
    for path in files:
        imported = [alias.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import)
                    for alias in node.names]
        imported += [node.module or "" for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom)]
        assert not [name for name in imported if name.split(".")[0] == "urnet_jax"], (path.name, imported)
    code = ("import runpy, sys\n"
            f"for path in {[str(path) for path in files]!r}:\n"
            "    assert runpy.run_path(path)['get_config']().models\n"
            "print(' '.join(sorted(name for name in sys.modules if name.startswith('urnet_jax'))))\n")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                            timeout=120).stdout.split()
    running = ("urnet_jax.study", "urnet_jax.trainer", "urnet_jax.evaluation", "urnet_jax.data",
               "urnet_jax.steps", "urnet_jax.workdir")
    assert "urnet_jax.config" in loaded and not [name for name in loaded if name.startswith(running)], loaded


def test_run_command_line_overrides_change_the_study_config(tmp_path, fake_runs, capsys):
    """`--config.KEY=VALUE` through ml_collections' config_flags (as train.py takes them), the nested run
    config `base` included; an unknown key, a wrong type, a stray flag or command is one line on stderr and
    exit status 2, and nothing runs."""
    calls, _ = fake_runs
    common = ["study", "run", "--config", write_tiny_study_file(tmp_path, (1, 2, 3)), "--out", str(tmp_path / "out"),
              "--noprogress"]
    assert study_cli.main([*common, "--config.seeds=(2,)", "--config.base.train.epochs=3",
                           "--config.base.model.classifier=resnet34"]) == 0
    assert calls == ["tiny-raw-seed2"]
    written = json.loads((tmp_path / "out" / "tiny-raw-seed2" / "config.json").read_text())
    assert (written["train"]["epochs"], written["model"]["classifier"]) == (3, "resnet34")
    assert study_cli.main([*common, "--config.seeds=(3,)", "--config.models.tiny.model.enhancer=unet"]) == 0
    written = json.loads((tmp_path / "out" / "tiny-raw-seed3" / "config.json").read_text())
    assert written["model"]["enhancer"] == "unet"  # a model variant's override, from the command line
    calls.clear()
    for arguments, message in (
            (["--config.base.train.epochz=3"], "error: unknown config key base.train.epochz"),
            (["--config.base.train.epochs=many"], "base.train.epochs=many"),
            (["--config.base.train=3"], "--config.base.train=3"),
            (["--limit=0"], "--limit=0"),
            (["--verbose"], "Unknown command line flag 'verbose'"),
            (["extra"], "unexpected argument(s): extra")):
        with pytest.raises(SystemExit) as exit_info:
            study_cli.main([*common, *arguments])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1, error
    for argv, message in ((["study", "train"], "expected the command run or report, got train"),
                          (["study", "run", "--out", "x"], "--config must have a value")):
        with pytest.raises(SystemExit) as exit_info:
            study_cli.main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1, error
    assert calls == []  # nothing ran on a bad command line
    assert study_cli.main(["study", "run", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "--[no]delete-checkpoints" in shown and "--only" in shown and "flags of report" not in shown


def test_link_subset_draws_per_class_links_once(tmp_path):
    source = tmp_path / "pbc"
    for folder, count in (("neutrophil", 6), ("eosinophil", 4), ("monocyte", 5), ("lymphocyte", 2)):
        (source / folder).mkdir(parents=True)
        for i in range(count):
            (source / folder / f"{folder}_{i}.jpg").write_bytes(f"{folder}{i}".encode())
    out = study_run.link_subset(source, "wbc3", 3, 0, tmp_path / "subset")
    links = sorted(p.relative_to(out) for p in out.rglob("*.jpg"))
    by_class = {name: [p for p in links if p.parts[0] in folders] for name, folders in
                {"granulocyte": ("neutrophil", "eosinophil"), "monocyte": ("monocyte",),
                 "lymphocyte": ("lymphocyte",)}.items()}
    assert {name: len(files) for name, files in by_class.items()} == {"granulocyte": 3, "monocyte": 3, "lymphocyte": 2}
    for link in links:
        assert (out / link).is_symlink() and (out / link).resolve() == (source / link).resolve()
    stamp_time = (out / ".subset.json").stat().st_mtime_ns
    assert study_run.link_subset(source, "wbc3", 3, 0, out) == out  # reused as it is
    assert (out / ".subset.json").stat().st_mtime_ns == stamp_time
    study_run.link_subset(source, "wbc3", 4, 0, out)
    assert len(list(out.rglob("*.jpg"))) == 4 + 4 + 2
    # Concurrent callers take turns: a second one waits while the lock beside out_dir is held.
    waiting = threading.Thread(target=study_run.link_subset, args=(source, "wbc3", 3, 0, out))
    with exclusive_lock(tmp_path / ".subset.lock"):
        waiting.start()
        waiting.join(timeout=2.0)
        assert waiting.is_alive() and len(list(out.rglob("*.jpg"))) == 4 + 4 + 2
    waiting.join(timeout=60)
    assert len(list(out.rglob("*.jpg"))) == 3 + 3 + 2


# ----------------------------------------------------------------------------------------------------
# The report.


def write_run(results: pathlib.Path, name: str, metrics: dict, enhancer: str = "urnet", pretrain: int = 0) -> None:
    model, variant, seed = re.match(r"(\w+)-(\w+)-seed(\d+)", name).groups()
    config = base_config()
    config.seed, config.data.variant = int(seed), variant
    config.model.enhancer, config.pretrain.epochs = enhancer, pretrain
    (results / name / "eval").mkdir(parents=True)
    (results / name / "config.json").write_text(json.dumps(config.to_dict()))
    (results / name / "metrics.jsonl").write_text("")
    (results / name / "eval" / "metrics.json").write_text(json.dumps(metrics))


def random_metrics(rng: np.random.Generator) -> dict:
    return metrics_from_confusion(rng.integers(1, 60, size=(3, 3)) + np.eye(3, dtype=int) * 80, CLASSES)


def table_rows(block: str, variant: str) -> dict[str, list[str]]:
    """{row label: cells} of the Table-3 layout (the first table) of one data variant in a generated block."""
    section = block.split(f"data variant `{variant}`")[1].split("####")[0]
    first_table = next(chunk for chunk in section.split("\n\n") if chunk.startswith("|"))
    lines = [line for line in first_table.splitlines() if line.startswith("| ")]
    return {cells[0]: cells[1:] for cells in (line[2:-2].split(" | ") for line in lines)}


@pytest.fixture
def results(tmp_path) -> tuple[pathlib.Path, dict[str, dict]]:
    """A hand-made results folder: net1 x 3 seeds, net4 x 2 seeds (raw), net4 x 1 seed (proxy), one
    unfinished run and one unrelated folder."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "results" / "hand_made"
    metrics = {}
    for name in ("net1-raw-seed1", "net1-raw-seed2", "net1-raw-seed3", "net4-raw-seed1", "net4-raw-seed2",
                 "net4-stainfree_proxy-seed1"):
        metrics[name] = random_metrics(rng)
        write_run(folder, name, metrics[name], "none" if name.startswith("net1") else "urnet",
                  0 if name.startswith("net1") else 3)
    (folder / "net4-raw-seed3").mkdir()  # unfinished: no eval/metrics.json
    (folder / "_prepared" / "raw").mkdir(parents=True)
    return folder, metrics


def test_report_gives_mean_and_std_over_seeds(results):
    folder, metrics = results
    block = report.results_block(folder)
    assert block.startswith("<!-- results:begin hand_made -->") and block.endswith("<!-- results:end hand_made -->")
    raw = table_rows(block, "raw")
    assert raw[""] == ["Net1", "Net4"]
    assert raw["enhancer"] == ["none", "UR-Net"] and raw["enhancer pre-training epochs (phase 1)"] == ["0", "3"]
    assert raw["finished seeds"] == ["3", "2"]

    def expected(runs: list[str], pick) -> str:
        values = [100 * pick(metrics[name]) for name in runs]
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    net1 = ["net1-raw-seed1", "net1-raw-seed2", "net1-raw-seed3"]
    net4 = ["net4-raw-seed1", "net4-raw-seed2"]
    for label, pick in (("recall monocyte", lambda m: m["per_class"]["monocyte"]["recall"]),
                        ("precision lymphocyte", lambda m: m["per_class"]["lymphocyte"]["precision"]),
                        ("F1 granulocyte", lambda m: m["per_class"]["granulocyte"]["f1"]),
                        ("recall average", lambda m: m["macro"]["recall"]),
                        ("F1 average", lambda m: m["macro"]["f1"]),
                        ("test accuracy", lambda m: m["accuracy"])):
        assert raw[label] == [expected(net1, pick), expected(net4, pick)], label
    assert raw["test accuracy, last epoch (not selected)"] == ["n/a", "n/a"]  # empty metrics.jsonl files
    assert len(raw) == 1 + 2 + 13 + 2 + 1  # header, descriptions, the paper's 13 rows, unselected accuracy, seeds

    proxy = table_rows(block, "stainfree_proxy")
    single = metrics["net4-stainfree_proxy-seed1"]
    assert proxy[""] == ["Net1", "Net4"] and proxy["finished seeds"] == ["0", "1"]
    assert proxy["test accuracy"] == ["n/a", f"{100 * single['accuracy']:.2f}"]  # one seed: no ±
    assert block.index("data variant `raw`") < block.index("data variant `stainfree_proxy`")


def test_report_counts_the_finished_runs_of_the_study_config(results):
    folder, _ = results
    assert "| data variant |" not in report.results_block(folder)  # no study.json: nothing planned to count
    (folder / "study.json").write_text(json.dumps({"models": {"net4": {}, "net1": {}, "net2": {}},
                                                   "data_variants": ["raw", "stainfree_proxy"], "seeds": [1, 2, 3]}))
    block = report.results_block(folder)
    table = block.split("| data variant |")[1].split("\n\n")[0]
    rows = {cells[0]: cells[1:] for cells in (line[2:-2].split(" | ") for line in table.splitlines()[2:])}
    assert table.splitlines()[0] == " Net1 | Net2 | Net4 | finished |"
    # net4-raw-seed3 is unfinished (no metrics), so it is not counted.
    assert rows == {"`raw`": ["3/3", "0/3", "2/3 (1, 2)", "5/9"],
                    "`stainfree_proxy`": ["0/3", "0/3", "1/3 (1)", "1/9"]}
    assert "Finished runs of the study config (seeds in brackets where some are missing): 6 of 18." in block

    # A model the study runs on some data variants only: a dash elsewhere, and fewer runs planned.
    (folder / "study.json").write_text(json.dumps({"models": {"net4": {}, "net1": {}, "net2": {}},
                                                   "data_variants": ["raw", "stainfree_proxy"], "seeds": [1, 2, 3],
                                                   "model_data_variants": {"net2": ["stainfree_proxy"]}}))
    block = report.results_block(folder)
    table = block.split("| data variant |")[1].split("\n\n")[0]
    rows = {cells[0]: cells[1:] for cells in (line[2:-2].split(" | ") for line in table.splitlines()[2:])}
    assert rows == {"`raw`": ["3/3", report.NOT_PLANNED, "2/3 (1, 2)", "5/6"],
                    "`stainfree_proxy`": ["0/3", "0/3", "1/3 (1)", "1/9"]}
    assert (f"(seeds in brackets where some are missing; {report.NOT_PLANNED}: a model the study does not run on "
            "that data variant): 6 of 15.") in block
    # A variant's tables have no column for a model the study does not run there, unless it has runs there.
    assert table_rows(block, "stainfree_proxy")[""] == ["Net1", "Net4"]  # net2 has no run at all
    (folder / "study.json").write_text(json.dumps({"models": {"net4": {}, "net1": {}}, "data_variants": ["raw",
                                                   "stainfree_proxy"], "seeds": [1, 2, 3],
                                                   "model_data_variants": {"net1": ["raw"], "net4": ["raw"]}}))
    block = report.results_block(folder)
    assert table_rows(block, "stainfree_proxy")[""] == ["Net4"]  # net1: not planned, no run; net4: a run
    assert table_rows(block, "raw")[""] == ["Net1", "Net4"]


def test_report_writes_between_markers_and_check_detects_tampering(results, tmp_path, capsys):
    folder, _ = results
    document = tmp_path / "RESULTS.md"
    document.write_text("# Results\n\nhand-written intro\n\n<!-- results:begin hand_made -->\nold tables\n"
                        "<!-- results:end hand_made -->\n\nhand-written reading\n")
    assert study_cli.main(["study", "report", str(folder), "--out", str(document)]) == 0
    text = document.read_text()
    assert text.startswith("# Results\n\nhand-written intro\n\n<!-- results:begin hand_made -->")
    assert text.endswith("<!-- results:end hand_made -->\n\nhand-written reading\n")
    assert "old tables" not in text and report.results_block(folder) in text
    assert report.results_block(folder) in capsys.readouterr().out

    assert study_cli.main(["study", "report", str(folder), "--out", str(document), "--check"]) == 0
    accuracy_row = next(line for line in text.splitlines() if line.startswith("| test accuracy"))
    tampered = accuracy_row.replace(accuracy_row.split(" | ")[1], "99.99 ± 0.01")
    document.write_text(text.replace(accuracy_row, tampered))
    assert study_cli.main(["study", "report", str(folder), "--out", str(document), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    document.write_text("# Results without markers\n")
    assert study_cli.main(["study", "report", str(folder), "--out", str(document), "--check"]) == 1


def test_report_rejects_a_run_whose_config_disagrees_with_its_name(results):
    folder, metrics = results
    write_run(folder, "net4-raw-seed7", metrics["net1-raw-seed1"])
    config = json.loads((folder / "net4-raw-seed7" / "config.json").read_text())
    config["seed"] = 8
    (folder / "net4-raw-seed7" / "config.json").write_text(json.dumps(config))
    with pytest.raises(errors.ConfigError, match="seed 8 .* the folder's name says seed 7"):
        report.results_block(folder)


@pytest.mark.parametrize("document", ["RESULTS.md", "CROSS_LAB.md"])
def test_docs_tables_are_recomputed_from_the_committed_results(document):
    """Every generated block of the document equals what its results/NAME folder gives (a folder not there
    yet gives the block of a study without finished runs)."""
    text = (REPO_ROOT / "docs" / document).read_text()
    names = report.block_names(text)
    assert names, f"docs/{document} has no results markers"
    for name in names:
        assert report.check_document(text, REPO_ROOT / "results" / name), (
            f"docs/{document} is out of date: python -m urnet_jax.study report results/{name} --out docs/{document}")


def test_committed_runs_hold_relative_paths_and_count_as_finished(tmp_path):
    """Committed config.json / study.json files name their folders relative to the repository root, and the
    runner still recognises each committed run as a finished run of its study config (nothing would rerun).
    A run still training holds absolute paths until it finishes, and only finished runs are committed."""
    runs = [path for path in sorted((REPO_ROOT / "results").glob("*/*/config.json")) if study_run.is_finished(path.parent)]
    files = runs + sorted((REPO_ROOT / "results").glob("*/study.json"))
    assert len(files) > 50
    for path in files:
        saved = json.loads(path.read_text())
        for section in (saved, saved.get("base", {}), saved.get("pretrained_classifier") or {}):
            for part, key in study_run.LOCATION_KEYS:
                location = (section.get(part) or {}).get(key)
                assert not location or not pathlib.Path(location).is_absolute(), (path, location)
    for name, prepared in (("study_cpu", "study_cpu"), ("study_cpu_cosine", "study_cpu"), ("study_gpu", "study_gpu")):
        config = cli.load_config_file(str(REPO_ROOT / "configs" / f"{name}.py"))
        runs = sweep.plan_runs(config, REPO_ROOT / "results" / prepared / "_prepared", data_dir=str(tmp_path))
        finished = [run for run in runs if study_run.read_finished_metrics(REPO_ROOT / "results" / name / run.name)]
        assert len(finished) >= 12, name
        for run in finished:
            assert study_run.finished_config_differences(REPO_ROOT / "results" / name / run.name, run.config) == [], run.name


def test_report_rejects_an_incomplete_metrics_file(results, capsys):
    folder, _ = results
    (folder / "net1-raw-seed2" / "eval" / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(errors.ConfigError, match="net1-raw-seed2/eval/metrics.json lacks some of"):
        report.results_block(folder)
    (folder / "net1-raw-seed2" / "eval" / "metrics.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        study_cli.main(["study", "report", str(folder)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot read ") and "net1-raw-seed2" in error and error.count("\n") == 1


def test_report_pairs_models_by_seed_and_sums_up_the_errors(results):
    folder, metrics = results
    block = report.results_block(folder)
    raw = block.split("data variant `raw`")[1].split("####")[0]
    paired = {line.split(" | ")[0][2:]: line[2:-2].split(" | ") for line in raw.splitlines()
              if line.startswith("| Net")}
    assert list(paired) == ["Net4 − Net1"]  # the only pair of models with shared seeds
    row = paired["Net4 − Net1"]
    assert row[1:3] == ["the full UR-Net", "2"]  # seeds 1 and 2: net4 has no seed 3

    differences = [100 * (metrics[f"net4-raw-seed{s}"]["accuracy"] - metrics[f"net1-raw-seed{s}"]["accuracy"])
                   for s in (1, 2)]
    mean, std = statistics.mean(differences), statistics.stdev(differences)
    better, worse = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    assert row[3] == f"{mean:+.2f} ± {std:.2f} ({better}/{2 - better - worse}/{worse})".replace("-", "−")
    half = 12.706204736 * std / np.sqrt(2)  # t quantile 0.975 with 1 degree of freedom
    low, high = (float(value.replace("−", "-")) for value in row[4].strip("[]").split(", "))
    assert low == pytest.approx(mean - half, abs=0.006) and high == pytest.approx(mean + half, abs=0.006)
    monocyte = [100 * (metrics[f"net4-raw-seed{s}"]["per_class"]["monocyte"]["recall"]
                       - metrics[f"net1-raw-seed{s}"]["per_class"]["monocyte"]["recall"]) for s in (1, 2)]
    assert row[5] == "n/a"  # last-epoch accuracy: the hand-made runs have no metrics.jsonl rows
    assert row[7].startswith(f"{statistics.mean(monocyte):+.2f}".replace("-", "−"))

    errors = {line[2:-2].split(" | ")[0]: line[2:-2].split(" | ")[1:] for line in raw.splitlines()
              if " → " in line and not line.startswith("| true")}
    assert len(errors) == 6
    net1_monocyte_as_lymphocyte = np.mean([metrics[f"net1-raw-seed{s}"]["confusion_matrix"][1][2] for s in (1, 2, 3)])
    net4_monocyte_as_lymphocyte = np.mean([metrics[f"net4-raw-seed{s}"]["confusion_matrix"][1][2] for s in (1, 2)])
    assert errors["monocyte → lymphocyte"] == [f"{net1_monocyte_as_lymphocyte:.1f}", f"{net4_monocyte_as_lymphocyte:.1f}"]
    proxy = block.split("data variant `stainfree_proxy`")[1]
    assert "| comparison |" not in proxy  # one model only: nothing to pair


def write_curve(run_dir: pathlib.Path, accuracies: list[float]) -> None:
    rows = [{"phase": 2, "epoch": epoch, "test_accuracy": accuracy} for epoch, accuracy in enumerate(accuracies, 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_report_compares_each_run_with_the_same_run_of_the_baseline_study(results):
    folder, metrics = results
    baseline = folder.parent / "constant_lr"
    rng = np.random.default_rng(1)
    baseline_metrics = {name: random_metrics(rng) for name in ("net1-raw-seed1", "net1-raw-seed2", "net4-raw-seed1")}
    for name, values in baseline_metrics.items():
        write_run(baseline, name, values, "none" if name.startswith("net1") else "urnet", 0 if name.startswith("net1") else 3)
        config = json.loads((baseline / name / "config.json").read_text())
        config["optimizer"]["schedule"] = "constant"
        (baseline / name / "config.json").write_text(json.dumps(config))
    for name in ("net1-raw-seed1", "net1-raw-seed2", "net1-raw-seed3", "net4-raw-seed1", "net4-raw-seed2"):
        config = json.loads((folder / name / "config.json").read_text())
        config["optimizer"]["schedule"] = "cosine"
        (folder / name / "config.json").write_text(json.dumps(config))
    curves = {"net1-raw-seed1": ([0.5, 0.6, 0.7, 0.8, 0.9, 0.8], [0.5, 0.9, 0.5, 0.9, 0.5, 0.9]),
              "net1-raw-seed2": ([0.6, 0.7, 0.8, 0.8, 0.8, 0.8], [0.7, 0.7, 0.7, 0.7, 0.7, 0.6])}
    for name, (here, there) in curves.items():
        write_curve(folder / name, here)
        write_curve(baseline / name, there)
    (folder / "study.json").write_text(json.dumps({"baseline": "constant_lr"}))

    block = report.results_block(folder)
    raw = block.split("data variant `raw`")[1].split("####")[0]
    assert "`optimizer.schedule: 'constant' != 'cosine'` (baseline != this study)" in raw
    rows = {line[2:-2].split(" | ")[0]: line[2:-2].split(" | ")[1:] for line in raw.split("Against")[1].splitlines()
            if line.startswith("| Net")}
    assert list(rows) == ["Net1", "Net4"]
    accuracy = [100 * (metrics[f"net1-raw-seed{s}"]["accuracy"] - baseline_metrics[f"net1-raw-seed{s}"]["accuracy"])
                for s in (1, 2)]
    better = sum(value > 0 for value in accuracy)
    assert rows["Net1"][:2] == ["2", f"{statistics.mean(accuracy):+.2f} ± {statistics.stdev(accuracy):.2f} "
                                     f"({better}/0/{2 - better})".replace("-", "−")]
    assert rows["Net1"][2] == "+5.00 ± 21.21 (1/0/1)"  # last epoch: 0.8 - 0.9 and 0.8 - 0.6
    # Over the last 5 epochs, mean |change| in points: seed 1 10 here, 40 in the baseline; seed 2 2.5 and 2.5.
    assert rows["Net1"][4:] == ["6.25 ± 5.30", "21.25 ± 26.52"]
    assert rows["Net4"][:2] == ["1", f"{100 * (metrics['net4-raw-seed1']['accuracy'] - baseline_metrics['net4-raw-seed1']['accuracy']):+.2f}"
                                .replace("-", "−") + (" (1/0/0)" if metrics["net4-raw-seed1"]["accuracy"] >
                                                      baseline_metrics["net4-raw-seed1"]["accuracy"] else " (0/0/1)")]
    assert rows["Net4"][2:] == ["n/a"] * 4  # the hand-made net4 runs have no curves
    assert "Against the baseline" not in block.split("data variant `stainfree_proxy`")[1]  # no proxy baseline runs


def test_report_plots_the_phase2_learning_curves_of_every_finished_run(results, tmp_path, capsys):
    folder, _ = results
    rows = [{"phase": 1, "epoch": 1, "train_loss": 0.1, "test_loss": 0.1},
            {"phase": 2, "epoch": 1, "test_accuracy": 0.5}, {"phase": 2, "epoch": 2, "test_accuracy": 0.75}]
    malformed = ["[1, 2]", '{"phase": 2, "test_accuracy": 0.9}', '{"phase": 2, "epoch": 3, "test_accuracy": null}']
    (folder / "net4-raw-seed2" / "metrics.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows) + "\n".join(malformed) + "\n")  # malformed rows: left out
    (folder / "net4-raw-seed3" / "metrics.jsonl").write_text(json.dumps(rows[1]) + "\n")  # unfinished: left out
    assert study_results.learning_curves(folder) == {"raw": {"Net4": [[(1, 0.5), (2, 0.75)]]}}
    net1_rows = [{"phase": 2, "epoch": e, "test_accuracy": a} for e, a in ((1, 0.6), (2, 0.4), (3, 0.9))]
    (folder / "net1-raw-seed2" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in net1_rows))
    block = report.results_block(folder)
    raw = table_rows(block, "raw")
    assert raw["test accuracy, last epoch (not selected)"] == ["90.00", "75.00"]
    assert raw["test accuracy, mean of the last 3 epochs"] == ["63.33", "62.50"]  # net4 has 2 epochs only
    paired = next(line for line in block.splitlines() if line.startswith("| Net4 − Net1"))
    assert paired[2:-2].split(" | ")[5] == "−15.00 (0/0/1)"  # seed 2 only: 75 - 90

    png = tmp_path / "curves.png"
    assert study_cli.main(["study", "report", str(folder), "--curves", str(png)]) == 0
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 300
    for name in ("net4-raw-seed2", "net1-raw-seed2"):
        (folder / name / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        study_cli.main(["study", "report", str(folder), "--curves", str(png)])
    assert exit_info.value.code == 2
    assert "--curves: no finished run" in capsys.readouterr().err


def test_signed_differences_never_print_minus_zero():
    assert [paired.signed(value) for value in (-0.0, -0.004, -0.006, 1.234)] == ["+0.00", "+0.00", "−0.01", "+1.23"]


def test_report_says_what_each_runs_classifier_started_from_and_flags_a_seed_that_mixes_starts(results):
    folder, _ = results
    for name in ("net1-raw-seed1", "net1-raw-seed2", "net1-raw-seed3", "net4-raw-seed1", "net4-raw-seed2"):
        saved = json.loads((folder / name / "config.json").read_text())
        saved["model"]["pretrained"] = "results/hand_made/standin_dataseed1"
        (folder / name / "config.json").write_text(json.dumps(saved))
    starts = {"net1-raw-seed1": ("a" * 64, 0.99), "net4-raw-seed1": ("b" * 64, 0.98),
              "net1-raw-seed2": ("c" * 64, 0.97), "net4-raw-seed2": ("c" * 64, 0.97)}
    for name, (digest, accuracy) in starts.items():
        (folder / name / "pretrained.json").write_text(json.dumps(
            {"source": "results/hand_made/standin_dataseed1", "body_sha256": digest, "source_test_accuracy": accuracy}))
    raw, proxy = report.results_block(folder).split("data variant `stainfree_proxy`")
    line = next(line for line in raw.splitlines() if line.startswith("Classifier starts"))
    assert ("seed 1: `aaaaaaaa` (its test accuracy 99.00%) for Net1; `bbbbbbbb` (its test accuracy 98.00%) for Net4 "
            "(**different weights within one seed**") in line
    assert "seed 2: `cccccccc` (its test accuracy 97.00%) for Net1, Net4;" in line
    assert "not recorded for 1 run(s) of seed(s) 3" in line
    assert "Classifier starts" not in proxy  # its run loads no pretrained classifier
    (folder / "net1-raw-seed2" / "pretrained.json").write_text("{}")
    with pytest.raises(errors.ConfigError, match="pretrained.json is not a pretrained-classifier record"):
        report.results_block(folder)
