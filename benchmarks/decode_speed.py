"""Decode time per token: an all-resident dymoe bundle (int4 and fp32 experts) against
transformers eager (torch, CPU) on the same small random Qwen3-MoE model, measured side by side
in one run (interleaved repeats, medians).

    python benchmarks/decode_speed.py [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from _common import CACHE, hf_greedy_decode, med, show, spread, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch
    import transformers as tf
    from tiny_models import save_tokenizer

    from dymoe.runtime.bundle import Bundle
    from dymoe.runtime.experts import StaticExperts
    from dymoe.runtime.generate import generate
    from dymoe.runtime.model import MoEModel
    from dymoe.toolchain.export import export
    from dymoe.toolchain.options import ExportOptions

    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=2,
                            moe_intermediate_size=512, max_position_embeddings=512, norm_topk_prob=True,
                            bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    model = tf.Qwen3MoeForCausalLM(cfg).eval()
    root = CACHE / "decode_speed"
    shutil.rmtree(root, ignore_errors=True)
    model.save_pretrained(root / "src")
    save_tokenizer(root / "src")
    export(str(root / "src"), root / "bundle", ExportOptions(precisions=("fp32", "int4")))
    bundle = Bundle(root / "bundle")
    runners = {p: MoEModel(bundle, StaticExperts(bundle, p)) for p in ("fp32", "int4")}
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 4096, args.prompt)]
    threads = torch.get_num_threads()

    def hf_decode() -> tuple[float, list[int]]:
        return hf_greedy_decode(model, prompt, args.tokens)

    def dymoe_decode(p: str) -> tuple[float, list[int]]:
        r = generate(runners[p], prompt, args.tokens)
        return med(r.token_times_s), r.token_ids

    systems = {"transformers eager (fp32)": hf_decode, "dymoe fp32": lambda: dymoe_decode("fp32"),
               "dymoe int4": lambda: dymoe_decode("int4")}
    for fn in systems.values():  # warm-up
        fn()
    per: dict[str, list[float]] = {k: [] for k in systems}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.repeats):  # interleaved: A B C A B C ...
        for name, fn in systems.items():
            t, ids = fn()
            per[name].append(t)
            tokens[name] = ids
    base = med(per["transformers eager (fp32)"])
    rows = [[name, med(v) * 1e3, spread(v) * 1e3, base / med(v)] for name, v in per.items()]
    show(f"decode time per token ({args.tokens} tokens after a {args.prompt}-token prompt, "
         f"median of {args.repeats}; torch threads {threads})",
         ["system", "ms/token (median)", "spread ms", "speed-up vs transformers"], rows)
    same = tokens["dymoe fp32"] == tokens["transformers eager (fp32)"]
    print(f"dymoe fp32 tokens identical to transformers: {same}")
    write_json("decode_speed", {"config": cfg.to_dict(), "tokens": args.tokens, "prompt_tokens": args.prompt,
                                "torch_threads": threads,
                                "ms_per_token": {k: [x * 1e3 for x in v] for k, v in per.items()},
                                "ratio_transformers_over_dymoe_int4": base / med(per["dymoe int4"]),
                                "fp32_tokens_identical": same})


if __name__ == "__main__":
    main()
