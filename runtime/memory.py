"""What this process holds in memory, as the operating system counts it."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _libc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _libc_trim()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the operating system.

    Engine sessions are built and freed all the time under a budget; their buffers (a few MB
    each, below glibc's adaptive mmap threshold) come from the heap, and the holes they leave are
    too fragmented to fit the next engine, so the heap grows and freed memory stays in RSS: an
    LRU run at a 490 MiB budget held 950 MiB, 440 MiB of it free heap. ``malloc_trim(0)``
    returns those pages (madvise), so RSS follows what is really in use.
    """
    if _TRIM is not None:
        _TRIM(0)


# Free heap tolerated before it is handed back: trimming costs page faults when the pages are
# reused (an fp16 engine load takes about twice as long right after a trim), so it waits for this
# much to pile up.
FREE_HEAP_BYTES = 16 * 2**20


def should_trim(rss: int, need: int, base: int, budget: int, free_heap: int = FREE_HEAP_BYTES) -> bool:
    """Trim before allocating ``need`` bytes when that would take RSS past the base footprint,
    the budget and the tolerated free heap."""
    return rss + need > base + budget + free_heap


def overhead_allowance(largest_file: int, concurrent_loads: int, free_heap: int = FREE_HEAP_BYTES) -> int:
    """How far above base + budget the footprint may go: the tolerated free heap plus each
    concurrent load's scratch (ORT's copy of the file, its parsed model and converted weights:
    measured at most three times the file while an engine is built)."""
    return free_heap + 3 * largest_file * concurrent_loads


class HeapGovernor:
    """Holds the process near ``base + budget``: before each engine load (and after one lands,
    when its scratch is free) it trims the heap if RSS would pass that line. Trimming only then
    keeps the cost off runs that fit."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.base = current_rss()
        self.trims = 0

    def start(self) -> None:
        """The model is open (backbone, runtime): what is resident now is the base."""
        self.base = current_rss()

    def before_load(self, nbytes: int) -> None:
        if should_trim(current_rss(), nbytes, self.base, self.budget):
            release_free_memory()
            self.trims += 1
