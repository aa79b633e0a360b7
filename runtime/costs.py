"""What a resident expert engine really costs in memory, per precision.

File size is not the answer: ORT copies float initializers and prepacks weights (an fp32
expert takes about twice its file; fp16 is upcast to fp32 on CPU). We measure the RSS growth
of building a few sessions of each precision in a fresh process (so freed memory from other
work cannot hide the cost) and cache the result per bundle.

    python -m dymoe.runtime.costs BUNDLE     # prints the JSON it measures
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SAMPLES = 3


def measure_here(bundle_path: Path, samples: int = SAMPLES) -> dict[str, int]:
    """Measure in this process: smallest files first, everything kept alive until the end."""
    import gc

    import numpy as np

    from .bundle import Bundle
    from .memory import current_rss
    from .ort_session import create_session

    bundle = Bundle(bundle_path)
    spec = bundle.spec
    every = [(layer, e) for layer in spec.moe_layers for e in range(spec.num_experts)]
    keys = every[1:min(samples, len(every) - 1) + 1]  # the first one warms up each precision below
    first = every[0]
    sizes = {p: bundle.manifest.files[bundle.expert_rel(*first, p)].bytes for p in bundle.precisions}
    keep, costs = [], {}
    x = np.zeros((1, spec.hidden_size), np.float32)
    for p in bundle.precisions:  # one-time kernel and arena set-up must not count as expert cost
        s = create_session(bundle.read(bundle.expert_rel(*first, p)), 1, p)
        s.run(None, {"x": x})
        keep.append(s)
    for p in sorted(bundle.precisions, key=sizes.get):
        datas = [bundle.read(bundle.expert_rel(layer, e, p)) for layer, e in keys]
        gc.collect()
        before = current_rss()
        for data in datas:
            s = create_session(data, 1, p)
            s.run(None, {"x": x})  # first run allocates kernel buffers too
            keep.append(s)
        costs[p] = max(sizes[p], int((current_rss() - before) / len(keys)))
        del datas
    return costs


def _cache_file(bundle_path: Path) -> Path:
    from dymoe.bundle.manifest import read_manifest

    m = read_manifest(bundle_path)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dymoe" / "costs"
    return base / f"{m.source.fingerprint_sha256[:16]}-{'-'.join(m.quantization.precisions)}.json"


def resident_costs(bundle_path: Path) -> dict[str, int]:
    """Per-precision resident bytes of one expert, measured once per bundle and machine."""
    from dymoe.bundle.fsutil import atomic_write_text

    cache = _cache_file(bundle_path)
    try:
        return {k: int(v) for k, v in json.loads(cache.read_text()).items()}
    except (FileNotFoundError, ValueError):
        pass
    proc = subprocess.run([sys.executable, "-m", "dymoe.runtime.costs", str(bundle_path)], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:  # measurement is an optimisation of accuracy, not a requirement
        from dymoe.bundle.manifest import read_manifest

        m = read_manifest(bundle_path)
        first = m.experts[0]
        return {p: m.files[first.variants[p].path].bytes for p in m.quantization.precisions}
    costs = json.loads(proc.stdout)
    atomic_write_text(cache, json.dumps(costs))
    return costs


if __name__ == "__main__":
    print(json.dumps(measure_here(Path(sys.argv[1]))))
