"""Policies side by side (dymoe run's runtime): TTFT, TPOT, stall, bytes read, hit rate,
prefetch recall and held-out perplexity, on the demo model and on a synthetic model with
realistic expert sizes, under a budget of 25 % of the fp16 experts, --io direct and an
emulated Jetson Orin Nano NVMe.

    python benchmarks/runtime_policies.py --model demo|synthetic [--repeats 3] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import CACHE, ROOT, show, write_json

from dymoe.runtime.compare import compare
from dymoe.runtime.session import PolicyRun
from dymoe.runtime.tokenizer import TextTokenizer
from dymoe.toolchain.export import ExportOptions, export
from dymoe.toolchain.synthetic import write_synthetic_checkpoint

POLICIES = "ondemand,lru,lru-prefetch,static-int4,static-int2,dymoe"


def bundle_for(model: str) -> tuple[Path, Path | None]:
    """(bundle, held-out text or None); exported once into .cache/bench."""
    if model == "demo":
        src, heldout = ROOT / "models" / "demo", ROOT / "models" / "demo" / "heldout.txt"
    else:
        src, heldout = CACHE / "synthetic_h2048_i1024_e64_k8_l4", None
        if not (src / "config.json").exists():
            write_synthetic_checkpoint(src, hidden=2048, intermediate=1024, experts=64, top_k=8, layers=4,
                                       heads=16, kv_heads=4, vocab=8192)
    out = CACHE / f"bundle_{model}_policies"
    if not (out / "manifest.json").exists():
        export(str(src), out, ExportOptions(precisions=("fp32", "fp16", "int8", "int4", "int2"), workers=2))
    return out, heldout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("demo", "synthetic"), default="demo")
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--io", default="direct")
    ap.add_argument("--storage-profile", default="orin-nano-nvme")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--extra", action="append", default=[],
                    help="NAME:key=value,... an extra dymoe variant, e.g. "
                         "dymoe-lower:serve_lower_while_promoting=true")
    args = ap.parse_args()

    bundle, heldout = bundle_for(args.model)
    tok = TextTokenizer(bundle / "tokenizer" / "tokenizer.json")
    if heldout:
        ids = tok.encode(heldout.read_text())
        prompts = [ids[i * 500: i * 500 + args.prompt_tokens] for i in range(2)]
        ppl_ids = ids[2000:]
    else:
        prompts = [[(7 * i + 3 * j) % 8000 + 1 for j in range(args.prompt_tokens)] for i in range(2)]
        ppl_ids = None
    base = PolicyRun("lru", args.budget, io=args.io, storage_profile=args.storage_profile, full_precision="fp16")
    policies = args.policies.split(",")
    results = compare(bundle, policies, base, prompts, args.new_tokens, args.repeats, ppl_ids=ppl_ids,
                      ppl_windows=args.ppl_windows, on_run=lambda p: print(".", end="", flush=True, file=sys.stderr))
    summary = results.summary()
    rows = []
    for p, r in summary.items():
        rows.append([p, r["ttft_s"] * 1e3, r["tpot_s"] * 1e3, r["stall_per_token_s"] * 1e3,
                     r["bytes_read_per_token"] / 2**20, r["hit_rate"],
                     "-" if r["prefetch_recall"] is None else f"{r['prefetch_recall']:.2f}",
                     r["ttft_s_speedup_vs_ondemand"], r["tpot_s_speedup_vs_ondemand"], r["tpot_s_speedup_vs_lru"],
                     "-" if r["perplexity"] is None else f"{r['perplexity']:.3f}"])
    show(f"{args.model}: budget {args.budget} of fp16 experts, io {args.io}, emulated {args.storage_profile} "
         f"(medians of {args.repeats} x {len(prompts)} runs, {args.new_tokens} new tokens)",
         ["policy", "TTFT ms", "TPOT ms", "stall/tok ms", "MiB read/tok", "hit rate", "prefetch recall",
          "TTFT x vs ondemand", "TPOT x vs ondemand", "TPOT x vs lru", "perplexity"], rows)
    for name, value in results.perplexity.items():
        if name not in summary:
            print(f"{name}: perplexity {value:.3f}")
    write_json(f"runtime_policies_{args.model}", {"args": vars(args), "summary": summary, "runs": results.runs,
                                                   "perplexity": results.perplexity,
                                                   "top1_agreement": results.top1_agreement})


if __name__ == "__main__":
    main()
