"""The server's heap on glibc: few malloc arenas, and freed memory handed back to the system.

A server runs for weeks: its RSS should stay where its first requests left it. glibc keeps what a
thread freed in that thread's arena for later, and the threads that read uploads each have one;
`few_malloc_arenas` caps them, `HeapTrimmer` returns the free pages at the top and inside each
arena (malloc_trim) once in a while, between batches. Elsewhere (macOS, musl) both do nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time

M_ARENA_MAX = -8      # glibc's mallopt parameter (malloc.h)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def few_malloc_arenas(arenas: int = 2) -> bool:
    """glibc gives each thread that allocates its own malloc arena (up to 8 a core), and an arena
    keeps what it freed: the threads that read uploads made the server's RSS grow by 13-19% from
    its 200th request to its 2000th (benchmarks/serve.py, reference size; 6% with 2 arenas). True
    where set."""
    libc = _libc()
    try:
        return libc is not None and libc.mallopt(M_ARENA_MAX, arenas) == 1
    except AttributeError:                 # not glibc: nothing to set
        return False


class HeapTrimmer:
    """`maybe_trim()` after a batch: malloc_trim(0) when `every_s` passed since the last one (it
    walks the arenas' free lists: a few milliseconds, against a batch's hundreds)."""

    def __init__(self, every_s: float = 2.0):
        libc = _libc()
        self._trim = getattr(libc, "malloc_trim", None)
        self.every_s, self._last, self.trims = every_s, time.monotonic(), 0

    def maybe_trim(self) -> bool:
        now = time.monotonic()
        if self._trim is None or now - self._last < self.every_s:
            return False
        self._trim(0)
        self._last, self.trims = time.monotonic(), self.trims + 1
        return True
