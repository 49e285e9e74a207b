"""`host_memory`: with the block cache or glibc's huge-page tunable, repeated XLA executions stop faulting in
4 KiB pages; the restart that sets them up happens only where they are asked for and apply; the block cache
reuses, bounds and releases its blocks as it says."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from urnet_jax import host_memory

# Runs (after the restart, where one is asked for) a jitted program whose temporary buffer (two 64 MiB activations) XLA allocates and frees per call,
# and prints the minor page faults of the later calls.
_PROGRAM = textwrap.dedent("""
    import json, resource
    from urnet_jax import host_memory
    host_memory.restart_with_host_memory_settings()
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
                      "huge_pages_granted": huge_pages_granted() - granted,
                      "block_cache": host_memory.block_cache_stats()}))
""")

# Restarts itself as train.py does, then prints what the restarted process sees.
_RESTART = textwrap.dedent("""
    import json, os, sys
    from urnet_jax import host_memory
    host_memory.restart_with_host_memory_settings("onednn" if "--onednn" in sys.argv else "xla" if "--xla" in sys.argv
                                                  else None)
    print(json.dumps({"argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES", ""),
                      "huge_pages": host_memory.huge_pages_in_use(), "preload": os.environ.get("LD_PRELOAD", ""),
                      "block_cache": host_memory.block_cache_stats() is not None}))
