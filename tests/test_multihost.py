"""Two real processes joined by `jax.distributed` on this machine (local coordinator, gloo CPU collectives).

Full training runs of two processes (same metrics as one process, only process 0 writing, kill and
resume) take minutes on a CPU: `scripts/multihost_check.sh`. This test checks the mechanism they rest on,
in seconds: `sharding.initialize_distributed` joins the job from the environment `srun` gives its tasks,
each process feeds its own rows of a global batch, and a jitted mean over the batch is the mean of the
*global* batch on both processes (as the loss and BatchNorm statistics of the train step are).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GLOBAL_BATCH = np.arange(8 * 3, dtype=np.float32).reshape(8, 3) ** 1.5

WORKER = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from urnet_jax import sharding

joined = sharding.initialize_distributed()
mesh = sharding.data_mesh()
rows = np.asarray(json.loads(sys.argv[1]), np.float32)
share = len(rows) // jax.process_count()
local = rows[jax.process_index() * share:(jax.process_index() + 1) * share]
batch = sharding.global_batch({"x": local}, mesh)
mean = jax.jit(lambda b: jnp.mean(b["x"], axis=0), out_shardings=sharding.replicated(mesh))(batch)
print("RESULT " + json.dumps({"joined": joined, "process_index": jax.process_index(),
      "process_count": jax.process_count(), "device_count": jax.device_count(),
      "is_main": sharding.is_main_process(), "global_shape": list(batch["x"].shape),
      "mean": np.asarray(mean).tolist()}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_compute_on_the_global_batch():
    port, count = _free_port(), 2
    processes = []
    for index in range(count):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               # What `srun` gives the tasks of a job step; JAX's cluster detection reads count and id.
               "SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": str(count),
               "SLURM_PROCID": str(index), "SLURM_LOCALID": str(index)}
        env.pop("XLA_FLAGS", None)  # one CPU device per process
        processes.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(GLOBAL_BATCH.tolist())],
                                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    results = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail("the two processes did not finish within 240 s")
        assert process.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1][len("RESULT "):]))
    assert [r["process_index"] for r in results] == [0, 1]
    assert [r["is_main"] for r in results] == [True, False]
    for result in results:
        assert result["joined"] and result["process_count"] == 2 and result["device_count"] == 2
        assert result["global_shape"] == [8, 3]
        np.testing.assert_allclose(result["mean"], GLOBAL_BATCH.mean(axis=0), rtol=1e-6)
