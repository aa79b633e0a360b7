"""How close expert loading comes to storage speed: the direct-read bandwidth of the bundle's own
expert files (page cache dropped before each read; 1, 2 and 4 threads, the best counts), against
the runtime's Loader reading, verifying and building engines from the same files (``--io direct``,
engine cache warm) with 1, 2 and 3 workers. Per precision: MB/s, ms per expert split into read and
build, and load throughput as a share of the bandwidth. Prints a table, writes
results/load_throughput.json.

    python benchmarks/load_throughput.py [--bundle B] [--experts 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import RESULTS, machine, med, show


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read(path: Path) -> int:
    with open(path, "rb", buffering=0) as f:
        return len(f.read())


def read_bandwidth(files: list[Path], threads: int) -> float:
    for f in files:
        _drop(f)
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(pool.map(_read, files))
    return n / (time.perf_counter() - t)


def expert_files(bundle: Path, precision: str | None = None, count: int = 48) -> list[Path]:
    from dymoe.runtime.bundle import Bundle

    b = Bundle(bundle)
    spec = b.spec
    keys = [(layer, e) for layer in spec.moe_layers for e in range(spec.num_experts)][:count]
    precs = [precision] if precision else b.precisions
    return [bundle / b.expert_rel(layer, e, p) for p in precs for layer, e in keys]


def direct_read_bandwidth(bundle: Path, repeats: int = 3) -> float:
    """Bytes/s reading the bundle's expert files from storage: the best thread count's median."""
    files = expert_files(Path(bundle))
    return max(med([read_bandwidth(files, t) for _ in range(repeats)]) for t in (1, 2, 4))


def load_throughput(bundle: Path, precision: str, workers: int, count: int) -> dict:
    from dymoe.runtime.bundle import Bundle
    from dymoe.runtime.engine_cache import EngineCache
    from dymoe.runtime.loader import Loader
    from dymoe.runtime.storage import Storage

    b = Bundle(bundle)
    spec = b.spec
    keys = [(layer, e) for layer in spec.moe_layers for e in range(spec.num_experts)][:count]
    loader = Loader(b, Storage("direct"), workers=workers, engine_cache=EngineCache())
    try:
        for key in keys:  # warm the engine cache and the checksum memo, as a long run has them
            loader.load(*key, precision)
        before = (loader.totals.bytes_read, loader.totals.read_s, loader.totals.create_s)
        t = time.perf_counter()
        for f in [loader.submit(*key, precision) for key in keys]:
            f.result()
        wall = time.perf_counter() - t
        n = loader.totals.bytes_read - before[0]
        return {"bytes_per_s": n / wall, "read_ms": (loader.totals.read_s - before[1]) / len(keys) * 1e3,
                "build_ms": (loader.totals.create_s - before[2]) / len(keys) * 1e3, "bytes": n}
    finally:
        loader.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="default: the widened demo bundle of runtime_policies.py")
    ap.add_argument("--experts", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.bundle is None:
        from runtime_policies import bundle_for

        args.bundle, _ = bundle_for("widened")
    from dymoe.runtime.bundle import Bundle

    precisions = Bundle(args.bundle).precisions
    rows, out = [], {"machine": machine(), "bundle": str(args.bundle), "precisions": {}}
    for p in precisions:
        files = expert_files(args.bundle, p, args.experts)
        bw = {t: med([read_bandwidth(files, t) for _ in range(args.repeats)]) for t in (1, 2, 4)}
        best = max(bw.values())
        loads = {w: [load_throughput(args.bundle, p, w, args.experts) for _ in range(args.repeats)] for w in (1, 2, 3)}
        out["precisions"][p] = {"read_bytes_per_s": bw, "loads": loads}
        for w, runs in loads.items():
            thr = med([r["bytes_per_s"] for r in runs])
            rows.append([p, w, best / 1e6, thr / 1e6, thr / best, med([r["read_ms"] for r in runs]),
                         med([r["build_ms"] for r in runs])])
    show(f"expert loading vs direct reads ({args.experts} experts per precision, medians of {args.repeats})",
         ["precision", "workers", "read MB/s", "load MB/s", "load / read", "read ms", "build ms"], rows)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "load_throughput.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
