"""Background loading of expert engines: read (from storage, checksum-verified) and create an
ORT session, on a small thread pool. ORT releases the GIL while it builds a session, so loads
overlap the main thread's compute. Each load reports how long reading and creating took."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from dymoe.bundle.errors import BundleError
from dymoe.bundle.manifest import check_bytes, file_entry
from dymoe.bundle.paths import resolve_file

from .bundle import Bundle
from .engine_cache import CACHED_PRECISIONS, EngineCache
from .ort_session import create_session
from .storage import Storage


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


class Loader:
    def __init__(self, bundle: Bundle, storage: Storage, workers: int = 1,
                 session_config: dict[str, str] | None = None, engine_cache: EngineCache | None = None) -> None:
        self.bundle = bundle
        self.storage = storage
        self.session_config = session_config
        self.engine_cache = engine_cache
        self.totals = LoadTotals()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dymoe-load")

    def load(self, layer: int, expert: int, precision: str) -> Loaded:
        """Read, verify and build one expert engine in the calling thread."""
        rel = self.bundle.expert_rel(layer, expert, precision)
        entry = file_entry(self.bundle.manifest, rel)
        path = resolve_file(self.bundle.path, rel)  # confined to the bundle, symbolic links followed
        cache = self.engine_cache if precision in CACHED_PRECISIONS and not self.session_config else None
        hit = cache.lookup(entry.sha256, path) if cache else None
        if hit is not None:
            cached, digest = hit
            result = self.storage.read(cached)
            if hashlib.sha256(result.data).hexdigest() == digest:
                t = time.perf_counter()
                session = create_session(result.data, 1, str(cached), optimize=False,
                                         **self.bundle.expert_graph(precision, rel))
                return self._done(layer, expert, precision, session, result, time.perf_counter() - t)
            cache.discard(cached)  # damaged: rebuild it from the bundle below
        try:
            result = self.storage.read(path)
        except FileNotFoundError:
            raise BundleError(f"bundle file missing: {path}", "re-export the bundle (or restore the file)") from None
        check_bytes(self.bundle.path, self.bundle.manifest, rel, result.data)
        t = time.perf_counter()
        temp = cache.temp_path(entry.sha256) if cache else None
        session = create_session(result.data, 1, str(path), self.session_config,
                                 save_optimized=str(temp) if temp else None, **self.bundle.expert_graph(precision, rel))
        create_s = time.perf_counter() - t
        if cache:
            cache.commit(entry.sha256, temp)
            cache.remember(entry.sha256, path)
        return self._done(layer, expert, precision, session, result, create_s)

    def _done(self, layer: int, expert: int, precision: str, session, result, create_s: float) -> Loaded:
        with self._lock:
            self.totals.loads += 1
            self.totals.bytes_read += len(result.data)
            self.totals.read_s += result.seconds
            self.totals.create_s += create_s
        return Loaded(layer, expert, precision, session, len(result.data), result.seconds, create_s)

    def submit(self, layer: int, expert: int, precision: str) -> Future:
        return self._pool.submit(self.load, layer, expert, precision)

    def close(self) -> None:
        """Cancel queued loads and wait for the one in progress (no thread outlives the run)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
