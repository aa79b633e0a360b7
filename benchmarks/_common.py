"""Shared benchmark plumbing: results folder, JSON output, median/spread, and a table."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache" / "bench"


def machine() -> dict:
    import os

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    return (max(xs) - min(xs)) if xs else 0.0


def show(title: str, columns: list[str], rows: list[list]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[f"{v:,.3f}" if isinstance(v, float) else str(v) for v in r])
    Console(width=160).print(table)  # logs: never squeeze a column


def write_json(name: str, data: dict) -> Path:
    from dymoe.bundle.fsutil import atomic_write_text

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps({"machine": machine(), **data}, indent=1) + "\n")  # never half a file
    print(f"wrote {path}")
    return path


def hf_greedy_decode(model, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    """A transformers causal LM's median time per decode step and its greedy token ids: the prompt in
    one forward, then ``tokens - 1`` steps of one token on its KV cache (torch, no grad)."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        ids, times = [tok], []
        for _ in range(tokens - 1):
            t = time.perf_counter()
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            times.append(time.perf_counter() - t)
            ids.append(tok)
    return med(times), ids