""")


_OURS = (host_memory.HUGE_PAGES_ENV, host_memory.BLOCK_CACHE_ENV, "GLIBC_TUNABLES", "LD_PRELOAD")


def _run(args: list[str], tunables: str | None = None, requested: bool = False, **env: str) -> tuple[dict, str]:
    """(the last stdout line as JSON, stderr) of `python args` with $GLIBC_TUNABLES set to `tunables` (None:
    unset), $URNET_JAX_HUGE_PAGES=1 where `requested` (else unset), JAX on the CPU, no block cache unless
    `env` (added to the environment) or a conv backend asks for it."""
    base = {key: value for key, value in os.environ.items() if key not in _OURS}
    base["JAX_PLATFORMS"] = "cpu"  # the cache's default is for computing on the CPU
    if tunables is not None:
        base["GLIBC_TUNABLES"] = tunables
    if requested:
        base[host_memory.HUGE_PAGES_ENV] = "1"
    completed = subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**base, **env},
                               check=True, timeout=300)
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def _skip_without_huge_pages() -> None:
    env = {key: value for key, value in os.environ.items() if key not in _OURS}
    reason = subprocess.run([sys.executable, "-c", "from urnet_jax import host_memory; "
                             "print(host_memory.why_no_huge_pages())"], capture_output=True, text=True,
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
    assert restarted == {"argv": ["an argument"], "huge_pages": True, "preload": "", "block_cache": False,
                         "tunables": f"glibc.malloc.arena_max=4:{host_memory.HUGE_PAGES_TUNABLE}"}
    assert stderr.count("restarting with GLIBC_TUNABLES") == 1
    same, stderr = _run(["-c", _RESTART, "an argument"])
    assert same == {"argv": ["an argument"], "tunables": "", "huge_pages": False, "preload": "",
                    "block_cache": False} and stderr == ""


def test_no_restart_without_the_request_or_with_the_tunable_set(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))  # never this process itself
    monkeypatch.setattr(host_memory, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(host_memory, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(host_memory.HUGE_PAGES_ENV, raising=False)
    monkeypatch.delenv(host_memory.BLOCK_CACHE_ENV, raising=False)
    host_memory.restart_with_host_memory_settings()
    assert host_memory.why_no_huge_pages() == f"${host_memory.HUGE_PAGES_ENV} is not set" and calls == []
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "0")
    host_memory.restart_with_host_memory_settings()
    assert calls == []
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "1")
    host_memory.restart_with_host_memory_settings()
    assert len(calls) == 1 and calls[0][2]["GLIBC_TUNABLES"] == host_memory.HUGE_PAGES_TUNABLE
    monkeypatch.setenv("GLIBC_TUNABLES", host_memory.HUGE_PAGES_TUNABLE)  # the restarted process
    host_memory.restart_with_host_memory_settings()
    assert len(calls) == 1 and capsys.readouterr().err.count("no huge pages") == 0


def test_a_request_that_cannot_be_met_says_why_on_one_line(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(host_memory, "_glibc_version", lambda: (2, 31))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(host_memory.BLOCK_CACHE_ENV, raising=False)
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "1")
    host_memory.restart_with_host_memory_settings()
    assert calls == []
    assert capsys.readouterr().err == (f"${host_memory.HUGE_PAGES_ENV}: no huge pages "
                                       "(glibc 2.31 has no glibc.malloc.hugetlb (2.35+))\n")


@pytest.mark.parametrize("version, mode, reason", [
    ((2, 31), "madvise", "glibc 2.31 has no glibc.malloc.hugetlb (2.35+)"),
    ((2, 36), "always", "the kernel's transparent huge pages are 'always', not 'madvise'"),
    ((2, 36), "never", "the kernel's transparent huge pages are 'never', not 'madvise'"),
    (None, "madvise", "not Linux with glibc"),
])
def test_why_no_huge_pages_names_the_reason(monkeypatch, version, mode, reason):
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "1")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(host_memory, "_glibc_version", lambda: version)
    monkeypatch.setattr(host_memory, "thp_mode", lambda: mode)
    assert host_memory.why_no_huge_pages() == reason


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(mode_file)) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


# Exercises the block cache's allocator directly (the library preloaded, 16 MiB blocks and up, at most 48 MiB
# idle, stale after 2 s), printing what it saw after each scenario.
_ALLOCATOR = textwrap.dedent("""
    import ctypes, json, time
    from urnet_jax import host_memory
    libc, MiB = ctypes.CDLL(None), 1 << 20
    for name, argtypes in (("malloc", [ctypes.c_size_t]), ("realloc", [ctypes.c_void_p, ctypes.c_size_t]),
                           ("aligned_alloc", [ctypes.c_size_t, ctypes.c_size_t])):
        getattr(libc, name).restype, getattr(libc, name).argtypes = ctypes.c_void_p, argtypes
    libc.free.argtypes = libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
    libc.malloc_usable_size.restype = ctypes.c_size_t
    libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
    seen = {}
    first = libc.malloc(20 * MiB)
    libc.free(first)
    again = libc.malloc(20 * MiB)
    other = libc.malloc(20 * MiB)  # while `again` is in use: a block of its own
    seen["reuse"] = [again == first, other != again, libc.malloc_usable_size(again) == 20 * MiB,
                     host_memory.block_cache_stats()]
    ctypes.memset(again, 7, 20 * MiB)
    grown = libc.realloc(again, 24 * MiB)
    seen["realloc"] = [ctypes.string_at(grown + 20 * MiB - 4, 4) == bytes([7] * 4), grown % 4096 == 0,
                       libc.malloc_usable_size(grown) == 24 * MiB]
    small = libc.malloc(MiB)
    out = ctypes.c_void_p()
    seen["posix_memalign"] = [libc.posix_memalign(ctypes.byref(out), 3, 20 * MiB),
                              libc.posix_memalign(ctypes.byref(out), 64, 17 * MiB), out.value % 4096 == 0,
                              libc.aligned_alloc(128, 20 * MiB) == first, host_memory.block_cache_stats()["maps"]]
    for address in (small, out.value, other, grown, first):
        libc.free(address)
    seen["bounded"] = host_memory.block_cache_stats()
    time.sleep(2.5)  # the idle blocks go stale (2 s)
    libc.free(libc.malloc(18 * MiB))
    seen["stale"] = host_memory.block_cache_stats()
    print(json.dumps(seen))
