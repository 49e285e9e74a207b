"""Host memory for XLA's per-step buffers (glibc, Linux): a cache of large blocks, and huge pages on request.

XLA's CPU runtime allocates each execution's temporary buffer (all of a train step's intermediate arrays:
about 0.97 GB for UR-Net(32) + ResNet18 at 128 px, batch 16) when the execution starts and frees it when it
ends. glibc's malloc maps so large a block afresh (`mmap`) and unmaps it on free, so every step faults the
whole buffer in again: 236,000 faults of 4 KiB pages and 0.3-0.65 s of kernel time per step on a 2-core CPU
(docs/BENCHMARKS.md). Two remedies:

* **The block cache** (`train.py`'s default wherever JAX computes on the CPU; $URNET_JAX_BLOCK_CACHE=0 refuses
  it, =1 asks for it): `block_cache.c`, compiled on first use (`$CC`, else `cc`) and loaded with `LD_PRELOAD`,
  serves requests of at least 16 MiB from mappings of its own and keeps a
  freed block for the next request of the same size (idle blocks: at most a quarter of the machine's memory,
  none older than 30 s), so consecutive steps reuse the pages they faulted in (a test program: no fault per
  call against 67,546); `block_cache_stats` reports its counters. In a process that also runs torch it
  serves torch's large blocks too. On a 2-core Intel Xeon it made whole runs 8-9% faster with either
  convolution backend, for 1.3-1.7 GiB more peak memory (the step's buffers stay resident).
* **Huge pages** ($URNET_JAX_HUGE_PAGES=1): glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35+) makes
  malloc ask for transparent huge pages on the blocks it maps, which the kernel grants in its THP mode
  'madvise': the buffer is faulted in as 2 MiB pages (a test program with two 64 MiB activations: 3,764
  faults per call against 67,151). It helped a whole `train.py` run on a 2-core AMD EPYC virtual machine
  (6.2-6.8 against 5.9-6.0 images/s) and cost time on a 2-core Intel Xeon one (5.2 and 6.6 against 7.1 and
  7.5 images/s).

Both act when a process starts, so `restart_with_host_memory_settings` runs the process's own command again
with them (`os.execve`, the same process id); `train.py` calls it first, `evaluate.py` and `predict.py` through
`cli.restart_with_host_memory_of_run`.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

from urnet_jax import native_build

HUGE_PAGES_ENV = "URNET_JAX_HUGE_PAGES"
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
BLOCK_CACHE_ENV = "URNET_JAX_BLOCK_CACHE"
BLOCK_CACHE_SOURCE = Path(__file__).with_name("block_cache.c")
_TUNABLES_ENV = "GLIBC_TUNABLES"
_PRELOAD_ENV = "LD_PRELOAD"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_STATS = ("reuses", "maps", "unmaps", "in_use_bytes", "idle_bytes", "peak_held_bytes", "min_block_bytes",
          "idle_limit_bytes")


def _glibc_version() -> tuple[int, ...] | None:
    """glibc's version, e.g. (2, 36); None with another C library."""
    try:
        get_version = ctypes.CDLL(None).gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    get_version.restype = ctypes.c_char_p
    return tuple(int(part) for part in get_version().decode().split(".")[:2])


