"""Export throughput (MB of source weights per second) and peak RSS on a synthetic checkpoint
with realistic shapes (default: hidden 2048, expert intermediate 5632, 8 experts, 4 layers,
bf16: 2.3 GB). Peak RSS must stay far below the checkpoint size: tensors are read one at a time.

    python benchmarks/export_throughput.py [--layers 4] [--workers 1,2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time

from _common import CACHE, med, show, write_json
from _watch import watch_rss

from dymoe.toolchain.checkpoint import Checkpoint
from dymoe.toolchain.synthetic import write_synthetic_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--precisions", default="fp16,int8,int4,int2")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    src = CACHE / f"synthetic_h{args.hidden}_i{args.intermediate}_e{args.experts}_l{args.layers}"
    if not (src / "config.json").exists():
        print(f"writing synthetic checkpoint to {src} ...")
        write_synthetic_checkpoint(src, hidden=args.hidden, intermediate=args.intermediate, experts=args.experts,
                                   layers=args.layers, vocab=32000)
    source_mb = Checkpoint(src).source_bytes() / 1e6
    rows, runs = [], []
    for workers in [int(w) for w in args.workers.split(",")]:
        seconds, rss, tree = [], [], []
        for _ in range(args.repeats):
            out = CACHE / "bundle_export_bench"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "dymoe.cli", "export", str(src), "--out", str(out),
                                     "--precisions", args.precisions, "--workers", str(workers)])
            peak_one, peak_tree = watch_rss(proc)
            seconds.append(time.perf_counter() - t0)
            rss.append(peak_one)
            tree.append(peak_tree)
            bundle_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
            shutil.rmtree(out)
        runs.append({"workers": workers, "seconds": seconds, "peak_rss_mib": rss, "peak_tree_rss_mib": tree,
                     "bundle_mb": bundle_mb})
        rows.append([workers, f"{source_mb:,.0f}", med(seconds), source_mb / med(seconds), max(rss), max(tree),
                     f"{bundle_mb:,.0f}"])
    show("dymoe export on a synthetic checkpoint", ["workers", "source MB", "seconds", "MB/s",
                                                    "peak RSS MiB (largest process)", "peak RSS MiB (all processes)",
                                                    "bundle MB"], rows)
    write_json("export_throughput", {"source": str(src), "source_mb": source_mb, "precisions": args.precisions,
                                     "runs": runs})


if __name__ == "__main__":
    main()
