"""Tables people compare, for the terminal (rich lives only in the CLI layer)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(v, scale=1.0, digits=1) -> str:
    return "-" if v is None else f"{v * scale:,.{digits}f}"


def print_tables(result: dict, console: Console) -> None:
    opts = result["options"]
    storage = f"io {opts['io']}" + (f", emulated {opts['storage_profile']}" if opts["storage_profile"] else "")
    for entry in result["results"]:
        for phase, title in (("policies", "cold cache (first prompt after start-up)"),
                             ("warm", "warm cache (the next prompt in the same session)")):
            if phase not in entry:
                continue
            t = Table(title=f"budget {entry['budget']} of {opts['full_precision']} experts, {storage}, {title}; "
                            f"medians of {opts['repeats']} x {len(opts['prompt_tokens'])} runs")
            rows = entry[phase]
            bases = [b for b in ("ondemand", "lru") if b in rows]
            cols = ["policy", "TTFT ms", "TPOT ms", "stall/tok ms", "MiB read/tok", "hit rate", "prefetch recall",
                    "peak RSS MiB", *[f"{m} x {b}" for b in bases for m in ("TTFT", "TPOT")], "perplexity",
                    "top-1 agree"]
            for c in cols:
                t.add_column(c, justify="right")
            for name, r in rows.items():
                ratios = [_fmt(r.get(f"{k}_speedup_vs_{b}"), 1, 2) for b in bases for k in ("ttft_s", "tpot_s")]
                t.add_row(name, _fmt(r["ttft_s"], 1e3), _fmt(r["tpot_s"], 1e3), _fmt(r["stall_per_token_s"], 1e3),
                          _fmt(r["bytes_read_per_token"], 1 / 2**20, 2), _fmt(r["hit_rate"], 1, 2),
                          _fmt(r["prefetch_recall"], 1, 2), _fmt(r["peak_rss_bytes"], 1 / 2**20, 0), *ratios,
                          _fmt(r["perplexity"], 1, 3), _fmt(r["top1_agreement"], 1, 3))
            console.print(t)
    if result.get("reference"):
        ref = result["reference"]
        console.print(f"reference: {ref['precision']} all resident, perplexity {ref['perplexity']:.3f} "
                      f"on {ref['tokens']} tokens")
