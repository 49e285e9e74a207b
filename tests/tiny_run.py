"""The tiny UR-Net config of the tests, session-wide runs shared by pytest-xdist workers, and `jit_fast`.

Test modules import what they need, e.g. `from tiny_run import tiny_config`; the `trained_run` fixture built
from it is in tests/conftest.py.
Every test that trains uses `TINY` (changing as few keys as possible), so that the compiled programs are
shared through the persistent compilation cache (tests/conftest.py).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import os
import pathlib
from typing import Callable, Iterator

import jax
from urnet_jax import compiler_options, config as config_lib
from urnet_jax.workdir import TIMING_KEYS

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Unoptimised XLA:CPU code for tests of tiny models: compiles ~40% faster, and they run in milliseconds anyway.
jit_fast = functools.partial(jax.jit, compiler_options={**compiler_options.UNOPTIMISED,
                                                        "xla_llvm_disable_expensive_passes": True})
# Keys that differ from the paper's protocol: a tiny UR-Net (the deepest ResNet map stays 3x3 at 96 px).
TINY = {
    "model.enhancer_width": 4, "model.classifier": "resnet18", "model.classifier_width": 4,
    "data.allow_synthetic": True, "data.image_size": 96, "data.synthetic_per_class": 16, "data.train_size": 64,
    "pretrain.epochs": 2, "train.epochs": 2, "batch_size": 8, "eval_batch_size": 8,
    "optimizer.lr": 0.02, "pretrain.optimizer.lr": 0.02, "checkpoint.every_steps": 3, "checkpoint.keep": 2, "log_every_steps": 1,
}


def tiny_config(prepared_dir: pathlib.Path | None = None, **changes):
    """The validated tiny config, with `changes` ({"section.key": value}) applied."""
    config = config_lib.base_config()
    if prepared_dir is not None:
        changes = {"data.prepared_dir": str(prepared_dir), **changes}
    for key, value in {**TINY, **changes}.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return config_lib.validate(config)


def without_time(rows: list[dict]) -> list[dict]:
    """Metrics rows without their wall times (`TIMING_KEYS`): what two runs of the same computation share."""
    return [{key: value for key, value in row.items() if key not in TIMING_KEYS} for row in rows]


def subprocess_env() -> dict[str, str]:
    """Environment for entry-point subprocesses: the tests' persistent compilation cache (conftest.py)."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(REPO_ROOT / ".jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


@contextlib.contextmanager
def shared_directory(tmp_path_factory, name: str) -> Iterator[tuple[pathlib.Path, bool]]:
    """A session-wide directory, shared by the pytest-xdist workers of one session (built by the first
    worker under a lock): yields (path, whether it still has to be built)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # xdist: basetemp is per worker; its parent is this session's
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield path, not done.exists()
        done.touch()


_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # once per program lowered for XLA
_lowered = collections.Counter()


def _count_lowering(event: str, duration: float, **kwargs) -> None:
    if event == _LOWERING_EVENT:
        _lowered["programs"] += 1


jax.monitoring.register_event_duration_secs_listener(_count_lowering)


@contextlib.contextmanager
def lowered_programs() -> Iterator[Callable[[], int]]:
    """Counts the XLA programs lowered inside the block, from empty in-memory caches: every jitted function
    and every eagerly applied operation (an XLA program of its own) counts once per shape. A persistent
    compilation cache hit still counts: it skips the compilation, not the lowering."""
    jax.clear_caches()
    start = _lowered["programs"]
    yield lambda: _lowered["programs"] - start
