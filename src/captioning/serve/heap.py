"""The server's heap on glibc: few malloc arenas, and large buffers handed back when freed.

A server runs for weeks: its RSS should stay where its first requests left it. Two glibc habits
made it grow with the requests (benchmarks/serve.py, reference size, RSS after the 2000th request
over after the 200th):

- each thread that allocates gets its own arena (up to 8 a core), which keeps what it freed: the
  threads that read uploads made RSS grow 13-19%; capped at 2 arenas, 4-9%;
- a freed mmap'd block raises the mmap threshold to its size (up to 32 MiB), so later decoded
  images and batch buffers of that size come from the heap and leave holes there; a fixed threshold
  keeps every block over 256 KiB in mmap, returned to the system on free. Both set: 1.036 in two
  runs (1.004 in one with the threshold set from the process's start, MALLOC_MMAP_THRESHOLD_).

Elsewhere (macOS, musl) nothing is set.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3   # glibc's mallopt parameters (malloc.h)
M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 * 1024


def tune_malloc(arenas: int = 2, mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """At most `arenas` malloc arenas, and blocks over `mmap_threshold` bytes always mmap'd (which
    also stops glibc from moving the threshold). True where set."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc is not None and libc.mallopt(M_ARENA_MAX, arenas) == 1 \
            and libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    except (OSError, AttributeError):      # not glibc: nothing to set
        return False
