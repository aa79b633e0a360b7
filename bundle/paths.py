"""The one place that turns a bundle-relative name into a file system path.

A bundle names its files by relative paths (manifest.json, calibration.json). A bundle may
come from anyone, so every such name is checked before it is used: it must be a plain
relative path ("experts/layer_000/expert_003.int4.onnx": '/'-separated, no '..' or '.', not
absolute, no backslash or control character), and what it names, symbolic links followed,
must lie inside the bundle folder. Anything else is a BundleError naming the entry, so a
bundle can never make dymoe read, overwrite or delete a file outside it.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from dymoe.bundle.errors import BundleError

MAX_NAME = 1024  # characters in one relative path: far above anything dymoe writes
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def bad_relative(rel: object) -> str | None:
    """Why ``rel`` is not a plain bundle-relative path, or None when it is one."""
    if not isinstance(rel, str) or not rel:
        return "is empty or not a string"
    if len(rel) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return "holds a control character"
    if "\\" in rel:
        return "holds a backslash (bundle paths use '/')"
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        return "is absolute"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' part"
    return None


def check_relative(rel: object, what: str) -> str:
    """``rel`` if it is a plain relative path, else a BundleError naming ``what``."""
    why = bad_relative(rel)
    if why is not None:
        raise BundleError(f"{what} {rel!r} {why}; bundle files must be plain relative paths inside the bundle",
                          "the bundle is corrupt or was not written by dymoe; do not use it, re-export it")
    return rel  # type: ignore[return-value]


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (already resolved) is ``root`` (already resolved) or lies below it."""
    return path == root or root in path.parents


def resolve(bundle: Path, rel: str, what: str = "bundle file") -> Path:
    """The real path of ``bundle/rel``, checked to stay inside the bundle once every symbolic
    link is followed. The file need not exist (a path about to be written)."""
    check_relative(rel, what)
    root = Path(os.path.realpath(bundle))
    target = Path(os.path.realpath(root / rel))
    if not inside(root, target):
        raise BundleError(f"{what} {rel!r} leads outside the bundle {bundle} (through a symbolic link to {target})",
                          "the bundle is not safe to use; re-export it, or remove the link")
    return target


def resolve_file(bundle: Path, rel: str, what: str = "bundle file") -> Path:
    """As :func:`resolve`, for a file that must exist and be a regular file."""
    path = resolve(bundle, rel, what)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BundleError(f"bundle file missing: {Path(bundle) / rel}",
                          "re-export the bundle (or restore the file)") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{what} {rel!r} is not a regular file", "re-export the bundle")
    return path


def remove(bundle: Path, rel: str, what: str = "bundle file") -> None:
    """Delete ``bundle/rel``, a file dymoe itself wrote or listed: never through a link that
    leaves the bundle, never a folder. A missing file is fine."""
    check_relative(rel, what)
    path = Path(bundle) / rel
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        # the parent chain must be ours; the link itself is removed, never what it points at
        parent = resolve(bundle, rel.rsplit("/", 1)[0], what) if "/" in rel else Path(os.path.realpath(bundle))
        os.unlink(parent / path.name)
        return
    real = resolve(bundle, rel, what)
    if stat.S_ISDIR(os.lstat(real).st_mode):
        raise BundleError(f"{what} {rel!r} is a folder; dymoe deletes only files it wrote", "re-export the bundle")
    real.unlink(missing_ok=True)


def real_subdir(bundle: Path, rel: str) -> Path | None:
    """``bundle/rel`` when it is a real folder inside the bundle (not a link out of it), else None."""
    try:
        path = resolve(bundle, rel, "folder")
    except BundleError:
        return None
    return path if path.is_dir() else None


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and bool(_HEX64.match(value))
