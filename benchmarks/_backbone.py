"""What a bundle's backbone costs on this machine: resident memory of its ONNX Runtime sessions and the
time of one decode step per graph, measured in a fresh process (so the RSS counts nothing else; the
first group also carries ONNX Runtime's own start-up, about 10 MiB).

    python benchmarks/_backbone.py BUNDLE [--context 128] [--reps 20]   # prints one JSON line
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss() -> int:
    """RSS once the C heap's free pages are handed back (as the runtime does under a budget): what
    the sessions hold, not what building them passed through."""
    from dymoe.runtime.memory import current_rss, release_free_memory

    gc.collect()
    release_free_memory()
    return current_rss()


def _feeds(session, context: int, vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for i in session.get_inputs():
        if i.type == "tensor(int64)":
            out[i.name] = np.array([context] if i.name == "position_ids" else [rng.integers(vocab)], np.int64)
        else:
            shape = [1 if d == "T" else context if d == "P" else d for d in i.shape]
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def measure(bundle: Path, context: int, reps: int) -> dict:
    """In this process: RSS added by the backbone sessions (embed + head, then layers + routers), and
    the median time of a decode step (T = 1 after ``context`` cached tokens) of each graph."""
    from dymoe.runtime.bundle import Bundle

    b = Bundle(bundle)
    bb = b.manifest.backbone
    groups = {"vocab": [bb.embed, bb.head], "layers": [*bb.layers, *bb.routers]}
    out: dict = {"rss_bytes": {}, "step_ms": {}}
    sessions = {}
    for name, rels in groups.items():
        before = _rss()
        for rel in rels:
            sessions[rel] = b.session(rel)
        out["rss_bytes"][name] = _rss() - before
    for rel, s in sessions.items():
        feeds = _feeds(s, context, b.spec.vocab_size)
        s.run(None, feeds)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            s.run(None, feeds)
            times.append((time.perf_counter() - t0) * 1e3)
        out["step_ms"][rel] = statistics.median(times)
    return out


def measure_in_fresh_process(bundle: Path, context: int = 128, reps: int = 20) -> dict:
    proc = subprocess.run([sys.executable, __file__, str(bundle), "--context", str(context), "--reps", str(reps)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    print(json.dumps(measure(a.bundle, a.context, a.reps)))
