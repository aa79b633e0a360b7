"""Worker processes that never outlive the dymoe process that started them.

A ``ProcessPoolExecutor``'s workers block on their task queue; when the parent is killed with
SIGKILL nobody tells them, and they sit idle (holding memory and the bundle lock's file) for
minutes. Each worker here asks the kernel for SIGKILL when its parent dies (Linux
``PR_SET_PDEATHSIG``) and, where that is unavailable, a daemon thread notices the parent's
PID change within a second and exits.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 0.5


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCH_INTERVAL_S)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="dymoe-parent-watch", daemon=True).start()


def _start(parent: int, setup: Callable[[], object] | None) -> None:
    _die_with_parent(parent)
    if setup is not None:
        setup()


def worker_pool(workers: int, setup: Callable[[], object] | None = None) -> ProcessPoolExecutor:
    """A process pool whose workers exit when this process dies, however it dies; each worker runs
    ``setup()`` (a module-level function or a partial of one) before its first task."""
    return ProcessPoolExecutor(max_workers=workers, initializer=_start, initargs=(os.getpid(), setup))
