"""What a training run fixes before its first step: `RunContext`, built by `make_context`."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

import urnet_jax.data as data_lib
from urnet_jax import compiler_options, sharding
from urnet_jax.errors import DataError
from urnet_jax.models import layers
from urnet_jax.steps import JOINT, PRETRAIN, compute_dtype
from urnet_jax.train_state import build, init_keys, make_optimizer
from urnet_jax.workdir import prepared_dir_of


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a run fixes before its first step."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    prepared_dir: pathlib.Path
    info: data_lib.PreparedInfo
    mesh: jax.sharding.Mesh
    model: Any
    steps_per_epoch: int
    phase_epochs: dict[int, int]  # phase -> epochs (0: the phase is skipped)
    eval_splits: tuple[str, ...]  # evaluated after every epoch: 'val' (when prepared) and 'test'
    init_key: np.ndarray
    step_key: np.ndarray  # what every step's key is folded from (TrainState.rng)
    fold_in: Callable[[jax.Array, int], jax.Array]  # jitted jax.random.fold_in, replicated output
    show_progress: bool
    is_main: bool  # whether this process writes outputs

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        return sharding.replicated(self.mesh)

    @property
    def image_size(self) -> int:
        return int(self.info.image_size)

    @property
    def selection_split(self) -> str:
        """The split whose metrics choose `best` and `pretrain_best` (train.select_on)."""
        return self.config.train.select_on

    def optimizer(self, phase: int) -> Any:
        """Phase 1: pretrain.optimizer; phase 2: optimizer."""
        freeze_enhancer = phase == JOINT and self.config.train.freeze_enhancer
        optimizer_config = self.config.pretrain.optimizer if phase == PRETRAIN else self.config.optimizer
        return make_optimizer(optimizer_config, self.phase_epochs[phase] * self.steps_per_epoch, freeze_enhancer)

    def data_epoch(self, phase: int, epoch: int) -> int:
        """The data pipeline's epoch index: epochs are counted over both phases."""
        return (self.phase_epochs[PRETRAIN] if phase == JOINT else 0) + epoch

    def global_step(self, phase: int, epoch: int, step_in_epoch: int = 0) -> int:
        return self.data_epoch(phase, epoch) * self.steps_per_epoch + step_in_epoch


def make_context(config: ml_collections.ConfigDict, workdir: pathlib.Path, show_progress: bool) -> RunContext:
    compiler_options.use_cpu_options(config.xla_cpu_options)  # the programs below follow the run's numerics
    layers.use_conv_backend(config.conv_backend)
    prepared_dir = prepared_dir_of(config, workdir)
    info = data_lib.load_info(prepared_dir)
    has_phase1 = config.model.enhancer != "none" and config.pretrain.epochs > 0
    init_key, step_key = init_keys(config.seed)
    mesh = sharding.data_mesh()
    has_val = info.num_examples.get("val", 0) > 0
    if config.train.select_on == "val" and not has_val:
        raise DataError(f"the prepared data in {prepared_dir} has no validation split, which train.select_on='val' "
                        "needs: prepare it again (a new data.prepared_dir, or delete that folder) with "
                        "data.val_fraction > 0 or data.split_dir, or select on test (train.select_on='test')")
    return RunContext(
        config=config, workdir=workdir, prepared_dir=prepared_dir, info=info, mesh=mesh,
        model=build(config, len(info.class_names), compute_dtype(config.precision)),
        steps_per_epoch=data_lib.steps_per_epoch(prepared_dir, config.batch_size),
        phase_epochs={PRETRAIN: config.pretrain.epochs if has_phase1 else 0, JOINT: config.train.epochs},
        eval_splits=("val", "test") if has_val else ("test",),
        init_key=init_key, step_key=step_key, fold_in=jax.jit(jax.random.fold_in, out_shardings=sharding.replicated(mesh)),
        show_progress=show_progress, is_main=sharding.is_main_process())