""")


def _block_cache_library() -> str:
    """The block cache, built (skips the test where it cannot be: no C compiler, not Linux with glibc)."""
    reason = host_memory.block_cache_unavailable()
    if reason is not None:
        pytest.skip(f"no block cache here: {reason}")
    return str(host_memory.build_block_cache())


def test_the_block_cache_reuses_bounds_and_releases_its_blocks():
    library = _block_cache_library()
    seen, _ = _run(["-c", _ALLOCATOR], LD_PRELOAD=library, URNET_JAX_BLOCK_CACHE_MIN_MB="16",
                   URNET_JAX_BLOCK_CACHE_IDLE_MB="48", URNET_JAX_BLOCK_CACHE_STALE_MS="2000")
    same_address, own_block, usable, stats = seen["reuse"]
    assert same_address and own_block and usable
    assert (stats["reuses"], stats["maps"], stats["in_use_bytes"], stats["idle_bytes"]) == (1, 2, 40 << 20, 0)
    assert stats["min_block_bytes"] == 16 << 20 and stats["idle_limit_bytes"] == 48 << 20
    assert seen["realloc"] == [True, True, True]  # the contents moved into a 24 MiB block of its own
    # A bad alignment is refused; 64-byte alignment is served page-aligned; aligned_alloc takes the idle
    # 20 MiB block that realloc freed; the 1 MiB block went to glibc (4 maps: 20, 20, 24 and 17 MiB).
    assert seen["posix_memalign"] == [22, 0, True, True, 4]
    # Freed in turn (17, 20, 24, 20 MiB) under the 48 MiB bound: the 24 MiB block makes the idle 20 MiB one go,
    # the last 20 MiB block the 24 MiB one (other sizes first); 20 + 17 MiB stay idle.
    bounded = seen["bounded"]
    assert (bounded["in_use_bytes"], bounded["idle_bytes"], bounded["unmaps"]) == (0, 37 << 20, 2)
    assert bounded["peak_held_bytes"] == (20 + 20 + 24 + 17) << 20
    stale = seen["stale"]  # the 20 and 17 MiB blocks, idle for 2.5 s, went at the next request
    assert (stale["idle_bytes"], stale["unmaps"], stale["maps"]) == (18 << 20, 4, 5)


def test_the_block_cache_stops_the_page_faults_of_each_execution():
    _block_cache_library()
    system, _ = _run(["-c", _PROGRAM])
    cached, stderr = _run(["-c", _PROGRAM], **{host_memory.BLOCK_CACHE_ENV: "1"})
    assert system["block_cache"] is None and stderr.count("restarting with LD_PRELOAD=") == 1
    assert system["faults_per_call"] > 10_000  # measured 67,546 (2 x 64 MiB in 4 KiB pages, plus scratch)
    assert cached["faults_per_call"] < 1_000  # measured 0
    assert cached["block_cache"]["reuses"] >= 3 * 2 and cached["block_cache"]["unmaps"] == 0


def test_the_block_cache_restart_keeps_the_preloads_and_happens_once():
    library = _block_cache_library()
    restarted, stderr = _run(["-c", _RESTART, "x"], LD_PRELOAD="libm.so.6", **{host_memory.BLOCK_CACHE_ENV: "1"})
    assert restarted == {"argv": ["x"], "tunables": "", "huge_pages": False, "preload": f"{library} libm.so.6",
                         "block_cache": True}
    assert stderr.count("restarting with LD_PRELOAD=") == 1
    for refused in ("0", ""):
        same, stderr = _run(["-c", _RESTART, "x"], **{host_memory.BLOCK_CACHE_ENV: refused})
        assert (same["preload"], same["block_cache"], stderr) == ("", False, "")


def test_the_block_cache_by_default_unless_refused():
    """A model computed on the CPU, with either conv backend, restarts quietly with the cache (asked for by its
    variable, the restart says so); refused, or on an accelerator, there is no restart."""
    library = _block_cache_library()
    for backend in ("--onednn", "--xla"):
        restarted, stderr = _run(["-c", _RESTART, backend])
        assert (restarted["preload"], restarted["block_cache"], stderr) == (library, True, "")
    asked, stderr = _run(["-c", _RESTART, "--xla"], **{host_memory.BLOCK_CACHE_ENV: "1"})
    assert asked["block_cache"] is True and stderr.count("restarting with LD_PRELOAD=") == 1
    for refusal in ({host_memory.BLOCK_CACHE_ENV: "0"}, {"JAX_PLATFORMS": "cuda"}):
        refused, stderr = _run(["-c", _RESTART, "--onednn"], **refusal)
        assert (refused["preload"], refused["block_cache"], stderr) == ("", False, "")


def test_why_the_block_cache_is_missing_for_the_end_of_a_run(monkeypatch, tmp_path):
    """This test process was not started with the cache: wanted, the reason is the failed build where it cannot
    be built, else the missing restart; not wanted, there is nothing to say."""
    if host_memory.linux_glibc_version() is None:
        pytest.skip("the block cache needs Linux with glibc")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv(host_memory.BLOCK_CACHE_ENV, raising=False)
    monkeypatch.setenv("URNET_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert host_memory.why_block_cache_missing("xla") == (
        f"the block cache needs a compiler ({tmp_path / 'no-such-cc'} not found; set CC)")
    assert host_memory.why_block_cache_missing(None) is None
    monkeypatch.setenv(host_memory.BLOCK_CACHE_ENV, "0")
    assert host_memory.why_block_cache_missing("onednn") is None
    monkeypatch.setenv(host_memory.BLOCK_CACHE_ENV, "1")
    monkeypatch.setattr(host_memory, "build_block_cache", lambda: tmp_path / "built.so")
    assert host_memory.why_block_cache_missing(None) == "this process was not restarted with it"


@pytest.mark.parametrize("value, conv_backend, platforms, wanted", [
    (None, None, "cpu", False), (None, "xla", "cpu", True), (None, "onednn", "cpu", True), ("", "xla", "cpu", True),
    (None, "xla", "cuda", False), (None, "xla", "cuda,cpu", False), ("0", "onednn", "cpu", False),
    ("1", "xla", "cuda", True), ("yes", None, "cpu", True),
])
def test_block_cache_wanted_follows_the_variable_then_the_platform(monkeypatch, value, conv_backend, platforms,
                                                                     wanted):
    """Without $URNET_JAX_BLOCK_CACHE a process that computes a model on the CPU gets the cache, with either
    convolution backend; on an accelerator, or with no model, it does not."""
    if value is None:
        monkeypatch.delenv(host_memory.BLOCK_CACHE_ENV, raising=False)
    else:
        monkeypatch.setenv(host_memory.BLOCK_CACHE_ENV, value)
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.block_cache_wanted(conv_backend) is wanted
    monkeypatch.setattr(host_memory, "linux_glibc_version", lambda: None)  # e.g. macOS: nothing to want unasked
    assert host_memory.block_cache_wanted(conv_backend) is (wanted and value not in (None, ""))


def test_jax_computes_on_cpu_without_an_accelerator_plugin(monkeypatch):
    """$JAX_PLATFORMS decides when set (its first platform); otherwise an installed accelerator plugin means
    JAX will not compute on the CPU."""
    monkeypatch.setenv("JAX_PLATFORMS", " CPU ")
    assert host_memory.jax_computes_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert not host_memory.jax_computes_on_cpu()
    monkeypatch.delenv("JAX_PLATFORMS")
    plugin = importlib.metadata.EntryPoint(name="xla_cuda12", value="jax_cuda12_plugin", group="jax_plugins")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: importlib.metadata.EntryPoints([plugin] if group == "jax_plugins" else []))
    assert not host_memory.jax_computes_on_cpu()
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: importlib.metadata.EntryPoints([]))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert host_memory.jax_computes_on_cpu()


def test_a_block_cache_that_cannot_be_built_says_why_on_one_line(tmp_path):
    if host_memory.linux_glibc_version() is None:
        pytest.skip("the block cache needs Linux with glibc")
    same, stderr = _run(["-c", _RESTART], URNET_JAX_CACHE=str(tmp_path), CC=str(tmp_path / "no-such-cc"),
                        **{host_memory.BLOCK_CACHE_ENV: "1"})
    assert same["block_cache"] is False and same["preload"] == ""
    assert stderr == (f"no block cache (the block cache needs a compiler ({tmp_path / 'no-such-cc'} not found; "
                      f"set CC); ${host_memory.BLOCK_CACHE_ENV}=0 turns it off)\n")
