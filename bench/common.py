"""Measurement helpers shared by the benchmarks: thread pinning, timing, memory, environment, MFU.

Import this module (and call `pin_threads`) before importing JAX or torch: the thread count and the
GPU allocator settings must be in place before either initialises.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched against
# `jax.Device.device_kind` / `torch.cuda.get_device_name()` by substring (first match wins).
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


def pin_threads(threads: int | None) -> int:
    """Restricts this process to the first `threads` CPUs (None: all available) and returns the count.

    CPU affinity bounds XLA's and torch's thread pools alike; the caller also passes the count to
    `torch.set_num_threads`. Raises ValueError when more threads are asked for than CPUs exist.
    """
    available = sorted(os.sched_getaffinity(0))
    if threads is None:
        return len(available)
    if not 1 <= threads <= len(available):
        raise ValueError(f"--threads must be between 1 and {len(available)} on this machine, got {threads}")
    os.sched_setaffinity(0, set(available[:threads]))
    return threads


def prepare_gpu_allocators() -> None:
    """Lets JAX and torch share one GPU: JAX allocates on demand instead of grabbing 75% up front."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


# x86 / Arm vector and matrix extensions worth knowing when comparing CPU results (from /proc/cpuinfo flags).
VECTOR_EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                     "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "neon", "asimd", "sve", "sve2")


def cpu_description(cpuinfo_path: str = "/proc/cpuinfo") -> dict[str, Any]:
    """{'model': the CPU's model name, 'vector_extensions': those of VECTOR_EXTENSIONS its flags list}.

    Both from the first processor entry of `cpuinfo_path` ('flags' on x86, 'Features' on Arm); the model
    falls back to `platform.processor()` where the file does not exist.
    """
    model, flags = None, set()
    if os.path.exists(cpuinfo_path):
        with open(cpuinfo_path) as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model name") and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    model = model or platform.processor() or "unknown CPU"
    return {"model": model, "vector_extensions": [name for name in VECTOR_EXTENSIONS if name in flags]}


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping); None where it is unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (processes runnable or running, all CPUs together)."""
    return [round(v, 2) for v in os.getloadavg()]


class Block(NamedTuple):
    """One timed block, per step: wall seconds, process CPU seconds, of which in the kernel, and the CPU seconds
    of each thread that ran (descending; threads under 1% of the block's CPU time, and threads that ended
    before the block did, left out)."""
    wall: float
    cpu: float
    kernel: float
    thread_cpu: tuple[float, ...] = ()


def time_block(run_step: Callable[[], Any], steps: int, synchronize: Callable[[Any], Any]) -> Block:
    """`Block` of `steps` back-to-back calls, waiting for the last result with `synchronize`. CPU seconds count
    every thread of the process (spin-waits included); the kernel's share is mostly page faults: zeroing the
    pages of freshly mapped buffers."""
    threads = thread_cpu_seconds()
    wall, cpu, kernel = time.perf_counter(), time.process_time(), _kernel_cpu_seconds()
    result = None
    for _ in range(steps):
        result = run_step()
    synchronize(result)
    cpu, kernel = time.process_time() - cpu, _kernel_cpu_seconds() - kernel
    wall = time.perf_counter() - wall
    per_thread = sorted((seconds - threads.get(tid, 0.0) for tid, seconds in thread_cpu_seconds().items()),
                        reverse=True)
    return Block(wall / steps, cpu / steps, min(kernel, cpu) / steps,
                 tuple(seconds / steps for seconds in per_thread if seconds > 0.01 * cpu))


def thread_cpu_seconds(task_dir: str = "/proc/self/task") -> dict[int, float]:
    """CPU seconds (user + kernel) used so far by each thread of this process, by thread id, at the kernel's
    clock-tick resolution (10 ms on most systems); {} where there is no such directory (not Linux)."""
    try:
        thread_ids = os.listdir(task_dir)
    except OSError:
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for thread_id in thread_ids:
        try:
            with open(os.path.join(task_dir, thread_id, "stat")) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # after the name, which may hold spaces
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        seconds[int(thread_id)] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return seconds


def _kernel_cpu_seconds() -> float:
    """CPU seconds this process has spent in the kernel (all threads; microsecond resolution)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def summarize(blocks: list[Block], batch: int) -> dict[str, Any]:
    """Median / min wall step time (ms) over timed blocks (`time_block`'s), the images/s of the median, the
    median process CPU time per step (ms; less sensitive than wall time to other processes on the machine) and
    the medians of its kernel part and of the rest, the user part (ms; per block, so the two need not add up to
    the CPU median), and the median block's CPU time per thread (ms per step, descending: how many threads
    share the work, e.g. a thread pool beside OpenMP teams)."""
    wall = [block.wall for block in blocks]
    median = statistics.median(wall)
    median_block = min(blocks, key=lambda block: abs(block.wall - median))
    return {
        "step_ms_median": round(median * 1e3, 2),
        "step_ms_min": round(min(wall) * 1e3, 2),
        "step_ms_blocks": [round(w * 1e3, 2) for w in wall],
        "cpu_ms_median": round(statistics.median(block.cpu for block in blocks) * 1e3, 2),
        "kernel_cpu_ms_median": round(statistics.median(block.kernel for block in blocks) * 1e3, 2),
        "user_cpu_ms_median": round(statistics.median(block.cpu - block.kernel for block in blocks) * 1e3, 2),
        "thread_cpu_ms": [round(seconds * 1e3, 1) for seconds in median_block.thread_cpu],
        "img_s": round(batch / median, 3),
    }


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Peak resident memory above the level at entry while the `with` body runs (sampled every 2 ms).

    A process-wide measure: both frameworks live in this process, so each block's own allocations show
    as the growth over the level at entry. `peak_growth_bytes` is set on exit.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak_growth_bytes = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_growth_bytes = max(self.peak_growth_bytes, _current_rss_bytes() - self._baseline)
            time.sleep(self.interval_s)

    def __enter__(self) -> RssPeak:
        self._baseline = _current_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def process_peak_rss_bytes() -> int:
    """Peak resident memory of this process since it started (getrusage; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_tflops_for(device_name: str, override: float | None) -> float | None:
    """The bf16 peak to divide achieved FLOP/s by: `override` if given, else the table's, else None."""
    if override:
        return override
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def use_host_memory_settings(huge_pages: bool, block_cache: bool, restart: bool) -> None:
    """`urnet_jax.host_memory.restart_with_host_memory_settings()` as `train.py` calls it, when `restart` (a
    benchmark run from its command line: the restart runs the command again); sets $URNET_JAX_BLOCK_CACHE to
    1 or 0 and $URNET_JAX_HUGE_PAGES to 1 or nothing, for this process and those it starts (`train.py`
    included), as `block_cache` and `huge_pages` say. Call first in `main`."""
    from urnet_jax import host_memory

    os.environ[host_memory.BLOCK_CACHE_ENV] = "1" if block_cache else "0"
    if huge_pages:
        os.environ[host_memory.HUGE_PAGES_ENV] = "1"
    else:
        os.environ.pop(host_memory.HUGE_PAGES_ENV, None)
    if restart:
        host_memory.restart_with_host_memory_settings()


