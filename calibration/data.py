"""Calibration text: loading, tokenising and deterministic sampling of token windows.

Accepted inputs (any mix, given in order):

* a plain text file (UTF-8): one document;
* a JSON Lines file (``.jsonl`` / ``.ndjson``): one document per line, in its ``"text"`` field
  (blank lines are skipped);
* a folder: every ``.txt``, ``.text``, ``.md``, ``.jsonl`` and ``.ndjson`` file below it, in sorted
  path order.

Documents are tokenised with the bundle's tokenizer and concatenated, each followed by the model's
end-of-sequence token when it has one (unless the document already ends with it). The stream is cut
into non-overlapping windows of ``seq_len`` tokens from its start; ``samples`` of them (all of them
when there are fewer) are drawn without replacement, the first ``samples`` of
``numpy.random.default_rng(seed).permutation(available)``, and kept in stream order; the draw order
is kept too, so that its first n windows are a random subset (what the sensitivity sweep uses).
Every problem with the data is an ``InputError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dymoe.bundle.errors import InputError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class DataFile:
    name: str  # the path as given (or relative to the folder given)
    bytes: int
    sha256: str
    documents: list[str]


@dataclass
class Windows:
    windows: list[np.ndarray]  # int64 [seq_len] each, in stream order
    tokens: int  # tokens in the whole stream
    available: int  # windows the stream holds
    draw_order: list[int]  # indices into ``windows`` in the order they were drawn

    def subset(self, n: int) -> list[int]:
        """Indices (into ``windows``, ascending) of a random subset of ``n`` windows: the first drawn."""
        return sorted(self.draw_order[:n])


def discover(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """Expand folders; return ``(path, display name)`` per data file, in the order given."""
    if not paths:
        raise InputError("no calibration data given", "pass text with --data FILE_OR_FOLDER")
    found: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not files:
                raise InputError(f"data folder {p} holds no .txt, .text, .md, .jsonl or .ndjson files",
                                 "point --data at text files or a folder of them")
            found += [(f, str(p / f.relative_to(p))) for f in files]
        elif p.is_file():
            found.append((p, str(p)))
        else:
            raise InputError(f"data file not found: {p}", "check the path given to --data")
    return found


def read_file(path: Path, name: str) -> DataFile:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read data file {name}: {e.strerror}", "check the path and its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"data file {name} is not valid UTF-8 (byte {e.start}, line {line})",
                         "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    text = text.removeprefix("\ufeff")
    if path.suffix.lower() in JSONL_SUFFIXES:
        docs = _jsonl_documents(text, name)
    else:
        docs = [text] if text.strip() else []
    if not docs:
        raise InputError(f"data file {name} is empty", "give a file with some text in it")
    return DataFile(name=name, bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest(), documents=docs)


def _jsonl_documents(text: str, name: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{name}:{lineno}: not valid JSON ({e.msg})",
                             "JSON Lines files hold one JSON object per line, e.g. {\"text\": \"...\"}") from None
        if not isinstance(record, dict) or "text" not in record:
            raise InputError(f"{name}:{lineno}: the JSON record has no 'text' field",
                             "JSON Lines files hold one object per line with the text in \"text\"")
        if not isinstance(record["text"], str):
            raise InputError(f"{name}:{lineno}: field 'text' is a {type(record['text']).__name__}, not a string",
                             "put each document's text in \"text\" as a string")
        if record["text"].strip():
            docs.append(record["text"])
    return docs


def load(paths: Sequence[Path]) -> list[DataFile]:
    return [read_file(p, name) for p, name in discover(paths)]


def tokenize(files: Sequence[DataFile], encode: Callable[[str], list[int]], eos: int | None) -> np.ndarray:
    ids: list[int] = []
    for f in files:
        for doc in f.documents:
            tokens = encode(doc)
            ids += tokens
            if eos is not None and (not tokens or tokens[-1] != eos):
                ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def sample_windows(ids: np.ndarray, samples: int, seq_len: int, seed: int, names: Sequence[str] = ()) -> Windows:
    available = len(ids) // seq_len
    if available == 0:
        what = ", ".join(names) or "the data"
        raise InputError(f"{what} has {len(ids)} tokens, fewer than one sample of --seq-len {seq_len} needs",
                         "give more text or a smaller --seq-len")
    drawn = np.random.default_rng(seed).permutation(available)[:samples]
    chosen = np.sort(drawn)
    rank = {int(w): i for i, w in enumerate(chosen)}
    return Windows([ids[i * seq_len:(i + 1) * seq_len].copy() for i in chosen], tokens=len(ids), available=available,
                   draw_order=[rank[int(w)] for w in drawn])


def draw(paths: Sequence[Path], encode: Callable[[str], list[int]], eos: int | None, samples: int, seq_len: int,
         seed: int) -> tuple[list[DataFile], Windows]:
    """Read, tokenise and sample the data in one go (errors name the file at fault)."""
    files = load(paths)
    ids = tokenize(files, encode, eos)
    return files, sample_windows(ids, samples, seq_len, seed, [f.name for f in files])
