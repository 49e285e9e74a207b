"""Host memory: transparent huge pages for the large blocks XLA maps for every step (glibc, Linux).

XLA's CPU runtime allocates each execution's temporary buffer (all of a train step's intermediate arrays:
about 0.97 GB for UR-Net(32) + ResNet18 at 128 px, batch 16) when the execution starts and frees it when it
ends. glibc's malloc maps so large a block afresh (`mmap`) and unmaps it on free, so every step faults the
whole buffer in again: 236,000 faults of 4 KiB pages and 0.4 s of kernel time per step on a 2-core CPU
(docs/BENCHMARKS.md). With glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35+) malloc asks the kernel for
transparent huge pages on the blocks it maps, which the kernel grants in its THP mode 'madvise': the buffer
then takes 2 MiB pages (a test program with two 64 MiB activations: 3,764 faults per call against 67,151). Tunables are read when a process starts, so
`restart_with_huge_pages_for` runs the process's own command again with the tunable added to
$GLIBC_TUNABLES. `train.py` does so with `conv_backend='onednn'`, where it was measured (a whole run: 6.2-6.8
against 5.9-6.0 images/s, peak resident memory 2.3-2.4 against 2.5-2.6 GiB); `URNET_JAX_SYSTEM_MALLOC=1` in
the environment keeps malloc's own settings.
"""

from __future__ import annotations

import ctypes
import os
import sys

SYSTEM_MALLOC_ENV = "URNET_JAX_SYSTEM_MALLOC"
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


def _tunable_set() -> bool:
    return HUGE_PAGES_TUNABLE in os.environ.get(_TUNABLES_ENV, "").split(":")


def why_no_restart() -> str | None:
    """Why `restart_with_huge_pages_for` would not restart this process (the opt-out, no glibc 2.35+, a
    kernel that grants no huge pages on request or gives them unasked, the tunable already set); None when
    it would."""
    if os.environ.get(SYSTEM_MALLOC_ENV, "") not in ("", "0"):
        return f"${SYSTEM_MALLOC_ENV} is set"
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


def restart_with_huge_pages_for(conv_backend: str) -> None:
    """With `conv_backend` 'onednn', runs this process's command again (`os.execve`: the same process id)
    with $GLIBC_TUNABLES holding glibc.malloc.hugetlb=1, unless `why_no_restart` says why not; returns
    otherwise. Call it first in a script's `main`, before work that the restart would repeat."""
    if conv_backend != "onednn" or why_no_restart() is not None:
        return
    tunables = os.environ.get(_TUNABLES_ENV, "")
    env = {**os.environ, _TUNABLES_ENV: f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE}
    print(f"restarting with {_TUNABLES_ENV}={env[_TUNABLES_ENV]}: transparent huge pages for XLA's step buffers "
          f"(${SYSTEM_MALLOC_ENV}=1 to skip)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
