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


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The kernel's peak RSS of this process since start or the last :func:`reset_peak`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# What a run's peak RSS may pass base + budget by (README "Memory"): until the governor has seen
# the first peaks it trusts the measured engine costs, and RSS is sampled by the kernel in pages.
# Measured on the widened demo (every policy, budgets 10 % and 25 %, benchmarks/footprint.py): at most 4.7 MiB over.
FOOTPRINT_SLACK_BYTES = 16 * 2**20


def should_trim(rss: int, need: int, limit: int) -> bool:
    """Trim the heap before allocating ``need`` bytes when that would take RSS past ``limit``."""
    return rss + need > limit


def learned_reserve(reserve: int, peak: int, limit: int, cap: int) -> int:
    """Bytes to hold back from the engine budget after the true peak RSS since the last look was
    ``peak``. Whatever passed ``limit`` is memory the books do not see (a build's scratch above its
    estimate, free heap not yet trimmed, activations, a growing KV cache): the reserve grows by all
    of it at once. Room left under the limit gives a quarter of itself back, so a reserve learned
    from a rare spike fades, slowly enough not to invite the next one. Between 0 and ``cap``."""
    over = peak - limit
    return max(0, min(cap, reserve + (over if over > 0 else over // 4)))


class HeapGovernor:
    """Holds the process to ``base + budget``, where base is RSS once the model is open.

    Before each engine load it trims the heap (``malloc_trim``) if RSS plus the load would pass
    that line: engines are built and freed all the time, and their freed buffers stay in RSS as
    fragmented heap otherwise. After each load lands it reads the kernel's true peak RSS since the
    last look; if the peak passed the line, the excess becomes a reserve that the resident set
    keeps free from then on. So the measured engine costs need not be exact, and memory outside
    the books (activations, the KV cache as the context grows) is paid from the budget too.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.base = current_rss()
        self.trims = 0
        self.reserve = 0
        self.peak = 0  # the highest RSS seen above base

    def start(self) -> None:
        """The model is open (backbone, runtime): what is resident now is the base."""
        self.base = current_rss()
        reset_peak()

    @property
    def limit(self) -> int:
        return self.base + self.budget

    def before_load(self, nbytes: int) -> None:
        if should_trim(current_rss(), nbytes, self.limit):
            release_free_memory()
            self.trims += 1

    def observe(self) -> int:
        """After a load: learn from the true peak since the last look; returns the reserve."""
        peak = peak_rss()
        self.peak = max(self.peak, peak - self.base)
        if reset_peak():
            # excess within half the documented slack is noise of the whole process (Python's heap,
            # activations): learning from it would cost a small budget half its room
            self.reserve = learned_reserve(self.reserve, peak, self.limit + FOOTPRINT_SLACK_BYTES // 2,
                                           self.budget // 2)
        return self.reserve
