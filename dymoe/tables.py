"""Tables people compare, for the terminal (rich lives only in the CLI layer).

A bench result is shown as two narrow tables per budget and cache state, speed and then where
the time went with accuracy, so that each fits 80 columns with its headers unabridged."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table


def _fmt(v, scale=1.0, digits=1) -> str:
    return "-" if v is None else f"{v * scale:,.{digits}f}"


def _table(title: str, cols: list[str], rows: list[list[str]]) -> Table:
    """Each column exactly as wide as its widest cell or header word: headers wrap between words,
    nothing is cut, and the table is as narrow as its numbers allow."""
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title_justify="left")
    for i, c in enumerate(cols):
        width = max([*(len(w) for w in c.split()), *(len(r[i]) for r in rows)])
        t.add_column(c, justify="left" if i == 0 else "right", width=width, no_wrap=i == 0)
    for r in rows:
        t.add_row(*r)
    return t


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def runs_note(opts: dict) -> str:
    prompts = len(opts["prompt_tokens"])
    return (f"medians of {_count(opts['repeats'] * prompts, 'run')} ({_count(opts['repeats'], 'round')} x "
            f"{_count(prompts, 'prompt')})")


def print_tables(result: dict, console: Console) -> None:
    opts = result["options"]
    storage = f"io {opts['io']}" + (f", emulated {opts['storage_profile']}" if opts["storage_profile"] else "")
    for entry in result["results"]:
        for phase, title in (("policies", "cold cache (first prompt of a session)"),
                             ("warm", "warm cache (the next prompt in the same session)")):
            if phase not in entry:
                continue
            rows = entry[phase]
            bases = [b for b in ("ondemand", "lru") if b in rows]
            speed, where = [], []
            for name, r in rows.items():
                ratios = [_fmt(r.get(f"{k}_speedup_vs_{b}"), 1, 2) for b in bases for k in ("ttft_s", "tpot_s")]
                speed.append([name, _fmt(r["ttft_s"], 1e3), _fmt(r["tpot_s"], 1e3),
                              _fmt(r["stall_per_token_s"], 1e3), *ratios])
                where.append([name, _fmt(r["bytes_read_per_token"], 1 / 2**20, 2), _fmt(r["hit_rate"], 1, 2),
                              _fmt(r["prefetch_recall"], 1, 2), _fmt(r["peak_rss_bytes"], 1 / 2**20, 0),
                              _fmt(r["perplexity"], 1, 3), _fmt(r["top1_agreement"], 1, 3)])
            speed = _table(f"budget {entry['budget']}, {title}: speed, {runs_note(opts)}",
                           ["policy", "TTFT ms", "TPOT ms", "stall /token ms",
                            *[f"{m} x {b}" for b in bases for m in ("TTFT", "TPOT")]], speed)
            where = _table(f"budget {entry['budget']}, {title}: memory and accuracy",
                           ["policy", "MiB read /token", "hit rate", "prefetch recall", "peak RSS MiB",
                            "perplexity", "top-1 agree"], where)
            console.print(speed)
            console.print()
            console.print(where)
            console.print()
    console.print(f"{storage}; budgets are shares of what every {opts['full_precision']} expert costs resident "
                  "(measured); x columns: speed-up over that baseline (higher is better)", soft_wrap=False,
                  highlight=False)
    if result.get("reference"):
        ref = result["reference"]
        console.print(f"reference: {ref['precision']} all resident, perplexity {ref['perplexity']:.3f} "
                      f"on {ref['tokens']} tokens", highlight=False)