def thp_mode(mode_file: str = _THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'); None where it has none."""
    try:
        with open(mode_file) as modes:
            text = modes.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _requested(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _tunable_set() -> bool:
    return HUGE_PAGES_TUNABLE in os.environ.get(_TUNABLES_ENV, "").split(":")


def linux_glibc_version() -> tuple[int, ...] | None:
    """glibc's version on Linux; None elsewhere (the block cache and huge pages need both)."""
    return _glibc_version() if sys.platform.startswith("linux") else None


def why_no_huge_pages() -> str | None:
    """Why `restart_with_host_memory_settings` would not add huge pages (no request, no glibc 2.35+, a kernel
    that grants no huge pages on request or gives them unasked, the tunable already set); None when it would."""
    if not _requested(HUGE_PAGES_ENV):
        return f"${HUGE_PAGES_ENV} is not set"
    if _tunable_set():
        return f"${_TUNABLES_ENV} already has {HUGE_PAGES_TUNABLE}"
    version = linux_glibc_version()
    if version is None:
        return "not Linux with glibc"
    if version < (2, 35):
        return f"glibc {'.'.join(map(str, version))} has no {HUGE_PAGES_TUNABLE.split('=')[0]} (2.35+)"
    mode = thp_mode()
    if mode != "madvise":
        return f"the kernel's transparent huge pages are {mode!r}, not 'madvise'"
    return None


def huge_pages_in_use() -> bool:
    """Whether malloc's large blocks get transparent huge pages in this process (for logs and benchmark
    results): the tunable set under THP mode 'madvise', or THP mode 'always'."""
    mode = thp_mode()
    return mode == "always" or (mode == "madvise" and _tunable_set() and (_glibc_version() or (0,)) >= (2, 35))


def build_block_cache() -> Path:
    """Compiles `block_cache.c` into the build cache (once per source and compiler; `$CC`, else `cc`) -> the
    shared library. Raises `native_build.BuildError` with a one-line message where it cannot."""
    return native_build.shared_library(BLOCK_CACHE_SOURCE, compiler_env="CC", default_compiler="cc",
                                       flags=["-ldl", "-lpthread"], purpose="the block cache")


def block_cache_unavailable() -> str | None:
    """Why the block cache cannot be had here (not Linux with glibc, or its build fails), in one line; None
    when it can (it is then built)."""
    if linux_glibc_version() is None:
        return "not Linux with glibc"
    try:
        build_block_cache()
    except native_build.BuildError as error:
        return str(error)
    return None


def block_cache_stats() -> dict[str, int] | None:
    """The block cache's counters in this process (reuses and new mappings of blocks, idle blocks unmapped,
    bytes in use and idle now, the peak of both together, its two limits in bytes); None where it is not
    loaded."""
    try:
        read = ctypes.CDLL(None).urnet_block_cache_stats
    except (OSError, AttributeError):
        return None
    values = (ctypes.c_uint64 * len(_STATS))()
    read(values)
    return dict(zip(_STATS, values))


def describe_block_cache(stats: dict[str, int]) -> str:
    """One line for a log: what the cache did."""
    return (f"block cache: {stats['reuses']} blocks reused, {stats['maps']} mapped, {stats['unmaps']} unmapped; "
            f"{stats['peak_held_bytes'] / 2**30:.2f} GiB held at most (blocks >= "
            f"{stats['min_block_bytes'] >> 20} MiB, at most {stats['idle_limit_bytes'] >> 20} MiB idle)")


def jax_computes_on_cpu() -> bool:
    """Whether JAX will compute on the CPU in this process, told before it starts: the first platform of
    $JAX_PLATFORMS is 'cpu', or, without that variable, no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").replace(" ", "").lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return importlib.util.find_spec("jax_plugins") is None and importlib.util.find_spec("libtpu") is None


def block_cache_wanted(conv_backend: str | None = None) -> bool:
    """Whether a process computing with `conv_backend` (None: no model, or no default) should have the block cache:
    $URNET_JAX_BLOCK_CACHE=1 asks for it, =0 refuses it, and without the variable every model computed on the
    CPU of a Linux machine with glibc gets it (`jax_computes_on_cpu`; whole runs 8-9% faster with either backend,
    docs/BENCHMARKS.md)."""
    value = os.environ.get(BLOCK_CACHE_ENV, "")
    if value:
        return value != "0"
    return conv_backend is not None and linux_glibc_version() is not None and jax_computes_on_cpu()


def why_no_block_cache(conv_backend: str | None = None) -> str | None:
    """Why `restart_with_host_memory_settings(conv_backend)` would not load the block cache (not wanted, not
    Linux with glibc, loaded already, or named in $LD_PRELOAD without loading); None when it would (the build
    may still fail: it then says so)."""
    if not block_cache_wanted(conv_backend):
        return f"${BLOCK_CACHE_ENV} is {os.environ.get(BLOCK_CACHE_ENV, '')!r} and conv_backend {conv_backend!r}"
    if linux_glibc_version() is None:
        return "not Linux with glibc"
    if block_cache_stats() is not None:
        return "the block cache is loaded"
    if BLOCK_CACHE_SOURCE.stem in os.environ.get(_PRELOAD_ENV, ""):
        return f"${_PRELOAD_ENV} names the block cache, but it is not loaded"
    return None


def why_block_cache_missing(conv_backend: str | None = None) -> str | None:
    """Why this process runs without the block cache that `block_cache_wanted(conv_backend)` says it should have,
    in a few words (for the end of a run's log); None where it has the cache or does not want it."""
    if block_cache_stats() is not None or not block_cache_wanted(conv_backend):
        return None
    return (why_no_block_cache(conv_backend) or block_cache_unavailable()
            or "this process was not restarted with it")


def restart_with_host_memory_settings(conv_backend: str | None = None) -> None:
    """Runs this process's command again (`os.execve`: the same process id) with the block cache in
    $LD_PRELOAD where `block_cache_wanted(conv_backend)`, and glibc.malloc.hugetlb=1 in
    $GLIBC_TUNABLES where $URNET_JAX_HUGE_PAGES=1 asks for it, unless `why_no_block_cache` /
    `why_no_huge_pages` say why not; returns otherwise. A setting asked for by its variable gets a line on
    stderr, at the restart or saying why it cannot be had; the block cache by default goes quietly (`train.py`
    reports it at the end: `describe_block_cache`, `why_block_cache_missing`). Call it first in a script's
    `main`, before work that the restart would repeat."""
    env = dict(os.environ)
    added, announced = [], []
    reason = why_no_block_cache(conv_backend)
    if reason is None:
        try:
            library = build_block_cache()
        except native_build.BuildError as error:
            reason = str(error)
        else:
            env[_PRELOAD_ENV] = " ".join(filter(None, [str(library), os.environ.get(_PRELOAD_ENV, "")]))
            added.append(f"{_PRELOAD_ENV}={env[_PRELOAD_ENV]} (the block cache)")
    if _requested(BLOCK_CACHE_ENV):
        announced += added
        if reason is not None and block_cache_stats() is None:
            print(f"no block cache ({reason}; ${BLOCK_CACHE_ENV}=0 turns it off)", file=sys.stderr, flush=True)
    reason = why_no_huge_pages()
    if reason is None:
        tunables = os.environ.get(_TUNABLES_ENV, "")
        env[_TUNABLES_ENV] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
        added.append(f"{_TUNABLES_ENV}={env[_TUNABLES_ENV]} (${HUGE_PAGES_ENV})")
        announced.append(added[-1])
    elif _requested(HUGE_PAGES_ENV) and not _tunable_set():
        print(f"${HUGE_PAGES_ENV}: no huge pages ({reason})", file=sys.stderr, flush=True)
    if not added:
        return
    if announced:
        print(f"restarting with {' and '.join(announced)}: host memory for XLA's step buffers", file=sys.stderr,
              flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
