"""One writer per bundle: export, requantize and calibrate hold an exclusive lock on
``BUNDLE/.dymoe.lock`` while they change the bundle; readers (run, bench, eval, info) take no
lock and are never blocked, because every file a writer changes is replaced atomically and
manifest.json switches last.

The lock is ``flock`` on the file: the kernel releases it when the holder exits, even on
``kill -9``, so a crashed writer never leaves a stale lock behind. The holder writes its PID
and operation into the file so a second writer can say who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from dymoe.bundle.errors import BundleError
from dymoe.bundle.naming import LOCK_NAME

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; dymoe's devices are Linux
    fcntl = None  # type: ignore[assignment]


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 200).decode("utf-8", "replace").split()
    except OSError:
        return "another dymoe process"
    if len(text) >= 2 and text[0].isdigit():
        return f"PID {text[0]} ({' '.join(text[1:])})"
    return "another dymoe process"


def cannot_write(folder: Path, e: OSError, operation: str) -> BundleError:
    what = "read-only" if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else f"not writable ({e.strerror})"
    return BundleError(f"{folder} is {what}, and dymoe {operation} writes into it",
                       "copy the bundle to a folder you can write, or fix its permissions")


_HELD: dict[str, int] = {}  # real folder -> nesting depth in this process (export's gptq stage calibrates)


@contextlib.contextmanager
def bundle_lock(folder: Path, operation: str) -> Iterator[None]:
    """Hold the exclusive writer lock of bundle ``folder`` (which must exist) for ``operation``.
    Re-entrant within one process: a writer that calls another writer keeps its one lock."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BundleError(f"{path} is a symbolic link", "remove it; dymoe creates its own lock file") from None
        raise cannot_write(folder, e, operation) from None
    held = False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BundleError(f"bundle {folder} is in use by {_holder(fd)}",
                                  "wait for it to finish (or stop it), then rerun") from None
        held = True
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} dymoe {operation}\n".encode())
        _HELD[key] = 1
        yield
    finally:
        if held:
            _HELD.pop(key, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock
