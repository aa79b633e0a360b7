"""Export speed at Qwen3-30B-A3B's exact shapes, extrapolated to the whole model.

A synthetic bf16 checkpoint with Qwen3-30B-A3B's shapes (hidden 2048, 128 experts of intermediate
768, top-8, 32 query heads and 4 KV heads of 128, vocab 151,936) but only ``--layers`` of its 48
layers is exported at default settings (hqq; fp16,int8,int4,int2) in a fresh process, once per
``--workers`` value. Measured: wall time, peak RSS of the largest process and of the whole process
tree (workers included), the bundle's bytes per precision and the backbone's, and the mean error
statistics the manifest records per precision.

Extrapolation: the export journal says when each file was finished, which splits a run into a
start-up, a backbone phase (embedding, LM head, layer graphs, routers; it comes first) and an
expert phase. Each phase is scaled by its share of the 48-layer model's source bytes (the backbone
is mostly the embedding and the LM head, which do not grow with depth; experts grow 24x from
2 layers). ``--profile N`` also times N experts in this process per stage and precision
(cProfile of the exporter's own per-expert task), and the embedding and LM head graphs.

    python benchmarks/export_qwen3_30b_shape.py [--layers 2] [--workers 1,2] [--repeats 1] [--profile 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import CACHE, med, show, write_json
from _export_profile import profile_backbone, profile_experts
from _watch import watch_rss

from dymoe.bundle.manifest import read_manifest
from dymoe.bundle.naming import EMBED, EXPORT_JOURNAL, HEAD
from dymoe.toolchain.checkpoint import Checkpoint
from dymoe.toolchain.synthetic import write_synthetic_checkpoint

# Qwen/Qwen3-30B-A3B config.json (all 48 layers sparse, no shared expert, untied embeddings)
SHAPE = dict(hidden=2048, intermediate=768, experts=128, top_k=8, heads=32, kv_heads=4, head_dim=128,
             vocab=151936, model_type="qwen3_moe", max_position_embeddings=40960)
FULL_LAYERS = 48


def checkpoint(layers: int) -> Path:
    src = CACHE / f"qwen3_30b_a3b_l{layers}"
    if not (src / "config.json").exists():
        print(f"writing the synthetic checkpoint to {src} ...")
        write_synthetic_checkpoint(src, layers=layers, **SHAPE)
    return src


def source_split(ckpt: Checkpoint) -> dict[str, int]:
    """Source bytes: experts, per-layer backbone (attention, norms, router) and the rest."""
    out = {"experts": 0, "layers": 0, "top": 0}
    for name in ckpt.names():
        info = ckpt.info(name)
        kind = "experts" if ".experts." in name else "layers" if name.startswith("model.layers.") else "top"
        out[kind] += info.end - info.begin
    return out


class JournalClock:
    """Polls the export journal; remembers when each file first appeared in it. Reads only what
    was appended since the last poll (the journal of a whole model has 25k lines)."""

    def __init__(self, out: Path, backbone_files: int) -> None:
        self.path, self.seen, self.created, self.offset, self.tail = out / EXPORT_JOURNAL, {}, None, 0, b""
        self.backbone_files = backbone_files
        self.backbone_done = None  # when the last backbone file appeared (the journal's first part)
        self.expert_peak = 0.0  # tree RSS (MiB) once every backbone file is done: the expert phase

    def __call__(self, t: float, tree_mib: float) -> None:
        if self.backbone_done is not None:
            self.expert_peak = max(self.expert_peak, tree_mib)
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        if self.created is None:
            self.created = t
        self.offset += len(chunk)
        *lines, self.tail = (self.tail + chunk).split(b"\n")
        for line in lines:
            try:
                self.seen.setdefault(json.loads(line)["path"], t)
            except (ValueError, KeyError, TypeError):
                continue  # the fingerprint line
        if self.backbone_done is None and sum(f.startswith("backbone/") for f in self.seen) >= self.backbone_files:
            self.backbone_done = t


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_once(src: Path, out: Path, workers: int, args) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    clock = JournalClock(out, 2 + 2 * args.layers)  # embed, head, a layer graph and a router per layer
    cmd = [sys.executable, "-m", "dymoe.cli", "export", str(src), "--out", str(out), "--precisions", args.precisions,
           "--quantizer", args.quantizer, "--workers", str(workers), *shlex.split(args.export_args)]
    load0, cpu0 = os.getloadavg()[0], _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak_one, peak_tree = watch_rss(proc, on_poll=clock)
    seconds = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0  # the export and its workers (each waited for by its parent)
    m = read_manifest(out)
    experts = [f for f in clock.seen if f.startswith("experts/")]
    t_start = clock.created or 0.0
    t_backbone = clock.backbone_done or t_start
    sizes = {p: sum(m.files[v.path].bytes for e in m.experts for q, v in e.variants.items() if q == p)
             for p in m.quantization.precisions}
    bb = {f: m.files[f].bytes for f in m.files if f.startswith("backbone/")}
    errors = {p: {k: sum(getattr(e.variants[p], k) for e in m.experts) / len(m.experts)
                  for k in ("weight_rel_error", "output_rel_error")} for p in m.quantization.precisions}
    if not args.keep:
        shutil.rmtree(out)
    return {"workers": workers, "seconds": seconds, "cpu_s": cpu, "load_before": load0,
            "load_after": os.getloadavg()[0], "startup_s": t_start, "backbone_s": t_backbone - t_start,
            "experts_s": seconds - t_backbone, "expert_files": len(experts), "peak_rss_mib": peak_one,
            "peak_tree_rss_mib": peak_tree, "expert_phase_peak_tree_rss_mib": clock.expert_peak,
            "expert_bytes": sizes, "backbone_bytes": sum(bb.values()),
            "embed_head_bytes": bb.get(EMBED, 0) + bb.get(HEAD, 0),
            "mean_errors": errors}


def extrapolate(run: dict, split: dict[str, int], layers: int, full: int) -> dict:
    """The whole model's time and bundle size from one run's phases (see the module doc)."""
    bb_now = split["top"] + split["layers"]
    bb_full = split["top"] + split["layers"] * full / layers
    scale = full / layers
    seconds = run["startup_s"] + run["backbone_s"] * bb_full / bb_now + run["experts_s"] * scale
    source = bb_full + split["experts"] * scale
    per_layer_bb = (run["backbone_bytes"] - run["embed_head_bytes"]) / layers
    return {"layers": full, "source_mb": source / 1e6, "seconds": seconds, "mb_per_s": source / 1e6 / seconds,
            "expert_mb": {p: b * scale / 1e6 for p, b in run["expert_bytes"].items()},
            "backbone_mb": (run["embed_head_bytes"] + per_layer_bb * full) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="layers of the synthetic checkpoint (of 48)")
    ap.add_argument("--workers", default="1,2", help="comma list; one export per value and repeat")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--precisions", default="fp16,int8,int4,int2")
    ap.add_argument("--quantizer", default="hqq")
    ap.add_argument("--export-args", default="", help="more dymoe export options, as one string")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N experts per stage")
    ap.add_argument("--keep", action="store_true", help="keep the last bundle (in .cache/bench/)")
    args = ap.parse_args()

    src = checkpoint(args.layers)
    ckpt = Checkpoint(src)
    split = source_split(ckpt)
    source_mb = sum(split.values()) / 1e6
    out = CACHE / "bundle_qwen3_30b_shape"
    runs, rows, full_rows = [], [], []
    for workers in [int(w) for w in args.workers.split(",")]:
        done = [run_once(src, out, workers, args) for _ in range(args.repeats)]
        runs += done
        typical = sorted(done, key=lambda r: r["seconds"])[len(done) // 2]
        secs = med([r["seconds"] for r in done])
        full = extrapolate(typical, split, args.layers, FULL_LAYERS)
        rows.append([workers, secs, source_mb / secs, med([r["cpu_s"] for r in done]),
                     f"{max(r['load_before'] for r in done):.1f}", med([r["backbone_s"] for r in done]),
                     split["experts"] / 1e6 / med([r["experts_s"] for r in done]),
                     f"{max(r['peak_rss_mib'] for r in done):,.0f}",
                     f"{max(r['peak_tree_rss_mib'] for r in done):,.0f}",
                     f"{max(r['expert_phase_peak_tree_rss_mib'] for r in done):,.0f}"])
        full_rows.append([workers, f"{full['seconds'] / 60:,.1f}", full["mb_per_s"],
                          *(f"{mb / 1e3:,.1f}" for mb in full["expert_mb"].values()),
                          f"{full['backbone_mb'] / 1e3:,.2f}"])
        typical["extrapolated"] = full
    show(f"dymoe export of {source_mb:,.0f} MB: Qwen3-30B-A3B shapes, {args.layers} of 48 layers, {args.quantizer}, "
         f"{args.precisions}", ["workers", "s", "MB/s", "CPU s", "load", "backbone s", "expert MB/s",
                                "peak RSS MiB", "tree MiB", "experts' tree MiB"], rows)
    precisions = list(runs[0]["expert_bytes"])
    show(f"extrapolated to all {FULL_LAYERS} layers ({full['source_mb'] / 1e3:,.1f} GB of source)",
         ["workers", "minutes", "MB/s", *(f"{p} GB" for p in precisions), "backbone GB"], full_rows)
    r0 = runs[0]
    show("this bundle per precision, and the mean errors the manifest records",
         ["precision", "MB", "weight error", "output error"],
         [[p, f"{r0['expert_bytes'][p] / 1e6:,.1f}", f"{r0['mean_errors'][p]['weight_rel_error']:.6f}",
           f"{r0['mean_errors'][p]['output_rel_error']:.6f}"] for p in precisions]
         + [["backbone", f"{r0['backbone_bytes'] / 1e6:,.1f}", "", ""]])
    profile = {}
    if args.profile:
        profile = {"experts": profile_experts(src, args.profile, tuple(args.precisions.split(",")), args.quantizer),
                   "backbone": profile_backbone(src)}
    write_json("export_qwen3_30b_shape", {"source": str(src), "layers": args.layers, "source_split_bytes": split,
                                          "precisions": args.precisions, "quantizer": args.quantizer,
                                          "export_args": args.export_args, "runs": runs, "profile": profile})


if __name__ == "__main__":
    main()
