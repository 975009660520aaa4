"""What machine a benchmark ran on (shared by the benchmark scripts)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> str:
    """Have glibc's malloc keep freed memory for reuse; returns what was set, for the results.

    By default glibc serves large blocks with fresh mappings and trims its heap when much of it is
    free, so a process whose temporaries change in size (the expert rows of a routed block) touches
    new pages in every repetition: 7,700–12,300 page faults per forward + backward of the
    fine-grained block on the 2-core dev machine, against 0 for dense and 0 in a training step of
    the small preset, where the allocator has settled. Blocks of 32 MiB and more are mapped afresh
    whatever the history (glibc's largest mmap threshold): the coarse Poincaré group's (8192, 1024)
    temporaries took 726 ms per repetition so and 517 ms from the heap (one run each). Here every
    block comes from the heap and the heap is never trimmed — the steady state of a caching
    allocator, for every contestant alike.
    """
    if platform.libc_ver()[0] != "glibc":
        return "the platform's default (not glibc)"
    import ctypes

    libc = ctypes.CDLL(None)
    trimmed = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1
    mapped = libc.mallopt(_M_MMAP_MAX, ctypes.c_int(0)) == 1
    if not (trimmed and mapped):
        return "glibc default (mallopt refused)"
    return "glibc, every block from the heap, never trimmed (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"
