"""Where a decode step's time goes, all experts resident: embedding, each layer graph (attention,
routing, norms), the routed experts, the LM head, and what is left (Python: feeds, the combine,
sampling), with ORT calls per token; extrapolated to the model's full depth.

The bundle is any exported one; `make bench-decode-profile` uses the Qwen3-30B-A3B-shaped
2-layer bundle that `benchmarks/export_qwen3_30b_shape.py --keep` leaves in .cache/bench/, so the
figures are at that model's real shapes (hidden 2048, 128 experts of 768, top-8, vocabulary
151,936). ``--transformers`` also times transformers (torch, CPU, float32, eager) on the bundle's
source checkpoint, side by side.

    python benchmarks/decode_profile.py [BUNDLE] [--precision int4] [--tokens 32] [--repeats 3]
        [--full-layers 48] [--transformers SOURCE]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from _common import CACHE, hf_greedy_decode, med, show, write_json

DEFAULT = CACHE / "bundle_qwen3_30b_shape"  # export_qwen3_30b_shape.py --keep leaves it here


class Timed:
    """An ORT session whose ``run`` calls are timed into ``book[part]``."""

    def __init__(self, sess, book: dict, part: str) -> None:
        self._sess, self._book, self._part = sess, book, part

    def run(self, *a, **k):
        t = time.perf_counter()
        try:
            return self._sess.run(*a, **k)
        finally:
            self._book[self._part].append(time.perf_counter() - t)

    def __getattr__(self, name):
        return getattr(self._sess, name)


def profile(bundle: Path, precision: str, prompt: list[int], tokens: int, repeats: int, threads: int = 1) -> dict:
    from dymoe.runtime.bundle import Bundle
    from dymoe.runtime.experts import StaticExperts
    from dymoe.runtime.generate import generate
    from dymoe.runtime.model import MoEModel

    b = Bundle(bundle)
    experts = StaticExperts(b, precision, threads=threads)
    model = MoEModel(b, experts)
    book: dict[str, list[float]] = defaultdict(list)
    model.embed = Timed(model.embed, book, "embedding")
    model.head = Timed(model.head, book, "LM head")
    model.layers = [Timed(s, book, "layer graphs") for s in model.layers]
    inner_run, inner_forward = experts.run, experts.sessions.forward
    expert_calls: list[int] = []

    def run(step):  # the whole expert step as the token loop waits for it (threads, combine included)
        t = time.perf_counter()
        try:
            return inner_run(step)
        finally:
            book["experts"].append(time.perf_counter() - t)

    def forward(layer, e, p, x):
        expert_calls.append(1)  # list.append is atomic: safe from the expert threads
        return inner_forward(layer, e, p, x)

    experts.run, experts.sessions.forward = run, forward
    model.experts = experts
    generate(model, prompt, 4)  # warm-up
    per_token: list[dict[str, float]] = []
    for _ in range(repeats):
        book.clear()
        expert_calls.clear()
        generate(model, prompt, 1)  # the prompt alone, to subtract
        pre = {k: (sum(v), len(v)) for k, v in book.items()}
        pre_calls = len(expert_calls) + sum(len(v) for k, v in book.items() if k != "experts")
        book.clear()
        expert_calls.clear()
        r = generate(model, prompt, tokens + 1)
        steps = len(r.token_ids) - 1
        parts = {k: (sum(v) - pre.get(k, (0, 0))[0]) / steps for k, v in book.items()}
        calls = (len(expert_calls) + sum(len(v) for k, v in book.items() if k != "experts") - pre_calls) / steps
        total = r.tpot_s
        per_token.append({**parts, "python and glue": total - sum(parts.values()), "total": total, "calls": calls})
    experts.close()
    keys = per_token[0].keys()
    out = {k: med([p[k] for p in per_token]) for k in keys}
    out["layers"] = b.spec.num_layers
    out["moe_layers"] = len(b.spec.moe_layers)
    out["top_k"] = b.spec.top_k
    return out


def extrapolate(p: dict, full_layers: int) -> dict:
    """Per-layer parts (layer graphs, experts, Python per layer) scale with depth; embedding and head do not."""
    scale = full_layers / p["layers"]
    glue_per_layer = p["python and glue"]  # nearly all of it is per layer and per expert
    parts = {"embedding": p.get("embedding", 0.0), "LM head": p.get("LM head", 0.0),
             "layer graphs": p.get("layer graphs", 0.0) * scale, "experts": p.get("experts", 0.0) * scale,
             "python and glue": glue_per_layer * scale}
    return {**parts, "total": sum(parts.values()),
            "calls": 2 + (p["calls"] - 2) * scale}


def transformers_decode(source: Path, prompt: list[int], tokens: int, repeats: int) -> float:
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    hf_greedy_decode(model, prompt, tokens + 1)  # warm-up
    return med([hf_greedy_decode(model, prompt, tokens + 1)[0] for _ in range(repeats)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2", help="expert threads to compare (comma list)")
    ap.add_argument("--full-layers", type=int, default=48, help="depth to extrapolate to (Qwen3-30B-A3B: 48)")
    ap.add_argument("--transformers", type=Path, default=None, metavar="SOURCE",
                    help="also time transformers on this checkpoint (the bundle's source)")
    args = ap.parse_args()
    if not (args.bundle / "manifest.json").exists():
        raise SystemExit(f"no bundle at {args.bundle}: run benchmarks/export_qwen3_30b_shape.py --layers 2 "
                         "--workers 2 --keep first, or name a bundle")
    vocab = json.loads((args.bundle / "manifest.json").read_text())["model"]["vocab_size"]
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, vocab, args.prompt)]
    parts = ["embedding", "layer graphs", "experts", "LM head", "python and glue"]
    out = {"bundle": str(args.bundle), "precision": args.precision, "by_threads": {}}
    for threads in [int(t) for t in args.threads.split(",")]:
        p = profile(args.bundle, args.precision, prompt, args.tokens, args.repeats, threads)
        full = extrapolate(p, args.full_layers)
        show(f"decode step, every expert resident at {args.precision}, {threads} expert thread(s) "
             f"({args.bundle.name}; {p['layers']} layers measured, median of {args.repeats}; ms per token)",
             ["part", "measured ms", "share", f"extrapolated to {args.full_layers} layers ms", "share "],
             [[k, p.get(k, 0) * 1e3, p.get(k, 0) / p["total"], full[k] * 1e3, full[k] / full["total"]] for k in parts]
             + [["total", p["total"] * 1e3, 1.0, full["total"] * 1e3, 1.0],
                ["ORT calls per token", p["calls"], "", full["calls"], ""]])
        out["by_threads"][threads] = {"measured": p, f"extrapolated_{args.full_layers}": full}
    if args.transformers is not None:
        hf = transformers_decode(args.transformers, prompt, args.tokens, args.repeats)
        out["transformers_ms_per_token"] = hf * 1e3
        print(f"transformers float32 eager on the same {p['layers']}-layer model: {hf * 1e3:.1f} ms/token; "
              f"dymoe {args.precision}: {p['total'] * 1e3:.1f} ms/token ({hf / p['total']:.2f}x)")
    write_json("decode_profile", out)


if __name__ == "__main__":
    main()
