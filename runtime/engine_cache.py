"""A device-side cache of ORT-optimised expert graphs, like TensorRT engines built on the device.

Building an ORT session from a bundle graph spends most of its time optimising it (fusing QDQ
into MatMulNBits, folding casts). Optimised graphs depend on the ORT version and the machine,
so they are not shipped in the bundle: the first load of a variant saves ORT's optimised graph
here, and later loads (the next run, or a reload after eviction) build from it with
optimisation off. Entries are named by the source file's sha256 and the ORT version, and
carry their own sha256 in the name, so a damaged entry is detected and rebuilt.

Float variants are not cached: their optimised form is the fp32 upcast (twice the bytes) and
creating them is no faster.

A cached engine is used for a bundle file only while that file is unchanged: the cache
remembers the (size, mtime) of every source path it verified against the sha256, so a file
edited or damaged since fails its checksum on the next load, as it would without a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnxruntime as ort

CACHED_PRECISIONS = ("int8", "int4", "int2")


def default_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "dymoe" / "engines" / f"ort-{ort.__version__}"


class EngineCache:
    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder else default_dir()
        self.folder.mkdir(parents=True, exist_ok=True)

    def lookup(self, source_sha: str, source: Path) -> tuple[Path, str] | None:
        """``(path, expected sha256)`` of the optimised graph for ``source_sha``, if cached and
        ``source`` is a file already verified against that sha256 and unchanged since."""
        if self._stamp(source) not in self._verified(source_sha).get(str(Path(source).resolve()), []):
            return None
        for path in self.folder.glob(f"{source_sha}.*.onnx"):
            return path, path.name.split(".")[1]
        return None

    def remember(self, source_sha: str, source: Path) -> None:
        """Record that ``source`` (as it is now) was read and matched ``source_sha``."""
        seen = self._verified(source_sha)
        seen[str(Path(source).resolve())] = [self._stamp(source)]
        tmp = self.folder / f".{source_sha}.{os.getpid()}.json.tmp"
        tmp.write_text(json.dumps(seen))
        os.replace(tmp, self.folder / f"{source_sha}.sources.json")

    def _verified(self, source_sha: str) -> dict[str, list]:
        try:
            data = json.loads((self.folder / f"{source_sha}.sources.json").read_text())
            return {k: [list(s) for s in v] for k, v in data.items()}
        except (FileNotFoundError, ValueError, AttributeError):
            return {}

    @staticmethod
    def _stamp(source: Path) -> list[int]:
        st = os.stat(source)
        return [st.st_size, st.st_mtime_ns]

    def temp_path(self, source_sha: str) -> Path:
        return self.folder / f".{source_sha}.{os.getpid()}.{id(self)}.tmp.onnx"

    def commit(self, source_sha: str, temp: Path) -> None:
        """Give a freshly written optimised graph its final, self-verifying name."""
        try:
            digest = hashlib.sha256(temp.read_bytes()).hexdigest()
            os.replace(temp, self.folder / f"{source_sha}.{digest}.onnx")
        except FileNotFoundError:
            pass  # ORT did not write it (nothing to cache)

    def discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)
