"""A tiny trained UR-Net workdir shared by the evaluate/predict tests (and across pytest-xdist workers).

Import the fixture into a test module with `from tiny_run import trained_run  # noqa: F401`. The run is
trained once per test session: the first worker to get the lock trains it under the session's shared
base temp folder, the others reuse it.
"""

from __future__ import annotations

import fcntl
import os
import pathlib

import pytest

from urnet_jax import cli, training
from urnet_jax.config import base_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The tiny model and data of tests/test_training.py (so that the joint phase's compiled programs are
# shared through the persistent compilation cache), without phase 1, to save its compilation.
TINY = {
    "model.enhancer_width": 4, "model.classifier": "resnet18", "model.classifier_width": 4,
    "data.image_size": 96, "data.synthetic_per_class": 10, "data.train_size": 32,
    "pretrain.epochs": 0, "train.epochs": 2, "batch_size": 8, "eval_batch_size": 8,
    "optimizer.lr": 0.05, "checkpoint.every_steps": 0, "checkpoint.keep": 1, "log_every_steps": 1,
}


def subprocess_env() -> dict[str, str]:
    """Environment for entry-point subprocesses: the tests' persistent compilation cache (conftest.py)."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(REPO_ROOT / ".jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> pathlib.Path:
    """A finished tiny run (no pre-training, 2 joint epochs on 32 synthetic 96 px images)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by every worker of this session
    workdir = root / "tiny_trained_run"
    with open(root / "tiny_trained_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (workdir / "TRAINED").is_file():
            config = base_config()
            for key, value in TINY.items():
                section, _, name = key.rpartition(".")
                (config[section] if section else config)[name] = value
            training.train(cli.validate(config), workdir, show_progress=False)
            (workdir / "TRAINED").touch()
    return workdir
