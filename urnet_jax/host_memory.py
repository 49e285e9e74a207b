"""Host memory: transparent huge pages for the large blocks XLA maps for every step (glibc, Linux), on request.

XLA's CPU runtime allocates each execution's temporary buffer (all of a train step's intermediate arrays:
about 0.97 GB for UR-Net(32) + ResNet18 at 128 px, batch 16) when the execution starts and frees it when it
ends. glibc's malloc maps so large a block afresh (`mmap`) and unmaps it on free, so every step faults the
whole buffer in again: 236,000 faults of 4 KiB pages and 0.3-0.65 s of kernel time per step on a 2-core CPU
(docs/BENCHMARKS.md). With glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35+) malloc asks the kernel for
transparent huge pages on the blocks it maps, which the kernel grants in its THP mode 'madvise': the buffer
then takes 2 MiB pages (a test program with two 64 MiB activations: 3,764 faults per call against 67,151).
Whether that pays depends on the host: a whole `train.py` run with `conv_backend='onednn'` gained with it on
a 2-core AMD EPYC virtual machine (6.2-6.8 against 5.9-6.0 images/s) and lost on a 2-core Intel Xeon one (5.2
and 6.6 against 7.1 and 7.5 images/s: at 2 threads the huge pages took more kernel time per step, not less).
So malloc keeps its own settings unless $URNET_JAX_HUGE_PAGES=1 asks for huge pages. Tunables are read when a
process starts, so `restart_with_huge_pages` runs the process's own command again with the tunable added to
$GLIBC_TUNABLES; `train.py` calls it first.
"""

from __future__ import annotations

import ctypes
import os
import sys

HUGE_PAGES_ENV = "URNET_JAX_HUGE_PAGES"
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_TUNABLES_ENV = "GLIBC_TUNABLES"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def _requested() -> bool:
    return os.environ.get(HUGE_PAGES_ENV, "") not in ("", "0")


def _tunable_set() -> bool:
    return HUGE_PAGES_TUNABLE in os.environ.get(_TUNABLES_ENV, "").split(":")


def why_no_restart() -> str | None:
    """Why `restart_with_huge_pages` would not restart this process (no request, no glibc 2.35+, a kernel
    that grants no huge pages on request or gives them unasked, the tunable already set); None when it would."""
    if not _requested():
        return f"${HUGE_PAGES_ENV} is not set"
    if _tunable_set():
        return f"${_TUNABLES_ENV} already has {HUGE_PAGES_TUNABLE}"
    version = _glibc_version() if sys.platform.startswith("linux") else None
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


def restart_with_huge_pages() -> None:
    """Where $URNET_JAX_HUGE_PAGES=1 asks for it, runs this process's command again (`os.execve`: the same
    process id) with $GLIBC_TUNABLES holding glibc.malloc.hugetlb=1, unless `why_no_restart` says why not;
    returns otherwise, with a line on stderr where they were asked for and cannot be had. Call it first in a
    script's `main`, before work that the restart would repeat."""
    reason = why_no_restart()
    if reason is not None:
        if _requested() and not _tunable_set():
            print(f"${HUGE_PAGES_ENV}: no huge pages ({reason})", file=sys.stderr, flush=True)
        return
    tunables = os.environ.get(_TUNABLES_ENV, "")
    env = {**os.environ, _TUNABLES_ENV: f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE}
    print(f"restarting with {_TUNABLES_ENV}={env[_TUNABLES_ENV]}: transparent huge pages for XLA's step buffers "
          f"(${HUGE_PAGES_ENV})", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
