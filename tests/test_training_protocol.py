"""The training protocol: selection on validation, phase 1's PSNR check, clipping and the enhancer's lr,
a classifier pretrained by another run, and the model options (residual enhancer output, GroupNorm)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import urnet_jax.data as data_lib
from urnet_jax import (cli, compiler_options, config as config_lib, errors, port, sharding, train_state, trainer,
                       workdir as workdir_lib)
from urnet_jax.checkpointing import CheckpointStore
from tiny_run import REPO_ROOT, tiny_config, without_time


def rows_of(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# Validation accuracy peaks at epoch 2, test accuracy at epoch 3: whichever split chooses is visible.
SPLIT_ACCURACY = {"val": (0.5, 0.8, 0.6), "test": (0.9, 0.1, 0.95)}


@pytest.mark.parametrize("select_on", ["val", "test"])
def test_best_is_chosen_on_the_selection_split_only(select_on, prepared, tmp_path, monkeypatch):
    original = trainer.evaluate_split
    epochs_seen = {"val": 0, "test": 0}

    def evaluate_split(eval_step, variables, prepared_dir, split, batch_size, mesh):
        metrics = original(eval_step, variables, prepared_dir, split, batch_size, mesh)
        accuracy = SPLIT_ACCURACY[split][epochs_seen[split]]
        epochs_seen[split] += 1
        return {**metrics, "accuracy": accuracy}

    monkeypatch.setattr(trainer, "evaluate_split", evaluate_split)
    config = tiny_config(prepared, **{"pretrain.epochs": 0, "train.epochs": 3, "train.select_on": select_on})
    trainer.train_and_evaluate(config, tmp_path, show_progress=False)
    rows = rows_of(tmp_path)
    assert epochs_seen == {"val": 3, "test": 3}  # both logged every epoch
    assert [row["test_accuracy"] for row in rows] == list(SPLIT_ACCURACY["test"])
    expected_best = {"val": [True, True, False], "test": [True, False, True]}[select_on]
    assert [row["best"] for row in rows] == expected_best
    assert {row["selected_on"] for row in rows} == {select_on}
    store = CheckpointStore(tmp_path / "checkpoints" / "best", for_writing=False)
    meta = store.restore_meta(store.steps()[-1])
    store.close()
    assert meta["epoch"] == (2 if select_on == "val" else 3) and meta["selected_on"] == select_on
    assert not any(key.startswith("test") for key in meta) or select_on == "test"


def test_without_test_every_epoch_the_test_split_is_read_after_kept_and_last_epochs_only(prepared, tmp_path,
                                                                                         monkeypatch):
    original = trainer.evaluate_split
    val_accuracy = (0.5, 0.8, 0.6, 0.7)  # kept: epochs 1 and 2; epoch 3 neither kept nor last
    val_epochs, test_epochs = [], []  # of the run being trained

    def evaluate_split(eval_step, variables, prepared_dir, split, batch_size, mesh):
        metrics = original(eval_step, variables, prepared_dir, split, batch_size, mesh)
        if split == "test":
            test_epochs.append(len(val_epochs))  # the validation split is read first in every epoch
            return metrics
        val_epochs.append(len(val_epochs) + 1)
        return {**metrics, "accuracy": val_accuracy[len(val_epochs) - 1]}

    monkeypatch.setattr(trainer, "evaluate_split", evaluate_split)
    config = tiny_config(prepared, **{"pretrain.epochs": 0, "train.epochs": 4, "train.test_every_epoch": False})
    trainer.train_and_evaluate(config, tmp_path, show_progress=False)
    rows = rows_of(tmp_path)
    assert [row["best"] for row in rows] == [True, True, False, False]
    assert test_epochs == [1, 2, 4]
    assert [row["epoch"] for row in rows if "test_accuracy" in row] == [1, 2, 4]
    assert all(0 < row["eval_seconds"] < row["seconds"] for row in rows)
    # The same run evaluating the test split every epoch: the same weights, so the same test numbers.
    val_epochs.clear()
    test_epochs.clear()
    every_epoch = tmp_path / "every_epoch"
    trainer.train_and_evaluate(tiny_config(prepared, **{"pretrain.epochs": 0, "train.epochs": 4}), every_epoch,
                               show_progress=False)
    assert test_epochs == [1, 2, 3, 4]
    assert ([row for row in without_time(rows_of(every_epoch)) if row["epoch"] != 3]
            == [row for row in without_time(rows) if row["epoch"] != 3])


def test_a_prepared_folder_without_validation_split_is_refused_unless_selecting_on_test(prepared, tmp_path,
                                                                                        monkeypatch):
    info = data_lib.load_info(prepared)
    without_val = dataclasses.replace(info, num_examples={"train": info.num_examples["train"],
                                                          "test": info.num_examples["test"]})
    monkeypatch.setattr(trainer.data_lib, "load_info", lambda directory: without_val)
    with pytest.raises(errors.DataError, match="has no validation split.*prepare it again") as error:
        trainer.make_context(tiny_config(prepared), tmp_path, show_progress=False)
    assert "\n" not in str(error.value)
    context = trainer.make_context(tiny_config(prepared, **{"train.select_on": "test"}), tmp_path, False)
    assert context.eval_splits == ("test",) and context.selection_split == "test"


@pytest.mark.parametrize("output, passes", [("residual", True), ("sigmoid", False)])
def test_phase1_psnr_threshold(output, passes, prepared, tmp_path):
    # Three epochs at a sensible lr: the residual UR-Net (it starts at the identity) clears 30 dB, the
    # sigmoid one (it starts at a grey image) does not, and its run says so.
    config = tiny_config(prepared, **{"model.enhancer_output": output, "pretrain.epochs": 3, "train.epochs": 0,
                                      "pretrain.optimizer.name": "adamw", "pretrain.optimizer.lr": 1e-3})
    trainer.train_and_evaluate(config, tmp_path, show_progress=False)
    rows = rows_of(tmp_path)
    last = rows[-1]
    assert len(rows) == 3 and "phase1_psnr" in last and "phase1_psnr" not in rows[0]
    assert last["phase1_below_min_psnr"] is (not passes)
    assert (last["phase1_psnr"] > 30.0) is passes
    kept = [row for row in rows if row["best"]][-1]
    assert last["phase1_psnr"] == kept["val_psnr"] == max(row["val_psnr"] for row in rows)
    # The target is the input itself: the unchanged input scores the PSNR floor's 100 dB.
    assert all(row["val_input_psnr"] == pytest.approx(100.0) for row in rows)


@pytest.mark.parametrize("input_psnr, reference", [(11.554, " (the unchanged input: 11.55 dB)"), (None, "")])
def test_phase1_verdict_warns_with_the_unchanged_inputs_psnr_where_the_rows_have_it(capsys, input_psnr, reference):
    """Rows restored from a run written before `val_input_psnr` existed still get their verdict and warning."""
    rows = [{"epoch": 1, "val_psnr": 18.0, "best": True}, {"epoch": 2, "val_psnr": 20.814, "best": True}]
    if input_psnr is not None:
        for row in rows:
            row["val_input_psnr"] = input_psnr
    context = types.SimpleNamespace(selection_split="val", is_main=True, config=config_lib.base_config())
    assert trainer.phase1_verdict(context, rows) == {"phase1_psnr": 20.814, "phase1_below_min_psnr": True}
    assert (f"reconstructs the val split at 20.81 dB < 30.0 dB{reference}, so phase 2 starts"
            in capsys.readouterr().out)


def _global_norm(tree) -> float:
    return float(optax.global_norm(tree))


def _optimizer(**changes) -> optax.GradientTransformation:
    section = config_lib.base_config().optimizer
    section.update({"momentum": 0.0, **changes})
    return train_state.make_optimizer(section, phase_steps=10)


PARAMS = {"enhancer": {"w": jnp.ones(3)}, "classifier": {"w": jnp.ones(2)}}
HUGE_GRADIENT = {"enhancer": {"w": jnp.full(3, 1e6)}, "classifier": {"w": jnp.full(2, -1e6)}}


def test_gradient_clipping_bounds_the_update_norm():
    lr, clip_norm = 0.5, 2.0
    unclipped = _optimizer(lr=lr)
    clipped = _optimizer(lr=lr, clip_norm=clip_norm)
    update, _ = unclipped.update(HUGE_GRADIENT, unclipped.init(PARAMS), PARAMS)
    assert _global_norm(update) == pytest.approx(lr * _global_norm(HUGE_GRADIENT), rel=1e-5)
    update, state = clipped.update(HUGE_GRADIENT, clipped.init(PARAMS), PARAMS)
    assert _global_norm(update) == pytest.approx(lr * clip_norm, rel=1e-5)
    small = jax.tree.map(lambda leaf: leaf * 1e-7, HUGE_GRADIENT)  # norm 0.22 < 2: left as it is
    update, _ = clipped.update(small, state, PARAMS)
    np.testing.assert_allclose(update["classifier"]["w"], -lr * small["classifier"]["w"], rtol=1e-6)


def test_a_huge_learning_rate_diverges_without_clipping_and_stays_finite_with_it():
    # Gradient descent on sum(w^4) from w = 3 with lr 1: each step multiplies w by about -4 w^2 ...
    def descend(optimizer: optax.GradientTransformation) -> jax.Array:
        params = {"classifier": {"w": jnp.full(4, 3.0)}}
        state = optimizer.init(params)
        for _ in range(20):
            grads = jax.grad(lambda p: jnp.sum(p["classifier"]["w"] ** 4))(params)
            updates, state = optimizer.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params["classifier"]["w"]

    assert not np.all(np.isfinite(descend(_optimizer(lr=1.0))))
    assert np.all(np.abs(descend(_optimizer(lr=1.0, clip_norm=1.0))) <= 3.0 + 20 * 1.0)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_enhancer_lr_scale_scales_the_enhancers_updates_only(name):
    gradient = jax.tree.map(lambda leaf: leaf * 1e-3, HUGE_GRADIENT)
    plain, scaled = _optimizer(name=name, lr=0.1), _optimizer(name=name, lr=0.1, enhancer_lr_scale=0.25)
    plain_update, plain_state = plain.update(gradient, plain.init(PARAMS), PARAMS)
    scaled_update, scaled_state = scaled.update(gradient, scaled.init(PARAMS), PARAMS)
    np.testing.assert_allclose(scaled_update["enhancer"]["w"], 0.25 * plain_update["enhancer"]["w"], rtol=1e-6)
    np.testing.assert_array_equal(scaled_update["classifier"]["w"], plain_update["classifier"]["w"])
    assert float(train_state.current_learning_rate(scaled_state)) == float(
        train_state.current_learning_rate(plain_state)) == pytest.approx(0.1)


def test_a_classifier_pretrained_by_another_run(trained_run, tmp_path):  # noqa: F811
    source = workdir_lib.load_run(trained_run, "best")
    config = tiny_config(prepared_dir=trained_run / "data", **{"model.enhancer": "none", "pretrain.epochs": 0,
                                                                "model.pretrained": str(trained_run)})
    model = train_state.build(config, 5)
    mesh = sharding.data_mesh()
    fresh = train_state.init_variables(model, ("classifier",), 96, jax.random.PRNGKey(0), sharding.replicated(mesh))
    loaded = workdir_lib.pretrained_classifier(trained_run, "resnet18", 5, jax.random.PRNGKey(1))
    variables = train_state.with_pretrained_classifier(fresh, loaded, str(trained_run), "resnet18", mesh)
    classifier, original = variables["params"]["classifier"], source.variables["params"]["classifier"]
    assert classifier["fc"]["kernel"].shape[-1] == 5  # a new head for 5 classes
    for name in set(original) - {"fc"}:
        jax.tree.map(np.testing.assert_array_equal, classifier[name], original[name])
    jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"]["classifier"],
                 source.variables["batch_stats"]["classifier"])
    # The run records what it started from: the source's body digest (the head excluded) and test accuracy.
    context = trainer.make_context(config, tmp_path, show_progress=False)
    trainer.pretrained_classifier_variables(context)
    record = json.loads((tmp_path / workdir_lib.PRETRAINED_RECORD).read_text())
    source_classifier = {collection: trees["classifier"] for collection, trees in source.variables.items()}
    assert record["body_sha256"] == port.body_digest(source_classifier, "resnet18")
    assert pathlib.Path(record["source"]).resolve() == trained_run.resolve()
    # Other tests may or may not have evaluated the shared source run by now: the record follows its state.
    source_metrics = trained_run / "eval" / "metrics.json"
    expected_accuracy = json.loads(source_metrics.read_text())["accuracy"] if source_metrics.exists() else None
    assert record.get("source_test_accuracy") == expected_accuracy
    unevaluated_source, evaluated_source = tmp_path / "unevaluated_source", tmp_path / "evaluated_source"
    run = tmp_path / "run"
    (evaluated_source / "eval").mkdir(parents=True)
    unevaluated_source.mkdir()
    run.mkdir()
    record = workdir_lib.write_pretrained_record(run, unevaluated_source, "resnet18", loaded)
    assert "source_test_accuracy" not in record
    (evaluated_source / "eval" / "metrics.json").write_text(json.dumps({"accuracy": 0.75}))
    record = workdir_lib.write_pretrained_record(run, evaluated_source, "resnet18", loaded)
    assert record["source_test_accuracy"] == 0.75
    # Another architecture is refused in one line before anything is trained.
    with pytest.raises(errors.ConfigError, match=r"another classifier architecture .*classifier_width 4 != 8"):
        tiny_config(**{"model.enhancer": "none", "model.pretrained": str(trained_run), "model.classifier_width": 8})
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(errors.ConfigError, match="no training run"):
        tiny_config(**{"model.pretrained": str(tmp_path.parent)})


def test_residual_enhancer_starts_as_the_identity_and_its_head_learns():
    config = tiny_config(**{"model.enhancer_output": "residual"})
    model = train_state.build(config, 3)
    variables = compiler_options.run_unoptimised(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 96, 96, 3)))
    # The enhancer alone at 48 px (its deepest map 3x3).
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 48, 48, 3), minval=0.05, maxval=0.95)
    np.testing.assert_array_equal(compiler_options.run_unoptimised(model.apply, variables, x, method="enhance"), x)
    target = 0.9 * x

    def loss(params):
        return jnp.mean((model.apply({**variables, "params": params}, x, method="enhance") - target) ** 2)

    gradient = compiler_options.run_unoptimised(jax.grad(loss), variables["params"])["enhancer"]
    assert float(jnp.abs(gradient["head"]["kernel"]).max()) > 0  # the zero head receives a gradient


def test_group_norm_classifier_has_no_batch_stats_and_needs_a_resnet():
    model = train_state.build(tiny_config(**{"model.norm": "group", "model.num_groups": 2}), 3)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 96, 96, 3)))
    assert "classifier" not in variables.get("batch_stats", {})
    assert "enhancer" in variables["batch_stats"]
    with pytest.raises(errors.ConfigError, match="model.norm='group' needs one of resnet18"):
        tiny_config(**{"model.norm": "group", "model.classifier": "vgg16"})


def test_old_saved_configs_read_as_what_their_runs_did():
    saved = {"optimizer": {"lr": 0.01, "name": "sgd"}, "train": {"epochs": 3}}
    config = config_lib.saved_config(saved)
    assert config.train.select_on == "test"  # chosen on test before validation selection existed
    assert config.pretrain.optimizer.lr == 0.01  # phase 1 used the one optimiser section
    assert config.xla_cpu_options == "no_ynnpack"  # before YNNPACK's reductions became the default
    current = config_lib.base_config()
    current.optimizer.lr = current.pretrain.optimizer.lr = 0.01
    current.train.select_on, current.train.epochs, current.xla_cpu_options = "test", 3, "no_ynnpack"
    assert config_lib.config_differences(saved, current.to_dict()) == []


@pytest.mark.parametrize("key, value, message", [
    ("train.select_on", "train", "train.select_on must be one of val, test"),
    ("model.enhancer_output", "tanh", "model.enhancer_output must be one of sigmoid, residual"),
    ("pretrain.optimizer.lr", 0.0, "pretrain.optimizer.lr must be > 0"),
    ("pretrain.optimizer.enhancer_lr_scale", 0.5, "pretrain.optimizer.enhancer_lr_scale must be 1"),
    ("optimizer.clip_norm", -1.0, "optimizer.clip_norm must be >= 0"),
    ("model.norm", "layer", "model.norm must be one of batch, group"),
    ("data.val_fraction", 0.0, "train.select_on='val' needs a validation split"),
])
def test_validate_names_the_bad_training_key(key, value, message):
    with pytest.raises(errors.ConfigError, match=message.replace("(", r"\(")):
        tiny_config(**{key: value})


def test_selecting_on_test_needs_the_test_split_every_epoch():
    with pytest.raises(errors.ConfigError, match="train.test_every_epoch=False needs train.select_on='val'"):
        tiny_config(**{"train.select_on": "test", "train.test_every_epoch": False})


def test_pretrain_standin_config_is_the_classifier_alone_on_partition_a(tmp_path):
    (tmp_path / "splits").mkdir()
    config = cli.load_config_file(str(REPO_ROOT / "configs" / "pretrain_standin.py"))
    config.data.dir, config.data.split_dir = str(tmp_path), str(tmp_path / "splits")
    config_lib.validate(config, device_count=1)
    assert (config.model.enhancer, config.data.class_map, config.data.partition, config.train.select_on) == (
        "none", "folders", "a", "val")
    assert config.data.variant == "raw"  # stained images


class _BatchesRequested(Exception):
    """Raised by the stand-in reader once the trainer has asked for its first epoch's batches."""


def test_training_batches_carry_the_runs_augmentation_settings(prepared, tmp_path, monkeypatch):
    requested = []

    def record_request(*args, data_config=None, **kwargs):
        requested.append(data_config)
        raise _BatchesRequested

    monkeypatch.setattr(data_lib, "train_batches", record_request)
    config = tiny_config(prepared)
    config.data.online_augment = True
    config.data.stain_augment = 0.05
    with pytest.raises(_BatchesRequested):
        trainer.train_and_evaluate(config, tmp_path, show_progress=False)
    assert requested[0]["online_augment"] is True and requested[0]["stain_augment"] == 0.05
