"""The demo's conclusion follows the numbers it is given, whichever way they point, and its table
fits 80 columns."""

from __future__ import annotations

from rich.console import Console

from dymoe.demo_report import conclusion, paired_wins, speed_table
from dymoe.tables import print_tables

MIB = 2**20


def _run(tpot: float, read: float, hits: float, mix: dict | None = None) -> dict:
    return {"tpot_s": tpot, "ttft_s": tpot * 4, "bytes_read_per_token": read, "hit_rate": hits,
            "budget_bytes": 3 * MIB, "resident_cost_bytes": {"fp16": MIB // 4, "int4": MIB // 16},
            "precision_mix": {"0": mix or {"fp16": 10}}}


def _row(runs: list[dict], ppl: float, agree: float = 1.0) -> dict:
    first = runs[0]
    return {"tpot_s": sorted(r["tpot_s"] for r in runs)[len(runs) // 2], "ttft_s": first["ttft_s"],
            "bytes_read_per_token": first["bytes_read_per_token"], "hit_rate": first["hit_rate"],
            "prefetch_recall": 0.8, "stall_per_token_s": 0.001, "peak_rss_bytes": 150 * MIB, "perplexity": ppl,
            "top1_agreement": agree, "runs": runs}


def _result(lru_tpots, dymoe_tpots) -> dict:
    lru = _row([_run(t, MIB, 0.0) for t in lru_tpots], 100.0)
    ours = _row([_run(t, MIB / 4, 0.75, {"int4": 6, "int2": 4}) for t in dymoe_tpots], 101.0, 0.9)
    rows = {"lru": lru, "dymoe": ours}
    return {"options": {"repeats": len(lru_tpots), "prompt_tokens": [7], "new_tokens": 16, "io": "direct",
                        "storage_profile": "orin-nano-nvme", "full_precision": "fp16", "policies": ["lru", "dymoe"]},
            "reference": {"precision": "fp32", "perplexity": 99.0, "tokens": 189},
            "results": [{"budget": "10%", "policies": rows, "warm": rows}]}


def test_a_clear_win_is_called_one():
    lines = conclusion(_result([0.030, 0.031, 0.029, 0.032], [0.020, 0.021, 0.019, 0.022]), 14)
    assert "dymoe was faster per token in all 4 runs: 1.5x" in lines[0]
    assert "4.0x less" in lines[2] and "75%" in lines[2] and "60% at int4, 40% at int2" in lines[2]
    assert "holds 12 fp16 experts and a token passes through 14" in lines[2]
    assert "+1.0%" in lines[3] and "189 tokens" in lines[3] and "90%" in lines[3]


def test_a_loss_is_called_a_loss():
    lines = conclusion(_result([0.020, 0.021, 0.019, 0.022], [0.030, 0.031, 0.029, 0.032]))
    assert "dymoe was slower per token in all 4 runs: 1.5x" in lines[0]


def test_a_split_is_no_finding():
    lines = conclusion(_result([0.020, 0.030, 0.020, 0.030], [0.025, 0.025, 0.025, 0.025]))
    assert "no clear winner" in lines[0] and "2 of 4 runs" in lines[0]


def test_paired_wins_compare_run_by_run():
    rows = _result([0.02, 0.04], [0.03, 0.03])["results"][0]["policies"]
    assert paired_wins(rows, "dymoe", "lru") == (1, 2)


def test_tables_fit_80_columns():
    result = _result([0.030, 0.031], [0.020, 0.021])
    for name in ("lru-prefetch", "static-int4"):  # the longest policy names
        result["results"][0]["policies"][name] = result["results"][0]["policies"]["lru"]
    console = Console(width=80, record=True)
    console.print(speed_table(result["results"][0], ["lru", "dymoe"]))
    print_tables(result, console)
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80
    assert "…" not in text  # nothing cut to an ellipsis
    assert "lru-prefetch" in text and "static-int4" in text and "medians of 2 runs" in text
