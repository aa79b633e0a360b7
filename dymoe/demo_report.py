"""What ``dymoe demo`` prints about its comparison: a table that fits 80 columns, and a
conclusion in plain words computed from the numbers the demo measured (never written in advance).

Everything here is a pure function of a ``run_bench`` result, so tests can feed it numbers that
point either way and check that the words follow them.
"""

from __future__ import annotations

from rich import box
from rich.table import Table


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:,.1f}"


def _runs(rows: dict, policy: str, key: str) -> list[float]:
    return [r[key] for r in rows[policy]["runs"] if r.get(key) is not None]


def speed_table(entry: dict, policies: list[str]) -> Table:
    """One row per policy and cache state: medians, with the TPOT range over the runs."""
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("policy", "cache", "TTFT ms", "TPOT ms", "TPOT range", "MiB read /token", "hit rate"):
        t.add_column(col, justify="left" if col in ("policy", "cache") else "right")
    for phase, label in (("policies", "cold"), ("warm", "warm")):
        rows = entry.get(phase)
        if not rows:
            continue
        for p in policies:
            r = rows[p]
            tpots = _runs(rows, p, "tpot_s")
            spread = f"{min(tpots) * 1e3:.1f}-{max(tpots) * 1e3:.1f}" if tpots else "-"
            t.add_row(p, label, _ms(r["ttft_s"]), _ms(r["tpot_s"]), spread,
                      f"{r['bytes_read_per_token'] / 2**20:.2f}", f"{r['hit_rate']:.2f}")
    return t


def paired_wins(rows: dict, fast: str, slow: str, key: str = "tpot_s") -> tuple[int, int]:
    """In how many runs ``fast`` beat ``slow`` on ``key``: runs are interleaved, so run i of
    each policy met the same prompt and the same moment of a shared machine."""
    a, b = _runs(rows, fast, key), _runs(rows, slow, key)
    pairs = list(zip(a, b, strict=False))
    return sum(x < y for x, y in pairs), len(pairs)


def conclusion(result: dict, experts_per_token: int | None = None, base: str = "lru", ours: str = "dymoe"
               ) -> list[str]:
    """Plain-words findings, one per line, from the measured medians and paired runs.
    ``experts_per_token``: experts one token runs over all layers (top-k x MoE layers)."""
    entry = result["results"][0]
    lines = []
    for phase, what in (("policies", "with a cold cache (a new session)"),
                        ("warm", "with a warm cache (the next prompt)")):
        rows = entry.get(phase)
        if not rows or base not in rows or ours not in rows:
            continue
        wins, n = paired_wins(rows, ours, base)
        b, o = rows[base]["tpot_s"], rows[ours]["tpot_s"]
        if not (b and o):
            continue
        # three runs in four one way is a finding; a split is not (a shared machine adds noise)
        if wins * 4 >= n * 3:
            count = f"all {n}" if wins == n else f"{wins} of {n}"
            verdict = f"{ours} was faster per token in {count} runs: {b / o:.1f}x ({_ms(o)} vs {_ms(b)} ms)"
        elif wins * 4 <= n:
            count = f"all {n}" if wins == 0 else f"{n - wins} of {n}"
            verdict = f"{ours} was slower per token in {count} runs: {o / b:.1f}x ({_ms(o)} vs {_ms(b)} ms)"
        else:
            verdict = (f"no clear winner per token: {ours} was faster in {wins} of {n} runs "
                       f"(medians {_ms(o)} vs {_ms(b)} ms)")
        lines.append(f"{what.capitalize()}, {verdict}.")
    rows = entry.get("warm") or entry["policies"]
    if base in rows and ours in rows:
        lines.append(_why(rows, base, ours, experts_per_token))
        lines.extend(_accuracy(result, rows, base, ours))
    return lines


def precision_shares(rows: dict, policy: str) -> dict[str, float]:
    """Share of expert calls run at each precision, over all of ``policy``'s runs and layers."""
    counts: dict[str, int] = {}
    for run in rows[policy]["runs"]:
        for mix in run.get("precision_mix", {}).values():
            for p, k in mix.items():
                counts[p] = counts.get(p, 0) + k
    total = sum(counts.values())
    return {p: k / total for p, k in sorted(counts.items(), key=lambda kv: -kv[1])} if total else {}


def _why(rows: dict, base: str, ours: str, experts_per_token: int | None) -> str:
    rb, ro = rows[base]["bytes_read_per_token"], rows[ours]["bytes_read_per_token"]
    hb, ho = rows[base]["hit_rate"], rows[ours]["hit_rate"]
    less = f"{rb / ro:.1f}x less" if ro and rb > ro else "no less"
    parts = [f"Why: {ours} read {less} from storage per token ({ro / 2**20:.2f} vs {rb / 2**20:.2f} MiB) and found "
             f"the expert it needed already resident {ho:.0%} of the time, against {hb:.0%} for {base}."]
    mine, theirs = precision_shares(rows, ours), precision_shares(rows, base)
    if mine and theirs:
        said = ", ".join(f"{share:.0%} at {p}" for p, share in mine.items())
        parts.append(f"It ran its experts {said}; {base} ran {', '.join(theirs)} only, so fewer fit the budget.")
    run = rows[base]["runs"][0]
    top = next(iter(theirs), None)
    if experts_per_token and top and top in run.get("resident_cost_bytes", {}):
        fit = run["budget_bytes"] // run["resident_cost_bytes"][top]
        if fit < experts_per_token and hb < 0.5:
            parts.append(f"The budget holds {fit} {top} experts and a token passes through {experts_per_token}, "
                         f"so {base} mostly evicts an expert before its next use.")
    recall = rows[ours].get("prefetch_recall")
    if recall:
        parts.append(f"Look-ahead prefetch had {recall:.0%} of the experts each layer used on their way early.")
    return " ".join(parts)


def _accuracy(result: dict, rows: dict, base: str, ours: str) -> list[str]:
    ref = result.get("reference")
    pb, po = rows[base].get("perplexity"), rows[ours].get("perplexity")
    if not ref or pb is None or po is None:
        return []
    ab, ao = rows[base].get("top1_agreement"), rows[ours].get("top1_agreement")
    change = (po - pb) / pb
    line = (f"Accuracy: held-out perplexity {po:.2f} for {ours} vs {pb:.2f} for {base} ({change:+.1%}), "
            f"over {ref['tokens']} tokens; the next-token guess agreed with the {ref['precision']} "
            f"reference {ao:.0%} of the time for {ours} and {ab:.0%} for {base}.")
    return [line, "That is a small sample: `dymoe eval BUNDLE --policy dymoe --budget ...` scores all of the "
                  "held-out text."]


def medians_note(result: dict) -> str:
    opts = result["options"]
    n = opts["repeats"] * len(opts["prompt_tokens"])
    return (f"Medians of {n} runs per policy ({opts['repeats']} rounds x {len(opts['prompt_tokens'])} prompts, "
            f"interleaved, {opts['new_tokens']} new tokens each); each run starts a fresh session.")


def bullets(lines: list[str]) -> Table:
    """Lines as a list with a hanging indent, wrapped at word boundaries to the terminal."""
    t = Table.grid(padding=(0, 1))
    t.add_column(no_wrap=True)
    t.add_column()
    for line in lines:
        t.add_row("-", line)
    return t
