"""Shared test set-up: a persistent XLA compilation cache, the location of the real data, and a finished tiny run."""

import pathlib

import jax
import pytest

from tiny_run import REPO_ROOT, shared_directory, tiny_config
import urnet_jax.data as data_lib
from urnet_jax import trainer

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

jax.config.update("jax_compilation_cache_dir", str(REPO_ROOT / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def pbc_dir() -> pathlib.Path:
    """../shared/data/pbc, or a skip with a message when this machine does not have it."""
    path = SHARED_DATA / "pbc"
    if not path.is_dir():
        pytest.skip(f"real PBC data not found at {path} (only present on the project's machines)")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> pathlib.Path:
    """A finished tiny run (no pre-training, 2 joint epochs on 64 synthetic 96 px images)."""
    with shared_directory(tmp_path_factory, "tiny_trained_run") as (workdir, to_build):
        if to_build:
            trainer.train_and_evaluate(tiny_config(**{"pretrain.epochs": 0}), workdir, show_progress=False)
    return workdir


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> pathlib.Path:
    """The tiny synthetic data set, prepared once for every test of the session."""
    with shared_directory(tmp_path_factory, "tiny_data") as (out_dir, to_build):
        if to_build:
            data_lib.prepare(tiny_config(out_dir).data, out_dir)
    return out_dir


@pytest.fixture(scope="session")
def reference_run(prepared, tmp_path_factory) -> pathlib.Path:
    """An uninterrupted run of the tiny config: the reference that resumed runs must reproduce."""
    with shared_directory(tmp_path_factory, "reference_run") as (workdir, to_build):
        if to_build:
            trainer.train_and_evaluate(tiny_config(prepared), workdir, show_progress=False)
    return workdir
