"""glibc malloc, told to keep memory it will be asked for again.

Left to itself, glibc serves a large allocation with a fresh mapping and hands freed memory at the
top of the heap back to the kernel, so arrays of a few MB made and dropped on every call (a
ComPEFT adapter's decoded signs and packed codes, a batch's logits) are faulted in page by page
each time: half of the preparation of a ComPEFT adapter's GPU form (bench/RESULTS.md). With
allocations up to 32 MiB (the ceiling of glibc's own sliding threshold) served from the heap and
up to 64 MiB of free heap kept, they are reused instead: that preparation takes 2.4-3.5 ms instead
of 5.6-8.7, batch-32 decode is unchanged, and resident memory over 1,000 adapters does not grow
(`loramux bench memory`).

Nothing is changed where the user already chose (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or
GLIBC_TUNABLES in the environment, another allocator preloaded, or LORAMUX_MALLOC=default to keep
glibc's own behaviour) or where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # where glibc's sliding threshold stops on 64-bit systems
TRIM_THRESHOLD = 64 << 20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


@functools.cache
def keep_freed_memory() -> bool:
    """Set the two thresholds once per process; whether they were set (False: left as they were)."""
    chosen = [name for name in USER_SETTINGS if os.environ.get(name)]
    if os.environ.get("LORAMUX_MALLOC") == "default":
        chosen.append("LORAMUX_MALLOC=default")
    if chosen:
        log.debug("malloc left as configured (%s)", ", ".join(chosen))
        return False
    if not sys.platform.startswith("linux"):
        return False  # glibc's knobs; macOS and Windows have other allocators
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (musl's mallopt is a stub that refuses: 0 below)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug(
        "malloc: mmap threshold %d MiB, trim threshold %d MiB: %s", 32, 64, "set" if done else "refused"
    )
    return done
