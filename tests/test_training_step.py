"""The jit-compiled train/eval steps on a tiny stand-in model with BatchNorm (no data package needed)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from urnet_jax import compiler_options, sharding, steps, train_state
from urnet_jax.config import base_config
from urnet_jax.models.layers import BatchNorm, conv, dense, global_avg_pool

IMAGE_SIZE = 16
NUM_CLASSES = 3


class StandInEnhancer(nn.Module):
    """x in [0, 1] -> x + a small learned residual, clipped to [0, 1]; conv + BatchNorm."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        hidden = nn.relu(BatchNorm(dtype=self.dtype)(conv(8, 3, padding=1, dtype=self.dtype)(x), train))
        return jnp.clip(x + 0.5 * jnp.tanh(conv(3, 3, padding=1, dtype=self.dtype)(hidden)), 0.0, 1.0)


class StandInClassifier(nn.Module):
    """Strided conv + BatchNorm + dropout + linear head; float32 logits."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.relu(BatchNorm(dtype=self.dtype)(conv(8, 3, stride=2, padding=1, dtype=self.dtype)(x), train))
        y = nn.Dropout(0.1, deterministic=not train)(y)
        return dense(NUM_CLASSES, dtype=self.dtype)(global_avg_pool(y)).astype(jnp.float32)


class StandInModel(nn.Module):
    """An EnhanceClassify look-alike: submodules 'enhancer' and 'classifier', methods enhance/__call__."""

    dtype: Any = None

    def setup(self) -> None:
        self.enhancer = StandInEnhancer(self.dtype)
        self.classifier = StandInClassifier(self.dtype)

    def enhance(self, x: jax.Array, train: bool) -> jax.Array:
        return self.enhancer(x, train)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return self.classifier(self.enhance(x, train), train)


def make_batch(batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Images whose mean brightness encodes the label, so the task is learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)
    base = (60 + 60 * labels)[:, None, None, None]
    images = np.clip(base + rng.normal(0, 25, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
    return {"image": images, "label": labels}


def optimizer_config(lr: float = 0.05, **changes) -> ml_collections.ConfigDict:
    section = base_config().optimizer  # every key at its default: SGD, momentum 0.9, constant, no clipping
    section.update({"lr": lr, **changes})
    return section


def initial_state(model: nn.Module, phase: int, mesh: jax.sharding.Mesh,
                  optimizer: optax.GradientTransformation) -> train_state.TrainState:
    dummy = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
    kwargs = {"method": "enhance"} if phase == steps.PRETRAIN else {}
    variables = compiler_options.run_unoptimised(model.init, jax.random.PRNGKey(0), dummy, train=False,
                                                 **kwargs)
    state = train_state.create_state(model, phase, optimizer, variables, 0, jax.random.PRNGKey(1))
    return sharding.replicate(state, mesh)


def run_steps(phase: int, count: int, devices: list[jax.Device] | None = None, dtype: Any = None,
              lr: float = 0.05, optimizer_changes: dict[str, Any] | None = None
              ) -> tuple[list[float], train_state.TrainState]:
    """Losses of `count` steps on one fixed batch of 8, and the final state (a phase of 1 step for the
    learning-rate schedule)."""
    mesh = sharding.data_mesh(devices)
    model = StandInModel(dtype=dtype)
    optimizer = train_state.make_optimizer(optimizer_config(lr, **(optimizer_changes or {})), 1)
    step = steps.make_train_step(phase, mesh)
    state = initial_state(model, phase, mesh, optimizer)
    batch = sharding.global_batch(make_batch(8), mesh)
    losses = []
    for index in range(count):
        state, metrics = step(state, batch, jax.random.fold_in(jax.random.PRNGKey(2), index))
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss"]))
    return losses, state


def test_joint_step_lowers_cross_entropy_and_updates_batch_stats():
    losses, state = run_steps(steps.JOINT, 12)
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(state.step) == 12
    assert not np.allclose(state.batch_stats["classifier"]["BatchNorm_0"]["mean"], 0.0)


def test_pretrain_step_lowers_reconstruction_error_and_touches_only_the_enhancer():
    losses, state = run_steps(steps.PRETRAIN, 10, lr=0.5)
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(state.params) == {"enhancer"}


def test_bfloat16_compute_keeps_float32_master_weights_and_loss():
    losses, state = run_steps(steps.JOINT, 3, dtype=jnp.bfloat16)
    assert all(np.isfinite(losses))
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert losses[-1] < losses[0]


def test_learning_rate_schedules():
    assert train_state.learning_rate(optimizer_config(0.1), 100) == 0.1  # a constant: a plain float
    cosine = train_state.learning_rate(optimizer_config(0.1, schedule="cosine"), 100)
    np.testing.assert_allclose([cosine(0), cosine(50), cosine(100)], [0.1, 0.05, 0.0], atol=1e-7)
    warm_cosine = train_state.learning_rate(optimizer_config(0.1, schedule="cosine", warmup_steps=10), 110)
    np.testing.assert_allclose([warm_cosine(0), warm_cosine(5), warm_cosine(10), warm_cosine(60), warm_cosine(110)],
                               [0.0, 0.05, 0.1, 0.05, 0.0], atol=1e-7)
    warm_constant = train_state.learning_rate(optimizer_config(0.1, warmup_steps=4), 100)
    np.testing.assert_allclose([warm_constant(0), warm_constant(2), warm_constant(4), warm_constant(99)],
                               [0.0, 0.05, 0.1, 0.1], atol=1e-7)


def test_cosine_schedule_stops_updating_at_the_end_of_the_phase():
    _, after_one = run_steps(steps.JOINT, 1, optimizer_changes={"schedule": "cosine", "momentum": 0.0})
    _, after_two = run_steps(steps.JOINT, 2, optimizer_changes={"schedule": "cosine", "momentum": 0.0})
    _, constant = run_steps(steps.JOINT, 2, optimizer_changes={"momentum": 0.0})
    # The phase has 1 step: the first step moves the weights, the second (lr 0) does not.
    changed = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert changed(after_one.params, constant.params)  # the constant run's second step moved them further
    assert not changed(after_one.params, after_two.params)


def test_the_logged_learning_rate_is_the_one_each_step_applied():
    mesh = sharding.data_mesh()
    model = StandInModel()
    config = optimizer_config(0.1, schedule="cosine", warmup_steps=2)
    optimizer = train_state.make_optimizer(config, 6)
    step = steps.make_train_step(steps.JOINT, mesh)
    state = initial_state(model, steps.JOINT, mesh, optimizer)
    batch = sharding.global_batch(make_batch(8), mesh)
    logged = []
    for index in range(6):
        state, metrics = step(state, batch, jax.random.PRNGKey(index))
        logged.append(float(metrics["learning_rate"]))
        assert float(train_state.current_learning_rate(state.opt_state)) == logged[-1]
    schedule = train_state.learning_rate(config, 6)
    np.testing.assert_allclose(logged, [schedule(index) for index in range(6)], rtol=1e-6)
    assert logged[0] == 0.0 and max(logged) == logged[2]  # the warm-up, then the decay


def test_a_retraced_step_fails_instead_of_silently_recompiling():
    mesh = sharding.data_mesh()
    model = StandInModel()
    optimizer = train_state.make_optimizer(optimizer_config(), 1)
    train_step, eval_step = steps.make_train_step(steps.JOINT, mesh), steps.make_eval_step(model, steps.JOINT, mesh)
    state = initial_state(model, steps.JOINT, mesh, optimizer)
    state, _ = train_step(state, sharding.global_batch(make_batch(8), mesh), jax.random.PRNGKey(0))
    state, _ = train_step(state, sharding.global_batch(make_batch(8, seed=1), mesh), jax.random.PRNGKey(1))
    with pytest.raises(AssertionError, match="traced > 1 times"):  # another batch shape: a second trace
        train_step(state, sharding.global_batch(make_batch(4), mesh), jax.random.PRNGKey(2))
    for size in (8, 8):
        eval_step(state.variables, sharding.global_batch({**make_batch(size), "mask": np.ones(size, bool)}, mesh))
    with pytest.raises(AssertionError, match="traced > 1 times"):
        eval_step(state.variables, sharding.global_batch({**make_batch(4), "mask": np.ones(4, bool)}, mesh))
    # Each step function has its own count: a new phase's step (or a new run's) traces once more.
    fresh_state = initial_state(model, steps.JOINT, mesh, optimizer)
    steps.make_train_step(steps.JOINT, mesh)(fresh_state, sharding.global_batch(make_batch(4), mesh),
                                             jax.random.PRNGKey(0))


def test_step_rejects_a_batch_of_the_wrong_dtype_or_shape():
    mesh = sharding.data_mesh()
    model = StandInModel()
    state = initial_state(model, steps.JOINT, mesh, train_state.make_optimizer(optimizer_config(), 1))
    batch = make_batch(8)
    with pytest.raises(AssertionError, match="uint8"):  # float images: a missing conversion upstream
        steps.make_train_step(steps.JOINT, mesh)(
            state, sharding.global_batch({**batch, "image": batch["image"] / 255.0}, mesh), jax.random.PRNGKey(0))
    with pytest.raises(AssertionError):  # one label per image
        steps.make_train_step(steps.JOINT, mesh)(
            state, sharding.global_batch({**batch, "label": np.tile(batch["label"], 2)}, mesh), jax.random.PRNGKey(0))


def test_non_finite_update_is_flagged():
    mesh = sharding.data_mesh()
    model = StandInModel()
    optimizer = train_state.make_optimizer(optimizer_config(1e30), 3)
    step = steps.make_train_step(steps.JOINT, mesh)
    state = initial_state(model, steps.JOINT, mesh, optimizer)
    batch = sharding.global_batch(make_batch(8), mesh)
    finite = []
    for index in range(3):
        state, metrics = step(state, batch, jax.random.PRNGKey(index))
        finite.append(bool(metrics["finite"]))
    assert finite[0] is False or finite[1] is False


def test_eval_step_ignores_padding_rows():
    mesh = sharding.data_mesh()
    model = StandInModel()
    variables = initial_state(model, steps.JOINT, mesh, train_state.make_optimizer(optimizer_config(), 1)).variables
    batch = make_batch(8)
    real = {**{key: value[:5] for key, value in batch.items()}, "mask": np.ones(5, bool)}
    real_padded = {key: np.concatenate([value, value[:3]]) for key, value in real.items()}
    real_padded["mask"][5:] = False
    # One step function per batch shape: each may be traced once.
    sums_real = steps.make_eval_step(model, steps.JOINT, mesh)(variables, sharding.global_batch(real, mesh))
    sums_padded = steps.make_eval_step(model, steps.JOINT, mesh)(variables, sharding.global_batch(real_padded, mesh))
    assert float(sums_padded["count"]) == 5.0
    np.testing.assert_allclose(float(sums_padded["loss_sum"]), float(sums_real["loss_sum"]), rtol=1e-6)
    logits = model.apply(variables, real["image"] / 255.0, train=False)
    expected = -jax.nn.log_softmax(logits)[np.arange(5), real["label"]].sum()
    np.testing.assert_allclose(float(sums_real["loss_sum"]), float(expected), rtol=1e-5)
    correct = np.argmax(logits, -1) == real["label"]
    assert float(sums_real["correct"]) == float(correct.sum())
    num_classes = logits.shape[-1]
    for sums in (sums_real, sums_padded):  # per class: the sums balanced accuracy is computed from
        np.testing.assert_array_equal(sums["class_count"], np.bincount(real["label"], minlength=num_classes))
        np.testing.assert_array_equal(sums["class_correct"],
                                      np.bincount(real["label"], weights=correct, minlength=num_classes))


def test_phase1_eval_step_scores_the_output_and_the_unchanged_input_against_the_target():
    """Per-image PSNR (dB) of the enhancer's output and of its input against batch['target'], summed over the
    real rows: the second is the no-enhancement reference of a restoration target."""
    mesh = sharding.data_mesh()
    model = StandInModel()
    variables = initial_state(model, steps.PRETRAIN, mesh,
                              train_state.make_optimizer(optimizer_config(), 1)).variables
    batch = make_batch(8)
    batch["target"] = np.random.default_rng(1).integers(0, 256, batch["image"].shape).astype(np.uint8)
    batch["mask"] = np.arange(8) < 6
    sums = steps.make_eval_step(model, steps.PRETRAIN, mesh)(variables, sharding.global_batch(batch, mesh))
    images, targets = batch["image"] / 255.0, batch["target"] / 255.0
    outputs = np.asarray(model.apply(variables, images, train=False, method="enhance"))

    def psnr_sum(candidates: np.ndarray) -> float:
        mse = np.mean((candidates - targets) ** 2, axis=(1, 2, 3))
        return float(np.sum(-10.0 * np.log10(mse)[batch["mask"]]))

    assert float(sums["count"]) == 6.0
    np.testing.assert_allclose(float(sums["input_psnr_sum"]), psnr_sum(images), rtol=1e-5)
    np.testing.assert_allclose(float(sums["psnr_sum"]), psnr_sum(outputs), rtol=1e-4)
    assert abs(float(sums["psnr_sum"]) - float(sums["input_psnr_sum"])) > 0.01  # the two are not one number


def compare_device_counts() -> dict[str, float]:
    """One global batch on 1 and on 4 devices: losses of two steps and the BatchNorm statistics."""
    devices = jax.devices()
    assert len(devices) == 4, devices
    one_losses, one_state = run_steps(steps.JOINT, 2, devices[:1])
    four_losses, four_state = run_steps(steps.JOINT, 2, devices)
    differences = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                               one_state.batch_stats, four_state.batch_stats)
    return {"one": one_losses, "four": four_losses, "batch_stats_max_diff": max(jax.tree.leaves(differences)),
            "four_devices_holding_state": len(four_state.params["classifier"]["Dense_0"]["kernel"].sharding.device_set)}


def test_same_global_batch_gives_same_loss_on_1_and_4_devices():
    tests_dir = pathlib.Path(__file__).parent
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tests_dir.parent / ".jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    code = (f"import sys, json; sys.path.insert(0, {str(tests_dir)!r}); import test_training_step as t; "
            "print(json.dumps(t.compare_device_counts()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tests_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(report["four"], report["one"], rtol=1e-5)
    assert report["one"][1] != report["one"][0]  # the second loss is after a real update
    assert report["batch_stats_max_diff"] < 1e-5
    assert report["four_devices_holding_state"] == 4
