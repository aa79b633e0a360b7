"""The backbone of a Qwen3-30B-A3B-shaped model at each ``--backbone-precision``, and the memory plan
of the whole model on a 16 GB device.

Qwen3-30B-A3B: 48 layers of 128 experts (top-8), hidden 2048, expert intermediate 768, 32 query heads
and 4 KV heads of 128, vocabulary 151,936, untied embeddings, context 40,960. A synthetic checkpoint
holds 2 of its 48 layers with every tensor at its real shape (seeded Gaussian values: sizes and
speed do not depend on them). It is exported at each backbone precision; the embedding, LM head,
layer and router graphs are measured (bytes, resident memory of their ONNX Runtime sessions in a
fresh process, one decode step) and the layers are extrapolated to 48. In fp32 the embedding and the
head (1.24 GB each) go through ONNX external data. The plan is ``dymoe info --plan``'s, for a
48-layer manifest made from the 2-layer one (``runtime/plan.py``).

    python benchmarks/backbone_size.py [--quantizer rtn|hqq] [--memory 16GB]

Prints tables and writes results/backbone_size.json.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import time
from pathlib import Path

from _backbone import measure_in_fresh_process
from _common import CACHE, show, write_json
from rich.console import Console

LAYERS, FULL_LAYERS = 2, 48
SHAPE = dict(hidden=2048, intermediate=768, experts=128, top_k=8, layers=LAYERS, heads=32, kv_heads=4, head_dim=128,
             vocab=151_936, model_type="qwen3_moe", max_position_embeddings=40_960)
LADDER = ("fp16", "int8", "int4", "int2")  # the export's default expert precisions, for the plan


def checkpoint() -> Path:
    from dymoe.toolchain.synthetic import write_synthetic_checkpoint

    folder = CACHE / "qwen3-30b-a3b-2layers"
    if not (folder / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        write_synthetic_checkpoint(folder, **SHAPE)
    return folder


def full_model(m):
    """A manifest of all 48 layers from the 2-layer one: layer and router graphs, and experts, repeat."""
    from dymoe.bundle.manifest import ExpertEntry

    m = copy.deepcopy(m)
    bb, n = m.backbone, FULL_LAYERS
    for kind in ("layers", "routers"):
        listed = getattr(bb, kind)
        names = [f"{listed[i % LAYERS]}#{i}" for i in range(n)]
        for i, name in enumerate(names):
            m.files[name] = m.files[listed[i % LAYERS]]
        setattr(bb, kind, names)
    one_layer = m.experts[:m.model.num_experts]
    m.experts = [ExpertEntry(layer, e.expert, e.variants) for layer in range(n) for e in one_layer]
    m.model.num_layers, m.model.moe_layers = n, list(range(n))
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantizer", default="rtn", help="rtn is faster; sizes do not depend on the quantizer")
    ap.add_argument("--memory", default="16GB")
    a = ap.parse_args()
    from dymoe.plan_table import print_plan, size
    from dymoe.runtime.device_memory import backbone_bytes, device_costs
    from dymoe.runtime.execution import execution_target
    from dymoe.runtime.plan import facts_of, make_plan, parse_memory
    from dymoe.toolchain.export import ExportOptions, export

    src = checkpoint()
    rows, results, manifests = [], [], {}
    for backbone in ("fp32", "fp16", "int8", "int4"):
        out = CACHE / "qwen3-backbone" / backbone
        experts = LADDER if backbone == "int8" else ("int4",)
        t0 = time.perf_counter()
        m = export(str(src), out, ExportOptions(precisions=experts, quantizer=a.quantizer, backbone_precision=backbone,
                                                force=True))
        export_s = time.perf_counter() - t0
        manifests[backbone] = m
        bb = m.backbone

        def on_disk(rel):
            return m.files[rel].bytes + sum(m.files[d].bytes for d in bb.external_data.get(rel, ()))  # noqa: B023

        cost = measure_in_fresh_process(out, context=128, reps=10)
        layer = sum(on_disk(r) for r in bb.layers) / LAYERS
        router = sum(on_disk(r) for r in bb.routers) / LAYERS
        vocab = on_disk(bb.embed) + on_disk(bb.head)
        step_layer = sum(cost["step_ms"][r] for r in bb.layers) / LAYERS
        r = {"backbone": backbone, "embedding": bb.embedding, "lm_head": bb.lm_head,
             "embed_bytes": on_disk(bb.embed), "head_bytes": on_disk(bb.head), "layer_bytes": layer,
             "router_bytes": router, "external_data": sorted(bb.external_data),
             "disk_bytes_48": vocab + FULL_LAYERS * (layer + router),
             "resident_estimate_bytes_48": backbone_bytes(full_model(m)),
             "resident_rss_bytes_48": cost["rss_bytes"]["vocab"] + FULL_LAYERS / LAYERS * cost["rss_bytes"]["layers"],
             "decode_step_ms_48": cost["step_ms"][bb.embed] + cost["step_ms"][bb.head] + FULL_LAYERS * step_layer,
             "head_step_ms": cost["step_ms"][bb.head], "layer_step_ms": step_layer, "export_s": export_s}
        results.append(r)
        rows.append([backbone, f"{bb.embedding}/{bb.lm_head}", size(r["embed_bytes"]), size(r["head_bytes"]),
                     size(layer), size(r["disk_bytes_48"]), size(r["resident_estimate_bytes_48"]),
                     size(r["resident_rss_bytes_48"]), f"{r['head_step_ms']:.1f}", f"{step_layer:.2f}",
                     f"{r['decode_step_ms_48']:.0f}", ", ".join(p.split("/")[-1] for p in r["external_data"]) or "-"])
    show(f"Qwen3-30B-A3B-shaped backbone ({LAYERS} of {FULL_LAYERS} layers measured, extrapolated; {a.quantizer})",
         ["backbone", "embed/head", "embedding", "LM head", "per layer", "48 layers on disk", "resident (estimate)",
          "resident (RSS)", "head step ms", "layer step ms", "decode step ms", "external data"], rows)

    memory = parse_memory(a.memory)
    plans = {}
    for backbone, m in manifests.items():
        if backbone != "int8":
            continue
        full = full_model(m)
        cpu = make_plan(facts_of(full), memory)
        print_plan(cpu, f"Qwen3-30B-A3B shape, {backbone} backbone", a.memory, None, Console())
        target = execution_target("cuda", "orin-nx-16gb", check=False)
        gpu = make_plan(facts_of(full, device_costs(full, target)), target.profile.usable_bytes,
                        storage_mb_per_s=target.profile.storage.read_mb_per_s)
        print_plan(gpu, f"Qwen3-30B-A3B shape, {backbone} backbone", None, target.profile, Console())
        plans[backbone] = {"cpu": cpu, "orin-nx-16gb": gpu}
    others = {b: backbone_bytes(full_model(m)) for b, m in manifests.items()}
    print("backbone resident estimate for the 48-layer model: "
          + ", ".join(f"{b} {size(n)}" for b, n in others.items()))
    write_json("backbone_size", {"shape": SHAPE, "full_layers": FULL_LAYERS, "quantizer": a.quantizer,
                                 "results": results,
                                 "plans": {b: {k: _plain(p) for k, p in v.items()} for b, v in plans.items()}})


def _plain(p) -> dict:
    import dataclasses

    d = dataclasses.asdict(p)
    d.pop("facts")
    return {**d, "backbone_bytes": p.facts.backbone_bytes}


if __name__ == "__main__":
    main()
