"""End to end: the two-phase loop on a tiny UR-Net and tiny synthetic data; resume, faults, load_run."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import chex
import jax
import numpy as np
import pytest

import urnet_jax.data as data_lib
from urnet_jax import errors, sharding, steps, train_state, trainer, workdir as workdir_lib
from urnet_jax.checkpointing import CheckpointStore
from tiny_run import REPO_ROOT, TINY, lowered_programs, subprocess_env, tiny_config, without_time


def rows_without_time(workdir: pathlib.Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return without_time(rows)


def test_training_lowers_the_losses_and_writes_the_workdir(reference_run):
    rows = rows_without_time(reference_run)
    assert [(row["phase"], row["epoch"], row["step"]) for row in rows] == [(1, 1, 8), (1, 2, 16), (2, 1, 24), (2, 2, 32)]
    pretrain, joint = rows[:2], rows[2:]
    assert pretrain[1]["train_loss"] < pretrain[0]["train_loss"]  # reconstruction error falls
    assert all(row["train_accuracy"] is None and "val_accuracy" not in row for row in pretrain)
    assert all(row["val_psnr"] > 0 and 0 <= row["saturated_fraction"] <= 1 for row in pretrain)
    assert pretrain[-1]["phase1_psnr"] == [row["val_psnr"] for row in pretrain if row["best"]][-1]
    assert joint[1]["train_loss"] < joint[0]["train_loss"]  # cross-entropy falls
    assert all(0.0 <= row[f"{split}_{metric}"] <= 1.0 for row in joint for split in ("val", "test")
               for metric in ("accuracy", "balanced_accuracy"))
    assert {row["selected_on"] for row in rows} == {"val"}
    config = json.loads((reference_run / "config.json").read_text())
    assert config["model"]["classifier"] == "resnet18" and config["pretrain"]["epochs"] == 2
    assert list((reference_run / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("periodic", "best", "pretrain_best"):
        assert any((reference_run / "checkpoints" / name).iterdir()), name



def test_tensorboard_writer_keeps_torch_out_of_the_run(tmp_path):
    """tensorboardX imports torch whenever it is installed; a run's writer keeps it out (start-up, memory),
    still writes events, and leaves torch importable afterwards."""
    pytest.importorskip("torch", reason="torch is not installed: there is no torch import to keep out")
    code = ("import sys; from urnet_jax.run_log import summary_writer; "
            f"writer = summary_writer({str(tmp_path)!r}); writer.add_scalar('loss', 1.5, 3); writer.close(); "
            "print('torch' in sys.modules); import torch; print(torch.ones(1).item())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "1.0"]
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(events) == 1 and b"loss" in events[0].read_bytes()

def test_training_compiles_a_few_whole_programs_and_estimates_each_phase(prepared, tmp_path, capsys):
    # Per phase: initial weights, initial state, train step and eval step, one program each. An eager
    # optimizer.init lowered a program per parameter shape (49 here, hundreds for ResNet101 + UR-Net).
    config = tiny_config(prepared, **{"pretrain.epochs": 1, "train.epochs": 1})
    with lowered_programs() as count:
        trainer.train_and_evaluate(config, tmp_path, show_progress=False)
    assert count() <= 16, f"training lowered {count()} XLA programs"
    # After the first few steps of each phase: the estimated time per epoch and for the whole phase.
    estimates = re.findall(r"^phase (\d): ([\d.e-]+) s/step, about (\d+) s per epoch, (\d+) s for its 1 "
                           r"epoch\(s\) \(without evaluation\)$", capsys.readouterr().out, re.MULTILINE)
    assert [phase for phase, *_ in estimates] == ["1", "2"]
    for _, per_step, per_epoch, per_phase in estimates:
        assert abs(int(per_epoch) - 8 * float(per_step)) <= 1 and per_phase == per_epoch  # 8 steps per epoch


def test_phase1_keeps_the_enhancer_with_the_lowest_validation_reconstruction_error(reference_run, prepared):
    config, mesh = tiny_config(prepared), sharding.data_mesh()
    replicated = sharding.replicated(mesh)
    model = train_state.build(config, 3)
    evaluate = steps.make_eval_step(model, steps.PRETRAIN, mesh)
    target = sharding.with_sharding(train_state.abstract_variables(model, ("enhancer",), 96), replicated)
    store = CheckpointStore(reference_run / "checkpoints" / "pretrain_best", for_writing=False)
    best = store.restore_latest(lambda meta: target)
    store.close()
    untrained = train_state.init_variables(model, ("enhancer",), 96, jax.random.PRNGKey(config.seed), replicated)
    untrained = steps.evaluate_split(evaluate, untrained, prepared, "val", 8, mesh)
    best_metrics = steps.evaluate_split(evaluate, best.state, prepared, "val", 8, mesh)
    recorded = [row for row in rows_without_time(reference_run) if row["phase"] == 1]
    assert best_metrics["mse"] == min(row["val_mse"] for row in recorded)
    assert best_metrics["psnr"] == max(row["val_psnr"] for row in recorded if row["best"])
    assert best_metrics["mse"] < 0.5 * untrained["mse"]


def test_load_run_best_reproduces_the_recorded_metrics(reference_run):
    # `best` holds the params and the batch_stats of one step: evaluated, they give that epoch's numbers.
    run = workdir_lib.load_run(reference_run, "best")
    assert run.class_names == list(data_lib.load_info(run.prepared_dir).class_names)
    best_row = [row for row in rows_without_time(reference_run) if row["phase"] == 2 and row["best"]][-1]
    mesh = sharding.data_mesh()
    evaluate = steps.make_eval_step(run.model, steps.JOINT, mesh)
    for split in ("val", "test"):
        metrics = steps.evaluate_split(evaluate, run.variables, run.prepared_dir, split, 8, mesh)
        assert metrics == {key: best_row[f"{split}_{key}"] for key in ("loss", "accuracy", "balanced_accuracy")}
    latest = workdir_lib.load_run(reference_run, "latest")
    assert set(latest.variables["params"]) == {"enhancer", "classifier"}


class Interrupted(Exception):
    """Stands for the process dying after a given number of training steps."""


ORIGINAL_TRAIN_BATCHES = data_lib.train_batches


def before_batches(monkeypatch, action: Callable[[], None], at: tuple[int, ...]) -> None:
    """Makes data.train_batches call `action` before it hands out each batch index in `at` (counted over
    all epochs from 0; an index given twice calls it twice)."""
    original = ORIGINAL_TRAIN_BATCHES
    taken = [0]

    def batches(*args, **kwargs):
        for batch in original(*args, **kwargs):
            for _ in range(at.count(taken[0])):
                action()
            taken[0] += 1
            yield batch

    monkeypatch.setattr(trainer.data_lib, "train_batches", batches)


def interrupt_after(monkeypatch, steps: int) -> None:
    """Makes data.train_batches raise Interrupted once `steps` batches have been taken (over all epochs)."""
    def interrupt() -> None:
        raise Interrupted

    before_batches(monkeypatch, interrupt, at=(steps,))


def test_interrupted_and_resumed_run_is_bitwise_identical(prepared, reference_run, tmp_path, monkeypatch):
    # 8 steps/epoch, saves every 3 steps and at epoch ends. Resume points: step 16 (the end of phase 1:
    # phase 2 starts in the resumed process), then step 21 (phase 2, mid-epoch; steps 22, 23 redone).
    for batches_before_interrupt in (16, 7):
        interrupt_after(monkeypatch, batches_before_interrupt)
        with pytest.raises(Interrupted):
            trainer.train_and_evaluate(tiny_config(prepared), tmp_path, show_progress=False)
    monkeypatch.undo()
    trainer.train_and_evaluate(tiny_config(prepared), tmp_path, show_progress=False)
    assert rows_without_time(tmp_path) == rows_without_time(reference_run)
    for checkpoint in ("latest", "best"):
        chex.assert_trees_all_equal(workdir_lib.load_run(tmp_path, checkpoint).variables,
                              workdir_lib.load_run(reference_run, checkpoint).variables)


def test_sigterm_saves_a_checkpoint_after_the_step_and_the_resumed_run_is_identical(
        prepared, reference_run, tmp_path, monkeypatch, capsys):
    handler_before = signal.getsignal(signal.SIGTERM)
    # SIGTERM as batch 4 is handed out: phase 1, step 5 of 8 (periodic saves every 3 steps).
    before_batches(monkeypatch, lambda: signal.raise_signal(signal.SIGTERM), at=(4,))
    with pytest.raises(errors.TrainingStopped, match="stopped by SIGTERM after a checkpoint at step 5:") as stop:
        trainer.train_and_evaluate(tiny_config(prepared), tmp_path, show_progress=False)
    assert stop.value.signal_number == signal.SIGTERM
    assert "SIGTERM: stopping after the current step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == handler_before
    periodic = CheckpointStore(tmp_path / "checkpoints" / "periodic", for_writing=False)
    assert periodic.steps()[-1] == 5
    periodic.close()
    monkeypatch.undo()
    trainer.train_and_evaluate(tiny_config(prepared), tmp_path, show_progress=False)
    assert rows_without_time(tmp_path) == rows_without_time(reference_run)
    chex.assert_trees_all_equal(workdir_lib.load_run(tmp_path, "latest").variables,
                          workdir_lib.load_run(reference_run, "latest").variables)


def test_a_second_sigint_interrupts_at_once(prepared, tmp_path, monkeypatch):
    # Python's own SIGINT handler, whatever this process inherited (a background job starts with SIGINT
    # ignored, and an ignored signal stays ignored in training).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    before_batches(monkeypatch, lambda: signal.raise_signal(signal.SIGINT), at=(1, 1))
    try:
        with pytest.raises(KeyboardInterrupt) as interrupt:
            trainer.train_and_evaluate(tiny_config(prepared), tmp_path, show_progress=False)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert type(interrupt.value) is KeyboardInterrupt  # Python's own, not TrainingStopped: no checkpoint
    assert not (tmp_path / "checkpoints" / "periodic").exists() or not any(
        (tmp_path / "checkpoints" / "periodic").iterdir())


def test_cosine_schedule_run_resumes_exactly_and_refuses_other_epochs(prepared, tmp_path, monkeypatch):
    # The schedule's step count lives in the optimizer state: a resumed run must pick it up exactly.
    changes = {"optimizer.schedule": "cosine", "optimizer.warmup_steps": 2, "pretrain.epochs": 0, "train.epochs": 1}
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    trainer.train_and_evaluate(tiny_config(prepared, **changes), uninterrupted, show_progress=False)
    interrupt_after(monkeypatch, 5)  # the last save is at step 3 of 8: steps 4 and 5 are redone
    with pytest.raises(Interrupted):
        trainer.train_and_evaluate(tiny_config(prepared, **changes), resumed, show_progress=False)
    monkeypatch.undo()
    # The epochs set every step's learning rate under a decaying schedule, so they cannot change on resume.
    with pytest.raises(errors.ConfigError, match="another configuration .*train.epochs: 1 != 2"):
        trainer.train_and_evaluate(tiny_config(prepared, **{**changes, "train.epochs": 2}), resumed, show_progress=False)
    trainer.train_and_evaluate(tiny_config(prepared, **changes), resumed, show_progress=False)
    assert rows_without_time(resumed) == rows_without_time(uninterrupted)
    chex.assert_trees_all_equal(workdir_lib.load_run(resumed, "latest").variables,
                          workdir_lib.load_run(uninterrupted, "latest").variables)


def test_kill_9_then_rerun_gives_the_uninterrupted_result(prepared, reference_run, tmp_path):
    overrides = [f"--config.{key}={value}" for key, value in {**TINY, "data.prepared_dir": prepared}.items()]
    command = [sys.executable, "train.py", "--config", "configs/urnet.py", "--workdir", str(tmp_path),
               "--noprogress", *overrides]
    env = subprocess_env()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    periodic = tmp_path / "checkpoints" / "periodic"
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if periodic.is_dir() and any(path.name.isdigit() for path in periodic.iterdir()):
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    rerun = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from checkpoint step" in rerun.stdout
    assert rows_without_time(tmp_path) == rows_without_time(reference_run)
    chex.assert_trees_all_equal(workdir_lib.load_run(tmp_path, "best").variables,
                          workdir_lib.load_run(reference_run, "best").variables)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(prepared, reference_run, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run, workdir)
    periodic = workdir / "checkpoints" / "periodic"
    latest = max(int(path.name) for path in periodic.iterdir())
    for path in (periodic / str(latest) / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    trainer.train_and_evaluate(tiny_config(prepared), workdir, show_progress=False)
    assert "is unreadable" in caplog.text
    assert list((workdir / "checkpoints" / "corrupt").iterdir())  # moved aside, not deleted
    assert rows_without_time(workdir) == rows_without_time(reference_run)
    chex.assert_trees_all_equal(workdir_lib.load_run(workdir, "latest").variables,
                          workdir_lib.load_run(reference_run, "latest").variables)


def test_workdir_of_another_configuration_is_refused_untouched(prepared, reference_run):
    before = sorted(str(path) for path in reference_run.rglob("*"))
    metrics = (reference_run / "metrics.jsonl").read_text()
    with pytest.raises(errors.ConfigError, match="another configuration .*model.classifier_width: 4 != 8"):
        trainer.train_and_evaluate(tiny_config(prepared, **{"model.classifier_width": 8}), reference_run, show_progress=False)
    assert sorted(str(path) for path in reference_run.rglob("*")) == before
    assert (reference_run / "metrics.jsonl").read_text() == metrics


def test_non_finite_validation_loss_stops_with_one_line_naming_the_intact_checkpoint(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "evaluate_split", lambda *args, **kwargs: {"loss": float("nan")})
    with pytest.raises(errors.RunError) as error:
        trainer.train_and_evaluate(tiny_config(prepared), tmp_path, show_progress=False)
    match = re.fullmatch(r"non-finite val loss \(nan\) after phase 1 epoch 1; "
                         r"the last checkpoint \(step (\d+)\) is intact", str(error.value))
    assert match, str(error.value)
    store = CheckpointStore(tmp_path / "checkpoints" / "periodic", for_writing=False)
    assert int(match.group(1)) == max(store.steps())
    store.close()


def test_non_finite_loss_stops_cleanly_with_checkpoints_intact(prepared, reference_run, tmp_path, monkeypatch):
    poisoned_step = 13  # phase 1, epoch 2 (8 steps/epoch), step 5
    make_train_step = trainer.make_train_step

    def make_poisoned_step(*args):
        step = make_train_step(*args)

        def poisoned(state, batch, rng):
            state, metrics = step(state, batch, rng)
            if int(state.step) == poisoned_step:
                metrics = {**metrics, "loss": metrics["loss"] * np.nan}
            return state, metrics

        return poisoned

    monkeypatch.setattr(trainer, "make_train_step", make_poisoned_step)
    with pytest.raises(errors.RunError) as error:
        trainer.train_and_evaluate(tiny_config(prepared), tmp_path, show_progress=False)
    message = str(error.value)
    assert "non-finite loss (nan) in phase 1 epoch 2 step 5 (global step 13)" in message and "\n" not in message
    store = CheckpointStore(tmp_path / "checkpoints" / "periodic", for_writing=False)
    assert store.steps() == [9, 12]  # nothing saved after the last good step
    meta = store.restore_meta(12)
    store.close()
    saved_rows = without_time(meta["position"]["history"])
    assert saved_rows == rows_without_time(reference_run)[:1]
    assert (meta["position"]["epoch"], meta["position"]["step_in_epoch"]) == (1, 4)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
