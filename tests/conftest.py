"""Shared test set-up: a persistent XLA compilation cache and the location of the real data."""

import pathlib

import jax
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
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
