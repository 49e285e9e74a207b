"""`host_memory`: with glibc's huge-page tunable, repeated XLA executions stop faulting in 4 KiB pages; the
restart that sets it happens only where it is asked for and applies."""

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
    def huge_pages_granted():  # by the kernel, to every process: 0 where it has none to give
        with open("/proc/vmstat") as counters:
            return sum(int(line.split()[1]) for line in counters if line.startswith("thp_fault_alloc "))
    before, granted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, huge_pages_granted()
    for _ in range(3):
        step(x, k).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    print(json.dumps({"huge_pages": host_memory.huge_pages_in_use(), "faults_per_call": faults,
                      "huge_pages_granted": huge_pages_granted() - granted}))
""")

# Restarts itself as train.py does, then prints what the restarted process sees.
_RESTART = textwrap.dedent("""
    import json, os, sys
    from urnet_jax import host_memory
    host_memory.restart_with_huge_pages()
    print(json.dumps({"argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES", ""),
                      "huge_pages": host_memory.huge_pages_in_use()}))
""")


def _run(args: list[str], tunables: str | None = None, requested: bool = False) -> tuple[dict, str]:
    """(the last stdout line as JSON, stderr) of `python args` with $GLIBC_TUNABLES set to `tunables` (None:
    unset) and $URNET_JAX_HUGE_PAGES=1 where `requested` (else unset)."""
    env = {key: value for key, value in os.environ.items()
           if key not in (host_memory.HUGE_PAGES_ENV, "GLIBC_TUNABLES")}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    if requested:
        env[host_memory.HUGE_PAGES_ENV] = "1"
    completed = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, check=True,
                               timeout=300)
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def _skip_without_huge_pages() -> None:
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    reason = subprocess.run([sys.executable, "-c", "from urnet_jax import host_memory; "
                             "print(host_memory.why_no_restart())"], capture_output=True, text=True,
                            env={**env, host_memory.HUGE_PAGES_ENV: "1"}, check=True).stdout.strip()
    if reason != "None":
        pytest.skip(f"no huge pages on request here: {reason}")


def test_huge_pages_stop_the_page_faults_of_each_execution():
    _skip_without_huge_pages()
    system, _ = _run(["-c", _PROGRAM])
    huge, _ = _run(["-c", _PROGRAM], tunables=host_memory.HUGE_PAGES_TUNABLE)
    assert system["huge_pages"] is False and huge["huge_pages"] is True
    if huge["huge_pages_granted"] == 0:
        pytest.skip("the kernel granted no transparent huge page (none free?): nothing to compare")
    # 2 x 64 MiB of 4 KiB pages is 32768 faults per call when every call maps its buffer afresh (measured:
    # 67,151 with malloc's own settings, 3,764 with huge pages).
    assert system["faults_per_call"] > 10_000
    assert huge["faults_per_call"] < system["faults_per_call"] / 10


def test_the_request_restarts_the_process_with_the_tunable_once():
    _skip_without_huge_pages()
    restarted, stderr = _run(["-c", _RESTART, "an argument"], tunables="glibc.malloc.arena_max=4", requested=True)
    assert restarted == {"argv": ["an argument"], "huge_pages": True,
                         "tunables": f"glibc.malloc.arena_max=4:{host_memory.HUGE_PAGES_TUNABLE}"}
    assert stderr.count("restarting with GLIBC_TUNABLES") == 1
    same, stderr = _run(["-c", _RESTART, "an argument"])
    assert same == {"argv": ["an argument"], "tunables": "", "huge_pages": False} and stderr == ""


def test_no_restart_without_the_request_or_with_the_tunable_set(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))  # never this process itself
    monkeypatch.setattr(host_memory, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(host_memory.HUGE_PAGES_ENV, raising=False)
    host_memory.restart_with_huge_pages()
    assert host_memory.why_no_restart() == f"${host_memory.HUGE_PAGES_ENV} is not set" and calls == []
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "0")
    host_memory.restart_with_huge_pages()
    assert calls == []
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "1")
    host_memory.restart_with_huge_pages()
    assert len(calls) == 1 and calls[0][2]["GLIBC_TUNABLES"] == host_memory.HUGE_PAGES_TUNABLE
    monkeypatch.setenv("GLIBC_TUNABLES", host_memory.HUGE_PAGES_TUNABLE)  # the restarted process
    host_memory.restart_with_huge_pages()
    assert len(calls) == 1 and capsys.readouterr().err.count("no huge pages") == 0


def test_a_request_that_cannot_be_met_says_why_on_one_line(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(host_memory, "_glibc_version", lambda: (2, 31))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "1")
    host_memory.restart_with_huge_pages()
    assert calls == []
    assert capsys.readouterr().err == (f"${host_memory.HUGE_PAGES_ENV}: no huge pages "
                                       "(glibc 2.31 has no glibc.malloc.hugetlb (2.35+))\n")


@pytest.mark.parametrize("version, mode, reason", [
    ((2, 31), "madvise", "glibc 2.31 has no glibc.malloc.hugetlb (2.35+)"),
    ((2, 36), "always", "the kernel's transparent huge pages are 'always', not 'madvise'"),
    ((2, 36), "never", "the kernel's transparent huge pages are 'never', not 'madvise'"),
    (None, "madvise", "not Linux with glibc"),
])
def test_why_no_restart_names_the_reason(monkeypatch, version, mode, reason):
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "1")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(host_memory, "_glibc_version", lambda: version)
    monkeypatch.setattr(host_memory, "thp_mode", lambda: mode)
    assert host_memory.why_no_restart() == reason


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(mode_file)) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None
