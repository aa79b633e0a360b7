"""What each part of the `dymoe` preset buys: the preset against itself with one part switched off
(look-ahead prefetch, reuse-distance eviction, home precisions fitted to the budget, the lower copy
serving while a promotion loads) and against static-int4, side by side on the widened demo bundle
of `benchmarks/runtime_policies.py`, --io direct and the emulated Orin Nano NVMe. Each run opens a
fresh session (cold cache) and generates twice (the second prompt is the warm one); runs are
interleaved (A B C ... A B C) and the table gives medians.

    python benchmarks/dymoe_ablation.py [--budget 25%] [--repeats 5]
"""

from __future__ import annotations

import argparse

from _common import med, show, write_json
from runtime_policies import bundle_for

VARIANTS = {
    "dymoe": ("dymoe", {}),
    "- prefetch": ("dymoe", {"prefetch": 0}),
    "- reuse eviction (lru)": ("dymoe", {"eviction": "lru"}),
    "- fitted homes": ("dymoe", {"fit_precisions": False}),
    "- lower copy serves": ("dymoe", {"serve_lower_while_promoting": False}),
    "static-int4": ("static-int4", {}),
}
PROMPTS = (list(range(100, 132)), list(range(300, 332)))


def one_run(bundle, policy: str, overrides: dict, budget: str, profile: str, tokens: int) -> list[dict]:
    from dymoe.runtime.model_session import open_model
    from dymoe.runtime.policy_config import PolicyRun

    s = open_model(bundle, policy=PolicyRun(policy, budget, io="direct", storage_profile=profile,
                                            full_precision="fp16", overrides=overrides))
    try:
        out = []
        for ids in PROMPTS:  # cold, then warm
            r = s.generate_ids(ids, max_new_tokens=tokens)
            m = s.metrics(r)
            out.append({"ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "bytes_read_per_token": m["bytes_read_per_token"],
                        "hit_rate": m["hit_rate"]})
        return out
    finally:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--storage-profile", default="orin-nano-nvme")
    args = ap.parse_args()
    bundle, _ = bundle_for("widened")
    runs: dict[str, list[list[dict]]] = {k: [] for k in VARIANTS}
    for policy, overrides in VARIANTS.values():  # warm-up (engine cache, page tables)
        one_run(bundle, policy, overrides, args.budget, args.storage_profile, 4)
    for _ in range(args.repeats):
        for name, (policy, overrides) in VARIANTS.items():
            runs[name].append(one_run(bundle, policy, overrides, args.budget, args.storage_profile, args.tokens))
    rows = []
    for name, rs in runs.items():
        cold, warm = [r[0] for r in rs], [r[1] for r in rs]
        rows.append([name, med([r["ttft_s"] for r in cold]) * 1e3, med([r["tpot_s"] for r in cold]) * 1e3,
                     med([r["tpot_s"] for r in warm]) * 1e3, med([r["bytes_read_per_token"] for r in cold]) / 2**20,
                     med([r["hit_rate"] for r in cold])])
    show(f"the dymoe preset with one part off, budget {args.budget}, {bundle.name}, medians of {args.repeats} "
         "interleaved runs", ["variant", "TTFT cold ms", "TPOT cold ms", "TPOT warm ms", "MiB read/token cold",
                              "hit rate cold"], rows)
    write_json("dymoe_ablation", {"bundle": str(bundle), "budget": args.budget, "runs": runs})


if __name__ == "__main__":
    main()
