"""Run a command and watch it: peak RSS of its largest process and of its whole process tree
(workers included), polled every ``every`` seconds, with a hook called at each poll."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


def watch_rss(proc: subprocess.Popen, every: float = 0.05,
              on_poll: Callable[[float, float], None] | None = None) -> tuple[float, float]:
    """Poll until ``proc`` exits; return peak RSS (MiB) of its largest process and of its tree.
    ``on_poll(seconds since the call, tree RSS MiB)`` runs at each poll (the export benchmark reads
    the journal and keeps a peak per phase)."""
    import psutil

    root = psutil.Process(proc.pid)
    peak_one = peak_tree = 0.0
    t0 = time.perf_counter()
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            sizes = [p.memory_info().rss / 2**20 for p in procs]
        except psutil.Error:
            continue
        peak_one, peak_tree = max(peak_one, max(sizes)), max(peak_tree, sum(sizes))
        if on_poll:
            on_poll(time.perf_counter() - t0, sum(sizes))
        time.sleep(every)
    if proc.returncode:
        raise SystemExit(f"{proc.args[:4]} failed with status {proc.returncode}")
    return peak_one, peak_tree
