"""A device-side cache of ORT-optimised expert graphs, like TensorRT engines built on the device.

Building an ORT session from a bundle graph spends much of its time optimising it (fusing QDQ
into MatMulNBits, folding casts). Optimised graphs depend on the ORT version and the machine,
so they are not shipped in the bundle: the first load of a variant saves ORT's optimised graph
here, and later loads (the next run, or a reload after eviction) build from it with
optimisation off. Entries are named by the source file's sha256 and the ORT version, and
carry their own sha256 in the name, so a damaged entry is detected and rebuilt.

Float variants are not cached: their optimised form is the fp32 upcast (twice the bytes to
read) and creating them is no faster.

A cached engine is used for a bundle file only while that file is unchanged: the cache
remembers the (size, mtime) of every source path it verified against the sha256, so a file
edited or damaged since fails its checksum on the next load, as it would without a cache.

The folder is listed once per run and the records are kept in memory: a load asks a dict, not
the file system (a glob per load cost more than half a millisecond).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import onnxruntime as ort

CACHED_PRECISIONS = ("int8", "int4", "int2")


def default_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "dymoe" / "engines" / f"ort-{ort.__version__}"


def stamp(st: os.stat_result) -> list[int]:
    """What identifies a file's version without reading it."""
    return [st.st_size, st.st_mtime_ns]


class EngineCache:
    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder else default_dir()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # loader threads share one cache
        self._entries: dict[str, Path] = {}  # source sha256 -> optimised graph
        for path in self.folder.glob("*.onnx"):
            parts = path.name.split(".")
            if len(parts) == 3 and not path.name.startswith("."):
                self._entries[parts[0]] = path
        self._sources: dict[str, dict[str, list]] = {}

    def lookup(self, source_sha: str, source: Path) -> tuple[Path, str] | None:
        """``(path, expected sha256)`` of the optimised graph for ``source_sha``, if cached and
        ``source`` is a file already verified against that sha256 and unchanged since."""
        with self._lock:
            path = self._entries.get(source_sha)
            if path is None:
                return None
            if stamp(os.stat(source)) not in self._verified(source_sha).get(str(Path(source).resolve()), []):
                return None
            return path, path.name.split(".")[1]

    def remember(self, source_sha: str, source: Path) -> None:
        """Record that ``source`` (as it is now) was read and matched ``source_sha``."""
        with self._lock:
            seen = self._verified(source_sha)
            seen[str(Path(source).resolve())] = [stamp(os.stat(source))]
            tmp = self.folder / f".{source_sha}.{os.getpid()}.{threading.get_ident()}.json.tmp"
            tmp.write_text(json.dumps(seen))
            os.replace(tmp, self.folder / f"{source_sha}.sources.json")

    def _verified(self, source_sha: str) -> dict[str, list]:
        if source_sha not in self._sources:
            try:
                data = json.loads((self.folder / f"{source_sha}.sources.json").read_text())
                self._sources[source_sha] = {k: [list(s) for s in v] for k, v in data.items()}
            except (FileNotFoundError, ValueError, AttributeError):
                self._sources[source_sha] = {}
        return self._sources[source_sha]

    def temp_path(self, source_sha: str) -> Path:
        return self.folder / f".{source_sha}.{os.getpid()}.{threading.get_ident()}.tmp.onnx"

    def commit(self, source_sha: str, temp: Path) -> None:
        """Give a freshly written optimised graph its final, self-verifying name."""
        try:
            digest = hashlib.sha256(temp.read_bytes()).hexdigest()
            final = self.folder / f"{source_sha}.{digest}.onnx"
            os.replace(temp, final)
        except FileNotFoundError:
            return  # ORT did not write it (nothing to cache)
        with self._lock:
            self._entries[source_sha] = final

    def discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        with self._lock:
            for sha, p in list(self._entries.items()):
                if p == path:
                    del self._entries[sha]
