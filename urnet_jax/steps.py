"""The pure, jit-compiled training and evaluation steps of both phases, and a split's evaluation.

Phase 1 (PRETRAIN) trains the enhancer alone to reproduce its target (the input itself unless the batch
carries 'target'; pixel MSE, or `pretrain.loss`'s `ReconstructionLoss`); phase 2 (JOINT) trains enhancer +
classifier with softmax cross-entropy. The steps are jitted over a data-parallel mesh (`urnet_jax.sharding`): the batch is sharded along 'data', the state is
replicated, and XLA inserts the collectives, so every mean is over the global batch. Each step function
may be traced once (`chex.assert_max_traces`): a second trace means silent recompilation.
"""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import urnet_jax.data as data_lib
from urnet_jax import compiler_options, sharding
from urnet_jax.errors import RunError
from urnet_jax.reconstruction_loss import ReconstructionLoss
from urnet_jax.train_state import JOINT, PRETRAIN, TrainState, Variables, current_learning_rate, phase_apply_fn

__all__ = ["PRETRAIN", "JOINT", "compute_dtype", "to_unit_range", "psnr", "make_train_step", "make_eval_step",
           "evaluate_split"]

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
_step_ids = itertools.count()
EVAL_BATCH_KEYS = ("image", "label", "mask", "target")  # what an evaluation batch may carry
SATURATION_MARGIN = 0.01  # an output value this close to 0 or 1 counts as saturated
MIN_MSE = 1e-10  # the MSE floor of `psnr` (100 dB)


def compute_dtype(precision: str) -> jnp.dtype | None:
    """The model's computation dtype for config.precision (parameters always stay float32)."""
    return jnp.bfloat16 if precision == "bfloat16" else None


def to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 (N, H, W, 3) -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def _check_batch(batch: Batch, keys: tuple[str, ...]) -> None:
    """Trace-time shape and dtype checks: image uint8 (B, H, W, 3); label int32 (B,); mask bool (B,)."""
    images = batch["image"]
    chex.assert_rank(images, 4)
    chex.assert_type(images, jnp.uint8)
    chex.assert_axis_dimension(images, 3, 3)
    for key, dtype in (("label", jnp.int32), ("mask", jnp.bool_)):
        if key in keys:
            chex.assert_shape(batch[key], (images.shape[0],))
            chex.assert_type(batch[key], dtype)


def _traced_once(function: Callable, name: str) -> Callable:
    """`function` raising AssertionError when traced a second time. chex counts traces per definition
    site and name, so each step function gets a name of its own: the count is per step function."""
    function.__name__ = function.__qualname__ = f"{name}_{next(_step_ids)}"
    return chex.assert_max_traces(function, n=1)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _output(apply_fn: Callable, variables: Variables, images: jax.Array, train: bool,
            rng: jax.Array | None = None) -> tuple[jax.Array, Variables]:
    """Phase 1: the enhanced image (N, H, W, 3); phase 2: the logits (N, classes). Both float32."""
    if train:
        output, updates = apply_fn(variables, to_unit_range(images), train=True, mutable=["batch_stats"],
                                   rngs={"dropout": rng})
    else:
        output, updates = apply_fn(variables, to_unit_range(images), train=False), {}
    return output.astype(jnp.float32), updates


def _phase1_target(batch: Batch) -> jax.Array:
    """What phase 1 reconstructs, float32 in [0, 1]: batch['target'] when the batch has one, else the input."""
    return to_unit_range(batch["target"] if "target" in batch else batch["image"])


def _per_example_loss(phase: int, output: jax.Array, batch: Batch) -> jax.Array:
    """Phase 1: pixel MSE against the target; phase 2: softmax cross-entropy. Shape (N,), float32."""
    if phase == PRETRAIN:
        return ReconstructionLoss()(output, _phase1_target(batch))
    return optax.softmax_cross_entropy_with_integer_labels(output, batch["label"])


