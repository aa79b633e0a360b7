"""Atomic file writes and checksums: the only way dymoe writes files a reader trusts.

Files are created with mode 0666 minus the process umask (0644 under the usual umask 022), as
any Unix tool would, so a bundle exported by one user can be read by another.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from pathlib import Path

from dymoe.bundle.errors import DymoeError, InputError

_CHUNK = 1 << 20
_FILE_MODE = 0o666  # the kernel applies the umask


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def temp_name(path: Path) -> Path:
    """The temporary sibling an atomic write of ``path`` goes through (hidden, ``.tmp``): a crash
    leaves at most such a file, which a resumed run recognises by this pattern and removes."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def atomic_write_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    Returns the sha256 of ``data``. The temporary file lives in the same folder (same file
    system) and is fsynced before the rename, so a crash never leaves a truncated ``path``;
    a failed write (a full disk) removes it again.
    """
    return atomic_write_chunks(path, [data])[1]


def atomic_write_chunks(path: Path, chunks) -> tuple[int, str]:
    """As :func:`atomic_write_bytes`, for data given as pieces (bytes-like objects) that are never
    joined in memory (a gigabyte of ONNX external data); returns (size, sha256)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    h, size = hashlib.sha256(), 0
    # O_EXCL | O_NOFOLLOW: never write through a link someone planted under the temporary name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                h.update(chunk)
                size += memoryview(chunk).nbytes
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size, h.hexdigest()


def atomic_write_text(path: Path, text: str) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(path: Path) -> None:
    """Persist a rename inside ``path`` (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system that holds ``folder`` (or its nearest existing parent)."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


# room kept free beside what a write needs: journals, manifests, file-system metadata
DISK_MARGIN = 64 * 2**20


def require_free_space(folder: Path, needed: int, what: str, hint: str = "") -> None:
    """Fail before any work when ``needed`` bytes (plus a margin) will not fit under ``folder``."""
    free = free_bytes(folder)
    if free is None or needed + DISK_MARGIN <= free:
        return
    raise DymoeError(
        f"{what} needs about {_size(needed)} in {folder}, but only {_size(free)} is free",
        hint or "free some space on that disk, or choose a folder on another disk",
    )


def disk_full_error(e: OSError, what: str) -> DymoeError | None:
    """A clean error for ENOSPC/EDQUOT raised while ``what``; None for any other OSError."""
    if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return None
    where = f" ({e.filename})" if e.filename else ""
    return DymoeError(f"the disk filled up while {what}{where}",
                      "free some space, then rerun the same command: finished files are kept and it resumes")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _nearest_existing(path: Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_parent(path: Path, option: str) -> None:
    parent = _nearest_existing(Path(path).absolute().parent)
    if not parent.is_dir():
        raise InputError(f"{option} {path}: {parent} is a file, not a folder", "choose a path in a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: cannot write into {parent}", "choose a folder you can write")


def check_output_file(path: Path, option: str) -> Path:
    """Refuse an output file path dymoe could not write, before any work is done for it."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder", f"give {option} a file name, e.g. {path / 'out.json'}")
    _check_parent(path, option)
    return path


def check_output_dir(path: Path, option: str) -> Path:
    """Refuse an output folder path that is a file or cannot be created, before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file", f"give {option} a folder")
    _check_parent(path / "x", option)
    return path


def read_user_text(path: Path, option: str) -> str:
    """A user's UTF-8 text file, or a clean error naming the option and what is wrong."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{option} {path} does not exist", "check the path") from None
    except IsADirectoryError:
        raise InputError(f"{option} {path} is a folder", f"give {option} a text file") from None
    except PermissionError:
        raise InputError(f"{option} {path} cannot be read (permission denied)",
                         "check the file's permissions") from None
    except UnicodeDecodeError:
        raise InputError(f"{option} {path} is not UTF-8 text", "convert it to UTF-8") from None
    except OSError as e:
        raise InputError(f"{option} {path} cannot be read ({e.strerror})", "check the path") from None
