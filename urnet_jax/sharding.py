"""Data parallelism over every visible device: one mesh axis, batch sharded, everything else replicated.

A training step is `jax.jit` over arrays placed with these shardings; XLA inserts the collectives, so a
mean over the batch axis (loss, BatchNorm statistics) is a mean over the *global* batch whatever the
device count. Multi-host runs call `initialize_distributed` before anything touches a device; each
process then feeds its own share of every global batch (`global_batch`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from urnet_jax.errors import ConfigError

DATA_AXIS = "data"
MULTIHOST_ENV = "URNET_MULTIHOST"
NUM_PROCESSES_ENV = "URNET_NUM_PROCESSES"
PROCESS_ID_ENV = "URNET_PROCESS_ID"


def initialize_distributed(enabled: bool = False) -> bool:
    """Joins a multi-host job with `jax.distributed.initialize()` when asked to.

    Asked to = `enabled`, or the environment variable URNET_MULTIHOST=1, or JAX_COORDINATOR_ADDRESS set.
    The coordinator, process count and id come from cluster auto-detection (SLURM, Open MPI, Cloud TPU,
    Kubernetes, ...) or, elsewhere, from JAX_COORDINATOR_ADDRESS, URNET_NUM_PROCESSES and URNET_PROCESS_ID.
    Returns whether it initialised; ConfigError (one line) when the job cannot be described.
    """
    wanted = enabled or os.environ.get(MULTIHOST_ENV) == "1" or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if not wanted:
        return False
    explicit = {}
    for key, variable in (("num_processes", NUM_PROCESSES_ENV), ("process_id", PROCESS_ID_ENV)):
        if os.environ.get(variable):
            if not os.environ[variable].isdigit():
                raise ConfigError(f"{variable} must be a non-negative integer, got {os.environ[variable]!r}")
            explicit[key] = int(os.environ[variable])
    try:
        jax.distributed.initialize(**explicit)
    except ValueError as error:  # no cluster detected and the job not described
        raise ConfigError(f"cannot join the multi-host job: {str(error).splitlines()[0]} (outside a detected "
                          f"cluster set JAX_COORDINATOR_ADDRESS, {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV})") from None
    return True


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of the train state and of scalar metrics: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: leading (example) axis split along 'data'."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of a batch (each leaf: (B_local, ...) -> (B_global, ...))."""
    sharding = batch_sharded(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in host_batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree of host or device arrays on every device of `mesh` (same values on every process)."""
    return jax.device_put(tree, replicated(mesh))


def with_sharding(abstract_tree: Any, sharding: NamedSharding) -> Any:
    """ShapeDtypeStructs of `abstract_tree` carrying `sharding` (restore targets for orbax)."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        abstract_tree)


def is_main_process() -> bool:
    """Whether this process writes logs, metrics and TensorBoard files (process 0)."""
    return jax.process_index() == 0
