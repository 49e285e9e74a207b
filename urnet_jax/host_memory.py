"""Host memory: keep the large blocks that XLA frees for its next step (glibc's malloc, Linux).

XLA's CPU runtime allocates the temporary buffer of each execution (all of a train step's intermediate
arrays: about 0.97 GB for UR-Net(32) + ResNet18 at 128 px, batch 16) when the execution starts and frees it
when it ends, from one of its worker threads. glibc's malloc serves so large a request from a thread other
than the main one with a fresh `mmap` and unmaps it on free, so every step faults every page of the buffer
in again: about 236,000 page faults and 0.4 s of kernel time per step on a 2-core CPU (docs/BENCHMARKS.md).
`keep_freed_blocks` sets malloc to one arena, no `mmap` and no trimming: freed blocks stay in the process's
heap and the next step reuses them. The price: the resident memory stays at its peak between steps (two
temporary buffers, measured: the largest batch within 8 GB fell from 100 to 55), and every thread allocates
from one arena. With the 'onednn' conv backend the train step took 8% less time; with XLA's own
convolutions as long (JAX alone in the process) or 9-21% longer (beside torch in the benchmark's process,
with more user CPU time; the cause is not pinned down). So `train.py` calls it with `conv_backend='onednn'`
only (`keep_freed_blocks_for`), before XLA starts its threads, and so do the benchmarks. `URNET_JAX_SYSTEM_MALLOC=1` in the environment
keeps malloc's own settings.
"""

from __future__ import annotations

import ctypes
import os
import sys

SYSTEM_MALLOC_ENV = "URNET_JAX_SYSTEM_MALLOC"

# glibc's mallopt options (malloc.h) and their values here.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))

_kept = False


def keep_freed_blocks() -> bool:
    """Makes glibc's malloc keep freed blocks for reuse (one arena, no mmap, no trimming); True when done.

    Call it before JAX (or anything else that starts threads) is imported: a thread that has allocated
    keeps its own arena, whose large blocks are mapped and unmapped as before. Does nothing (False) off
    Linux, with another C library, or when $URNET_JAX_SYSTEM_MALLOC is set to anything but '' or '0'."""
    global _kept
    if os.environ.get(SYSTEM_MALLOC_ENV, "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt ignores these options
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _kept = all(mallopt(option, value) == 1 for option, value in _SETTINGS)
    return _kept


def keep_freed_blocks_for(conv_backend: str) -> bool:
    """`keep_freed_blocks` where it pays, with the 'onednn' conv backend (see the module); True when done."""
    return conv_backend == "onednn" and keep_freed_blocks()


def freed_blocks_kept() -> bool:
    """Whether `keep_freed_blocks` took effect in this process (for logs and benchmark results)."""
    return _kept
