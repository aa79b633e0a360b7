"""One BLAS thread while exporting.

numpy's OpenBLAS runs a thread per core and, after every call, keeps them spinning for a while in
case another call follows. The export's matrix products are small (a 16-row probe through each
projection, for the error statistics), so a second thread gains nothing there, while the spinning
takes the core that the other export worker, or the rest of the machine, needs: on a shared
2-core machine an expert's graph build took 4x longer with two BLAS threads than with one.

OpenBLAS reads ``OPENBLAS_NUM_THREADS`` only when it loads, which is before any export starts, so
the count is set through its own C function, found in the library numpy loaded (the way
threadpoolctl does it). Where there is no OpenBLAS (macOS's Accelerate, a numpy built otherwise)
nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from contextlib import contextmanager

# (set, get) pairs: numpy's own build (scipy-openblas, 64-bit ints), then plain OpenBLAS builds
_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))


@functools.cache
def _openblas() -> tuple | None:
    """The loaded OpenBLAS's (set, get) thread-count functions, or None."""
    import numpy  # noqa: F401  (loads the library this looks for)

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                return setter, getter
    return None


def set_blas_threads(n: int) -> int | None:
    """Use ``n`` BLAS threads from now on; return the previous count (None: no OpenBLAS)."""
    found = _openblas()
    if found is None:
        return None
    setter, getter = found
    before = int(getter())
    setter(n)
    return before


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """One BLAS thread inside the block; the previous count afterwards."""
    before = set_blas_threads(1)
    try:
        yield
    finally:
        if before is not None:
            set_blas_threads(before)
