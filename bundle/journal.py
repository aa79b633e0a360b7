"""The export journal: an append-only record of finished bundle files.

Line one holds the export's fingerprint (checkpoint + options); every later line is one
finished file ``{"path", "bytes", "sha256", ...}``. Appending a line per file keeps the cost
constant however many experts a model has; a line torn by a crash is simply ignored, and the
file it described is rewritten on resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dymoe.bundle.fsutil import atomic_write_text


def read_journal(path: Path) -> tuple[str | None, dict[str, dict]]:
    """Return ``(fingerprint, {path: entry})``; ``(None, {})`` when absent or unreadable."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None, {}
    try:
        fingerprint = json.loads(lines[0])["fingerprint"]
    except (IndexError, ValueError, KeyError, TypeError):
        return None, {}
    done: dict[str, dict] = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            rel = entry.pop("path")
            if not isinstance(rel, str):
                continue
            done[rel] = entry
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # torn line from an interrupted append
    return fingerprint, done


def read_retired(path: Path) -> list[str]:
    """Files a journal marked as replaced (:meth:`Journal.retire`): to delete once the manifest
    that no longer lists them is on disk."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    out: list[str] = []
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("retired"), list):
            out += [r for r in entry["retired"] if isinstance(r, str)]
    return out


class Journal:
    def __init__(self, path: Path, fingerprint: str, done: dict[str, dict]) -> None:
        """Start (or compact) the journal with what is already known to be done."""
        self.path = Path(path)
        lines = [json.dumps({"fingerprint": fingerprint})]
        lines += [json.dumps({"path": rel, **entry}) for rel, entry in done.items()]
        atomic_write_text(self.path, "\n".join(lines) + "\n")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def record(self, files: dict[str, dict]) -> None:
        for rel, entry in files.items():
            self._file.write(json.dumps({"path": rel, **entry}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def retire(self, rels: list[str]) -> None:
        """Record, before the manifest switch, which files the switch replaces, so that a run
        stopped right after it still knows exactly what to delete (and nothing else)."""
        self._file.write(json.dumps({"retired": sorted(rels)}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
