"""Background loading of expert engines: read (from storage, checksum-verified) and create an
ORT session, on a few worker threads. ORT releases the GIL while it builds a session and the
OS read releases it too, so loads overlap the main thread's compute and each other (one
worker reads while another builds).

Jobs wait in a priority queue: a load the model is waiting for (demand, priority 0) goes ahead
of look-ahead prefetches (higher numbers), and a queued job can be cancelled when its
prediction goes stale. Each load reports how long reading and creating took.

Checksums: a bundle file (or cached engine) is hashed the first time this loader reads it, and
again whenever its (device, inode, size, mtime) changes; re-reading the same unchanged file
after an eviction does not hash it again (sha256 cost about a fifth of an int4 load).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from dymoe.bundle.errors import BundleError
from dymoe.bundle.manifest import check_bytes, file_entry
from dymoe.bundle.paths import resolve_file

from .bundle import Bundle
from .engine_cache import CACHED_PRECISIONS, EngineCache
from .ort_session import create_session
from .storage import Storage

DEMAND, PREFETCH = 0, 1  # priorities: lower runs first


@dataclass
class Loaded:
    layer: int
    expert: int
    precision: str
    session: object
    file_bytes: int
    read_s: float
    create_s: float


@dataclass
class LoadTotals:
    loads: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    create_s: float = 0.0
    busy_s: float = 0.0  # wall time with at least one load in progress
    hashed_bytes: int = 0


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    layer: int = field(compare=False)
    expert: int = field(compare=False)
    precision: str = field(compare=False)
    future: Future = field(compare=False)


class Loader:
    def __init__(self, bundle: Bundle, storage: Storage, workers: int = 1,
                 session_config: dict[str, str] | None = None, engine_cache: EngineCache | None = None) -> None:
        self.bundle = bundle
        self.workers = workers
        self.storage = storage
        self.session_config = session_config
        self.engine_cache = engine_cache
        self.totals = LoadTotals()
        self._lock = threading.Lock()
        self._verified: dict[str, tuple] = {}  # path -> stamp of the version whose sha256 matched
        self._queue: list[_Job] = []
        self._seq = itertools.count()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._active = 0
        self._busy_since = 0.0
        self._threads = [threading.Thread(target=self._work, name=f"dymoe-load-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # --- one load, in the calling thread ----------------------------------------------------

    def load(self, layer: int, expert: int, precision: str) -> Loaded:
        """Read, verify and build one expert engine in the calling thread."""
        self._begin()
        try:
            return self._load(layer, expert, precision)
        finally:
            self._end()

    def _load(self, layer: int, expert: int, precision: str) -> Loaded:
        rel = self.bundle.expert_rel(layer, expert, precision)
        entry = file_entry(self.bundle.manifest, rel)
        path = resolve_file(self.bundle.path, rel)  # confined to the bundle, symbolic links followed
        cache = self.engine_cache if precision in CACHED_PRECISIONS and not self.session_config else None
        hit = cache.lookup(entry.sha256, path) if cache else None
        if hit is not None:
            cached, digest = hit
            result = self.storage.read(cached)
            if self._matches(str(cached), result, digest):
                t = time.perf_counter()
                session = create_session(result.data, 1, str(cached), optimize=False,
                                         **self.bundle.expert_graph(precision, rel))
                return self._done(layer, expert, precision, session, result, time.perf_counter() - t)
            cache.discard(cached)  # damaged: rebuild it from the bundle below
        try:
            result = self.storage.read(path)
        except FileNotFoundError:
            raise BundleError(f"bundle file missing: {path}", "re-export the bundle (or restore the file)") from None
        if not self._seen(str(path), result):
            check_bytes(self.bundle.path, self.bundle.manifest, rel, result.data)
            self._remember(str(path), result)
        t = time.perf_counter()
        temp = cache.temp_path(entry.sha256) if cache else None
        session = create_session(result.data, 1, str(path), self.session_config,
                                 save_optimized=str(temp) if temp else None, **self.bundle.expert_graph(precision, rel))
        create_s = time.perf_counter() - t
        if cache:
            cache.commit(entry.sha256, temp)
            cache.remember(entry.sha256, path)
        return self._done(layer, expert, precision, session, result, create_s)

    def _seen(self, key: str, result) -> bool:
        with self._lock:
            return self._verified.get(key) == result.stamp

    def _remember(self, key: str, result) -> None:
        with self._lock:
            self._verified[key] = result.stamp
            self.totals.hashed_bytes += len(result.data)

    def _matches(self, key: str, result, digest: str) -> bool:
        if self._seen(key, result):
            return True
        if hashlib.sha256(result.data).hexdigest() != digest:
            return False
        self._remember(key, result)
        return True

    def _done(self, layer: int, expert: int, precision: str, session, result, create_s: float) -> Loaded:
        with self._lock:
            self.totals.loads += 1
            self.totals.bytes_read += len(result.data)
            self.totals.read_s += result.seconds
            self.totals.create_s += create_s
        return Loaded(layer, expert, precision, session, len(result.data), result.seconds, create_s)

    def _begin(self) -> None:
        with self._lock:
            if self._active == 0:
                self._busy_since = time.perf_counter()
            self._active += 1

    def _end(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self.totals.busy_s += time.perf_counter() - self._busy_since

    # --- the queue ---------------------------------------------------------------------------

    def submit(self, layer: int, expert: int, precision: str, priority: int = DEMAND) -> Future:
        future: Future = Future()
        with self._wake:
            if self._closing:
                future.cancel()
                future.set_running_or_notify_cancel()
                return future
            heapq.heappush(self._queue, _Job(priority, next(self._seq), layer, expert, precision, future))
            self._wake.notify()
        return future

    def cancel(self, future: Future) -> bool:
        """Drop a load that has not started; False when it is running or done."""
        return future.cancel()

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if self._closing and not self._queue:
                    return
                job = heapq.heappop(self._queue)
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                job.future.set_result(self.load(job.layer, job.expert, job.precision))
            except BaseException as e:  # delivered to whoever waits on the future
                job.future.set_exception(e)

    def close(self) -> None:
        """Cancel queued loads and wait for those in progress (no thread outlives the run)."""
        with self._wake:
            self._closing = True
            for job in self._queue:
                job.future.cancel()
            self._wake.notify_all()
        for t in self._threads:
            t.join()
