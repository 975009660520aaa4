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
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest mmap threshold on 64-bit


def keep_freed_memory() -> str:
    """Have glibc's malloc keep freed memory for reuse; returns what was set, for the results.

    By default glibc serves large blocks with fresh mappings and trims its heap when much of it is
    free, so a process whose temporaries change in size (the expert rows of a routed block) touches
    new pages in every repetition: 8,160 page faults per forward + backward of the fine-grained
    block on the 2-core dev machine, against 0 for dense, and 0 in a training step, where the
    allocator has reached a steady state. Blocks up to 32 MiB then come from the heap and the heap
    is not trimmed, for every contestant alike, as a training process runs.
    """
    if platform.libc_ver()[0] != "glibc":
        return "the platform's default (not glibc)"
    import ctypes

    libc = ctypes.CDLL(None)
    trimmed = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1
    mapped = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_MMAP_THRESHOLD_MAX)) == 1
    if not (trimmed and mapped):
        return "glibc default (mallopt refused)"
    return "glibc, blocks up to 32 MiB from the heap, no trimming (mallopt)"
