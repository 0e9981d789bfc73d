"""The C allocator's settings for training processes (issue 6).

A learning pass allocates and frees the same large buffers every update (a ``paper`` RNN update: dozens of
[4000, 256] float32 tensors, 4 MB each). glibc's ``malloc`` serves such sizes with ``mmap`` and returns them to the
kernel on ``free`` (and trims the heap's top), so the next update touches fresh pages again: 1,000-4,000 page faults
per update on the development machine, which also leave the buffers out of cache. :func:`keep_freed_memory` asks glibc
(``mallopt``) to serve allocations up to 1 GiB (32 MiB where an older glibc caps it) from the heap and to keep freed memory mapped: after the first updates
every buffer is reused memory, with no page faults (measured: ~3,400 → ~20 faults per ``paper`` update; the RNN
``paper`` update 0.202-0.211 → 0.196-0.198 s, paired runs). The process keeps its peak memory until it exits instead
of returning freed pages. Numerics are untouched. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # allocations up to this size come from the heap; a heap top this large is not trimmed
DOCUMENTED_MMAP_MAX = 32 << 20  # mallopt(3)'s upper limit for M_MMAP_THRESHOLD on 64-bit (older glibc enforces it)


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's trim threshold to :data:`KEEP_BYTES` and its mmap threshold to :data:`KEEP_BYTES`, or to
    :data:`DOCUMENTED_MMAP_MAX` where glibc refuses more, for this process (once). True when glibc took both, False
    where there is no glibc ``mallopt`` or it refused them (the allocator keeps its defaults, or whichever it took)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    global mmap_threshold
    trim = bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
    for size in (KEEP_BYTES, DOCUMENTED_MMAP_MAX):
        if mallopt(M_MMAP_THRESHOLD, size):
            mmap_threshold = size
            break
    return trim and mmap_threshold is not None


#: the mmap threshold :func:`keep_freed_memory` set (None: not set)
mmap_threshold: int | None = None