def make_train_step(phase: int, mesh: jax.sharding.Mesh, reconstruction_loss: ReconstructionLoss | None = None,
                    loss_variables: Any = None) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """The jit-compiled step (state, batch, rng) -> (new state, metrics); `state` is donated.

    Phase 1 minimises `reconstruction_loss` (default: MSE) against the target (`_phase1_target`);
    `loss_variables` (replicated; the perceptual VGG's) are passed to it as an argument of the compiled step.

    The state brings the model (`apply_fn`) and the optimiser (`tx`). batch: {'image': uint8
    (B, H, W, 3), 'label': int32 (B,)} sharded along 'data'. metrics (replicated scalars): 'loss' (mean
    over the batch), 'accuracy' (phase 2 only; fraction), 'finite' (the loss and every new parameter are
    finite), 'learning_rate' (the rate this step applied).
    """

    def train_step(state: TrainState, batch: Batch, rng: jax.Array,
                   *extra_variables: Any) -> tuple[TrainState, Metrics]:
        _check_batch(batch, ("label",))

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Variables]]:
            variables = {"params": params, "batch_stats": state.batch_stats}
            output, updates = _output(state.apply_fn, variables, batch["image"], True, rng)
            if phase == PRETRAIN:
                per_example = (reconstruction_loss or ReconstructionLoss())(output, _phase1_target(batch),
                                                                             *extra_variables)
            else:
                per_example = _per_example_loss(phase, output, batch)
            return jnp.mean(per_example), (output, updates)

        (loss, (output, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
        metrics = {"loss": loss, "finite": jnp.isfinite(loss) & _all_finite(new_state.params),
                   "learning_rate": current_learning_rate(new_state.opt_state)}
        if phase == JOINT:
            metrics["accuracy"] = jnp.mean((jnp.argmax(output, axis=-1) == batch["label"]).astype(jnp.float32))
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    extra = () if loss_variables is None else (loss_variables,)
    step = jax.jit(_traced_once(train_step, f"phase{phase}_train_step"),
                   in_shardings=(replicated, sharding.batch_sharded(mesh), replicated) + (replicated,) * len(extra),
                   out_shardings=(replicated, replicated), donate_argnums=0,
                   compiler_options=compiler_options.for_mesh(mesh))
    if not extra:
        return step
    return lambda state, batch, rng: step(state, batch, rng, *extra)


def psnr(mse: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB of images in [0, 1] from their MSE: 10 log10(1 / mse), with the
    MSE floored at MIN_MSE (a perfect reconstruction reads 100 dB, not infinity)."""
    return -10.0 * jnp.log10(jnp.maximum(mse, MIN_MSE))


def make_eval_step(model: nn.Module, phase: int,
                   mesh: jax.sharding.Mesh) -> Callable[[Variables, Batch], Metrics]:
    """The jit-compiled evaluation (variables, batch) -> sums over the batch's real (mask=True) rows.

    batch: {'image', 'label', 'mask' (bool (B,))[, 'target' (phase 1)]} sharded along 'data'. Returns
    replicated float32 sums: 'count' (images); phase 1: 'loss_sum' (per-image MSE against the target),
    'psnr_sum' (per-image PSNR, dB), 'input_psnr_sum' (per-image PSNR of the unchanged input to the same
    target, dB: what no enhancement scores, 100 dB when the target is the input), 'saturated_sum' (per image,
    the fraction of output values within SATURATION_MARGIN of 0 or 1, as
    `evaluation.metrics.saturated_fraction`); phase 2: 'loss_sum'
    (cross-entropy), 'correct', and per class (num_classes,) 'class_correct' and 'class_count'.
    """
    apply_fn = phase_apply_fn(model, phase)

    def eval_step(variables: Variables, batch: Batch) -> Metrics:
        _check_batch(batch, ("label", "mask"))
        output, _ = _output(apply_fn, variables, batch["image"], False)
        mask = batch["mask"].astype(jnp.float32)
        per_example_loss = _per_example_loss(phase, output, batch)
        sums = {"loss_sum": jnp.sum(per_example_loss * mask), "count": jnp.sum(mask)}
        if phase == PRETRAIN:
            target = _phase1_target(batch)
            mse = jnp.mean(jnp.square(output - target), axis=(1, 2, 3))
            input_mse = jnp.mean(jnp.square(to_unit_range(batch["image"]) - target), axis=(1, 2, 3))
            saturated = (output <= SATURATION_MARGIN) | (output >= 1.0 - SATURATION_MARGIN)
            sums["psnr_sum"] = jnp.sum(psnr(mse) * mask)
            sums["input_psnr_sum"] = jnp.sum(psnr(input_mse) * mask)
            sums["saturated_sum"] = jnp.sum(jnp.mean(saturated, axis=(1, 2, 3)) * mask)
        else:
            correct = (jnp.argmax(output, axis=-1) == batch["label"]) * mask
            one_hot = jax.nn.one_hot(batch["label"], output.shape[-1]) * mask[:, None]
            sums["correct"] = jnp.sum(correct)
            sums["class_correct"] = jnp.sum(one_hot * correct[:, None], axis=0)
            sums["class_count"] = jnp.sum(one_hot, axis=0)
        return sums

    replicated = sharding.replicated(mesh)
    return jax.jit(_traced_once(eval_step, f"phase{phase}_eval_step"),
                   in_shardings=(replicated, sharding.batch_sharded(mesh)), out_shardings=replicated,
                   compiler_options=compiler_options.for_mesh(mesh))


def evaluate_split(eval_step: Callable[[Variables, Batch], Metrics], variables: Variables,
                   prepared_dir: str | pathlib.Path, split: str, batch_size: int,
                   mesh: jax.sharding.Mesh) -> dict[str, float]:
    """The means over every example of a prepared split ('train', 'val' or 'test') of `make_eval_step`'s
    sums. Phase 1: 'loss' (= 'mse', per-image MSE), 'psnr' (the mean of per-image PSNR, dB), 'input_psnr'
    (the same for the unchanged input: the no-enhancement reference), 'saturated_fraction'. Phase 2: 'loss'
    (cross-entropy), 'accuracy', 'balanced_accuracy' (the mean recall of the classes present in the split).
    """
    totals: dict[str, Any] = {}

    def absorb(sums: Metrics) -> None:  # waits for the batch's sums, adds them up in float64 on the host
        for key, value in jax.device_get(sums).items():
            totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)

    pending = None  # the previous batch's sums, read while the next batch is read, sharded and dispatched
    for host_batch in data_lib.eval_batches(prepared_dir, split, batch_size, process_index=jax.process_index(),
                                            process_count=jax.process_count()):
        batch = sharding.global_batch({key: host_batch[key] for key in EVAL_BATCH_KEYS if key in host_batch}, mesh)
        sums = eval_step(variables, batch)
        if pending is not None:
            absorb(pending)
        pending = sums
    if pending is not None:
        absorb(pending)
    count = float(totals.get("count", 0.0))
    if count == 0:
        raise RunError(f"the {split} split of {prepared_dir} is empty")
    loss = float(totals["loss_sum"]) / count
    if "psnr_sum" in totals:
        return {"loss": loss, "mse": loss, "psnr": float(totals["psnr_sum"]) / count,
                "input_psnr": float(totals["input_psnr_sum"]) / count,
                "saturated_fraction": float(totals["saturated_sum"]) / count}
    present = totals["class_count"] > 0
    recall = totals["class_correct"][present] / totals["class_count"][present]
    return {"loss": loss, "accuracy": float(totals["correct"]) / count, "balanced_accuracy": float(np.mean(recall))}
