"""What a folder holds before dymoe writes a bundle into it, and how dymoe removes its own files.

dymoe writes only into a folder that is absent, empty, a bundle it can read, or an export it
left unfinished (its journal); it deletes only files such a manifest or journal lists, the
temporary files of its own atomic writes, and the empty folders they leave. A folder holding
anything else is refused, ``--force`` or not, so pointing ``--out`` at the wrong place cannot
cost a user their files.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from dymoe.bundle.errors import BundleError, InputError
from dymoe.bundle.manifest import Manifest, read_manifest
from dymoe.bundle.naming import LOCK_NAME, MANIFEST_NAME
from dymoe.bundle.paths import bad_relative, check_relative, remove

# an atomic write's temporary file: ".<name>.<random>.tmp" (fsutil.temp_name; older: mkstemp's)
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{1,16}\.tmp$")


@dataclass
class FolderState:
    kind: str  # "absent" | "empty" | "bundle" | "unfinished" | "foreign"
    manifest: Manifest | None = None
    journal_fingerprint: str | None = None
    journal_files: dict[str, dict] = field(default_factory=dict)
    why: str = ""  # for "foreign": what dymoe did not recognise


def folder_state(out: Path, journal_name: str) -> FolderState:
    """Classify ``out`` without changing anything."""
    from dymoe.bundle.journal import read_journal

    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return FolderState("absent")
    if not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder", "choose a folder for the bundle")
    # the lock and an atomic write's temporary file are dymoe's own (another export may be mid-write)
    names = {p.name for p in out.iterdir() if p.name != LOCK_NAME and not _TEMP.match(p.name)}
    if not names:
        return FolderState("empty")
    if MANIFEST_NAME in names:
        try:
            return FolderState("bundle", manifest=read_manifest(out))
        except BundleError as e:
            return FolderState("foreign", why=f"its {MANIFEST_NAME} is not a dymoe manifest ({e.message})")
    if journal_name in names:
        fingerprint, files = read_journal(out / journal_name)
        if fingerprint is not None and all(bad_relative(rel) is None for rel in files):
            return FolderState("unfinished", journal_fingerprint=fingerprint, journal_files=files)
        return FolderState("foreign", why=f"its {journal_name} is not a dymoe export journal")
    return FolderState("foreign", why="it holds files dymoe did not write")


def foreign_error(out: Path, state: FolderState) -> InputError:
    return InputError(f"--out {out} is not empty and is not a dymoe bundle: {state.why}",
                      "choose a new or empty folder; dymoe never overwrites or deletes files it did not write")


def remove_listed(out: Path, rels: list[str]) -> None:
    """Delete the bundle files ``rels`` (each confined to ``out``), then the folders they leave
    empty, deepest first; ``out`` itself stays."""
    for rel in rels:
        remove(out, check_relative(rel, "listed file"))
    folders = {str(Path(rel).parent) for rel in rels} - {"."}
    parents = set()
    for f in folders:
        p = Path(f)
        parents.update(str(q) for q in [p, *p.parents] if str(q) != ".")
    for rel in sorted(parents, key=lambda r: -r.count("/")):
        path = out / rel
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                path.rmdir()  # only when empty
        except OSError:
            pass


def remove_temp_files(out: Path) -> int:
    """Delete the temporary files of interrupted atomic writes under ``out``, never following
    a symbolic link; return how many were removed."""
    removed = 0
    for folder, _dirs, files in os.walk(out, followlinks=False):
        for name in files:
            path = Path(folder) / name
            if _TEMP.match(name) and stat.S_ISREG(os.lstat(path).st_mode):
                path.unlink()
                removed += 1
    return removed
