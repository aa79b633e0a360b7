"""What an expert engine really costs in memory, per precision: resident, and while it is built.

File size is not the answer: ORT copies float initializers and prepacks weights (fp16 is upcast
to fp32 on CPU; an int4 graph built from the bundle's QDQ form keeps both forms). We build a few
engines of each precision in a fresh process, in the form the loader builds them (the engine
cache's optimised graph for integer precisions, or the bundle's graph), and measure:

* ``resident``: RSS growth per engine, everything kept alive;
* ``scratch``: how far RSS peaks above that while one engine is built (ORT's copy of the
  model, the parsed graph, float conversions), read from the kernel's peak-RSS counter.

The runtime charges a load ``resident + scratch`` against the budget while it is in flight, so
the budget bounds the process's real footprint. Results are cached per bundle and machine.

    python -m dymoe.runtime.costs BUNDLE [engine|bundle]     # prints the JSON it measures
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SAMPLES = 4
FORMS = ("engine", "bundle")  # how the loader builds engines: from the engine cache, or the bundle
VERSION = 3  # of the measurement (a changed method re-measures)


@dataclass(frozen=True)
class EngineCosts:
    resident: dict[str, int]  # precision -> bytes one resident engine holds
    scratch: dict[str, int]  # precision -> extra bytes while one is built

    def in_flight(self, precision: str) -> int:
        return self.resident[precision] + self.scratch[precision]

    def to_json(self) -> dict:
        return {"resident": self.resident, "scratch": self.scratch}

    @staticmethod
    def from_json(data: dict) -> EngineCosts:
        return EngineCosts({k: int(v) for k, v in data["resident"].items()},
                           {k: int(v) for k, v in data["scratch"].items()})


def measure_here(bundle_path: Path, form: str = "engine", samples: int = SAMPLES) -> EngineCosts:
    """Measure in this process, loading through the runtime's own ``Loader`` (read, checksum,
    build), smallest precisions first, every engine kept alive until the end."""
    import gc

    import numpy as np

    from .bundle import Bundle
    from .engine_cache import EngineCache
    from .loader import Loader
    from .memory import current_rss, peak_rss, release_free_memory, reset_peak
    from .storage import Storage

    bundle = Bundle(bundle_path)
    spec = bundle.spec
    every = [(layer, e) for layer in spec.moe_layers for e in range(spec.num_experts)]
    keys = every[1:min(samples, len(every) - 1) + 1]  # the first one warms up each precision below
    first = every[0]
    sizes = {p: bundle.manifest.files[bundle.expert_rel(*first, p)].bytes for p in bundle.precisions}
    keep, resident, scratch = [], {}, {}
    x = np.zeros((1, spec.hidden_size), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        loader = Loader(bundle, Storage("cached"), workers=1,
                        engine_cache=EngineCache(Path(tmp)) if form == "engine" else None)

        def load(key, p):  # on a loader thread, as at run time (its malloc arena is another)
            s = loader.submit(*key, p).result().session
            s.run(None, {"x": x})  # the first run allocates kernel buffers too
            return s

        for p in bundle.precisions:  # one-time kernel set-up must not count as expert cost
            keep.append(load(first, p))
            for key in keys:  # the engine cache's optimised graphs, as a later run finds them
                load(key, p)
        for p in sorted(bundle.precisions, key=sizes.get):
            gc.collect()
            release_free_memory()  # every measurement starts from a heap with no free pages
            before = current_rss()
            peak_over = 0
            for key in keys:
                tracked = reset_peak()
                keep.append(load(key, p))
                peak = peak_rss()
                release_free_memory()  # the scratch is freed but stays in RSS until trimmed
                if tracked:
                    peak_over = max(peak_over, peak - current_rss())
            resident[p] = max(sizes[p], int((current_rss() - before) / len(keys)))
            scratch[p] = peak_over if peak_over > 0 else 2 * sizes[p]
        loader.close()
    return EngineCosts(resident, scratch)


def estimate(bundle_path: Path) -> EngineCosts:
    """Without a measurement: files resident as they are, twice the file while building."""
    from dymoe.bundle.manifest import read_manifest

    m = read_manifest(bundle_path)
    first = m.experts[0]
    sizes = {p: m.files[first.variants[p].path].bytes for p in m.quantization.precisions}
    return EngineCosts(sizes, {p: 2 * b for p, b in sizes.items()})


def _cache_file(bundle_path: Path, form: str) -> Path:
    from dymoe.bundle.manifest import read_manifest

    m = read_manifest(bundle_path)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dymoe" / "costs"
    return base / f"{m.source.fingerprint_sha256[:16]}-{'-'.join(m.quantization.precisions)}-{form}-v{VERSION}.json"


def engine_costs(bundle_path: Path, form: str = "engine") -> EngineCosts:
    """Per-precision costs of one expert engine, measured once per bundle, form and machine."""
    from dymoe.bundle.fsutil import atomic_write_text

    cache = _cache_file(bundle_path, form)
    try:
        return EngineCosts.from_json(json.loads(cache.read_text()))
    except (FileNotFoundError, ValueError, KeyError, AttributeError):
        pass
    proc = subprocess.run([sys.executable, "-m", "dymoe.runtime.costs", str(bundle_path), form],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:  # measurement is an optimisation of accuracy, not a requirement
        return estimate(bundle_path)
    costs = EngineCosts.from_json(json.loads(proc.stdout))
    atomic_write_text(cache, json.dumps(costs.to_json()))
    return costs


if __name__ == "__main__":
    print(json.dumps(measure_here(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "engine").to_json()))
