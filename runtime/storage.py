"""Reading expert files the way a device would: from storage rather than the page cache
(``io="direct"``), optionally throttled to a target device's bandwidth and latency.

``direct`` drops the file's cached pages (posix_fadvise DONTNEED) before each read, so every
load pays for storage; O_DIRECT would need aligned buffers that Python cannot hand to ORT
without a copy. Emulation sleeps for whatever the real read left of the profile's time, on one
device for all threads: requests overlap their latency (a queue), but transfers share the
bandwidth, so two loader threads do not get twice the profile's speed. Emulation only slows reads
down: where this machine's storage is slower than the profile, reads run at its own speed, and
the run says so (``slower_than_profile``).
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dymoe.bundle.compat import tomllib
from dymoe.bundle.errors import InputError

IO_MODES = ("cached", "direct")


@dataclass(frozen=True)
class StorageProfile:
    name: str
    description: str
    read_mb_per_s: float
    latency_ms: float

    def seconds(self, nbytes: int) -> float:
        return self.latency_ms / 1e3 + nbytes / (self.read_mb_per_s * 1e6)


def _profiles_dir():
    return resources.files("dymoe.targets") / "storage"


def available_profiles() -> list[str]:
    return sorted(p.name[:-5] for p in _profiles_dir().iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str) -> StorageProfile:
    path = Path(name_or_path)
    source = path if path.suffix == ".toml" and path.is_file() else _profiles_dir() / f"{name_or_path}.toml"
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
        profile = StorageProfile(str(data["name"]), str(data.get("description", "")), float(data["read_mb_per_s"]),
                                 float(data["latency_ms"]))
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(f"unknown storage profile {name_or_path!r}",
                         f"choose one of {', '.join(available_profiles())}, or pass a .toml file") from None
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"storage profile {name_or_path} is malformed ({e.__class__.__name__}: {e})",
                         "it needs name, read_mb_per_s and latency_ms") from None
    if not 0 < profile.read_mb_per_s < math.inf:
        raise InputError(f"storage profile {name_or_path}: read_mb_per_s is {profile.read_mb_per_s:g}",
                         "give the device's sequential read speed, a positive number of MB/s")
    if not 0 <= profile.latency_ms < math.inf:
        raise InputError(f"storage profile {name_or_path}: latency_ms is {profile.latency_ms:g}",
                         "give the device's read latency, zero or a positive number of milliseconds")
    return profile


@dataclass
class ReadResult:
    data: bytes
    seconds: float  # wall time of the read, emulation included
    stamp: tuple[int, int, int, int]  # (device, inode, size, mtime_ns) of the file read


class Storage:
    def __init__(self, io: str = "cached", profile: StorageProfile | None = None) -> None:
        if io not in IO_MODES:
            raise InputError(f"unknown --io {io!r}", f"choose {' or '.join(IO_MODES)}")
        self.io = io
        self.profile = profile
        self._lock = threading.Lock()
        self._free_at = 0.0  # when the emulated device finishes its queued transfers
        self.reads = 0
        self.slower_than_profile = 0  # reads this machine's storage took longer for than the profile

    @property
    def label(self) -> str:
        parts = [f"io={self.io}"]
        if self.profile:
            parts.append(f"emulated {self.profile.name} ({self.profile.read_mb_per_s:g} MB/s, "
                         f"{self.profile.latency_ms:g} ms)")
        return ", ".join(parts)

    def read(self, path: Path) -> ReadResult:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            if self.io == "direct":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            st = os.fstat(fd)
            size = st.st_size
            chunks, left = [], size
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 24))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks) if len(chunks) != 1 else chunks[0]
        if self.profile:
            with self._lock:
                start = max(t0 + self.profile.latency_ms / 1e3, self._free_at)
                finish = self._free_at = start + len(data) / (self.profile.read_mb_per_s * 1e6)
            wait = finish - time.perf_counter()
            with self._lock:
                self.reads += 1
                self.slower_than_profile += wait <= 0
            if wait > 0:
                time.sleep(wait)
        return ReadResult(data, time.perf_counter() - t0, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