def add_host_memory_flags(parser: argparse.ArgumentParser, huge_pages_help: str) -> None:
    """--huge-pages (help: `huge_pages_help`) and --[no-]block-cache, read back by `resolve_block_cache`."""
    parser.add_argument("--huge-pages", action="store_true", help=huge_pages_help)
    parser.add_argument("--block-cache", action=argparse.BooleanOptionalAction, default=None,
                        help="run with (or without) the block cache for large blocks ($URNET_JAX_BLOCK_CACHE, "
                             "urnet_jax.host_memory), and so do the processes the benchmark starts; beside torch "
                             "it serves both frameworks' blocks (default: as train.py, on wherever JAX computes on "
                             "the CPU)")


def resolve_block_cache(block_cache: bool | None, conv_backend: str) -> bool:
    """A benchmark's --block-cache / --no-block-cache, or without either `train.py`'s default for
    `conv_backend`."""
    from urnet_jax import host_memory

    return host_memory.block_cache_wanted(conv_backend) if block_cache is None else block_cache


def environment() -> dict[str, Any]:
    """Machine and software facts recorded with every result (None for a package that is not installed)."""
    import importlib

    import jax

    from urnet_jax import compiler_options, host_memory

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "cpu": cpu_description(),
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_compiler_options": compiler_options.for_platform(jax.default_backend()),
        "xla_cpu_options": compiler_options.selected_cpu_options(),
        "malloc_huge_pages": host_memory.huge_pages_in_use(),
        "block_cache": host_memory.block_cache_stats() is not None,
    }
    for name in ("flax", "optax", "torch", "torchvision"):
        try:
            info[name] = importlib.import_module(name).__version__
        except ImportError:
            info[name] = None
    return info


def print_result(result: dict[str, Any]) -> None:
    """Prints the machine-readable last line: `RESULT {json}`."""
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
