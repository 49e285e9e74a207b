"""`host_memory.keep_freed_blocks`: after it, repeated XLA executions stop faulting in fresh pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from urnet_jax import host_memory

# Runs a jitted program whose temporary buffer (two 64 MiB activations) XLA allocates and frees per call,
# and prints the minor page faults of the later calls.
_PROGRAM = textwrap.dedent("""
    import json, resource
    from urnet_jax import host_memory
    kept = host_memory.keep_freed_blocks()
    import jax, jax.numpy as jnp
    dims = ("NHWC", "HWIO", "NHWC")
    @jax.jit
    def step(x, k):
        y = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims)
        z = jax.lax.conv_general_dilated(y, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims)
        return jnp.sum(z * y)
    x, k = jnp.ones((16, 128, 128, 64)), jnp.full((3, 3, 64, 64), 0.01)
    for _ in range(2):
        step(x, k).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step(x, k).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    print(json.dumps({"kept": kept, "reported": host_memory.freed_blocks_kept(), "faults_per_call": faults}))
""")


def _run(system_malloc: bool) -> dict:
    env = {key: value for key, value in os.environ.items() if key != host_memory.SYSTEM_MALLOC_ENV}
    if system_malloc:
        env[host_memory.SYSTEM_MALLOC_ENV] = "1"
    completed = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True, env=env,
                               check=True, timeout=300)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_kept_blocks_stop_the_page_faults_of_each_execution():
    system, kept = _run(system_malloc=True), _run(system_malloc=False)
    assert system["kept"] is False and system["reported"] is False
    if not kept["kept"]:
        pytest.skip("this C library is not glibc: keep_freed_blocks does nothing here")
    assert kept["reported"] is True
    if system["faults_per_call"] < 1000:
        pytest.skip(f"malloc's own settings fault only {system['faults_per_call']:.0f} pages per call here "
                    "(huge pages?): nothing to compare")
    # 2 x 64 MiB of 4 KiB pages is 32768 faults per call when every call maps its buffer afresh.
    assert kept["faults_per_call"] < system["faults_per_call"] / 20


def test_system_malloc_env_and_xla_s_convolutions_leave_malloc_alone(monkeypatch):
    monkeypatch.setattr(host_memory, "keep_freed_blocks", lambda: True)  # never this process's own malloc
    assert host_memory.keep_freed_blocks_for("onednn") is True
    assert host_memory.keep_freed_blocks_for("xla") is False
    monkeypatch.undo()
    monkeypatch.setenv(host_memory.SYSTEM_MALLOC_ENV, "1")
    assert host_memory.keep_freed_blocks() is False
