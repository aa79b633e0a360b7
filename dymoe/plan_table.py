"""The tables of ``dymoe info --plan``: how a device's memory is split, and what the expert budget holds
at each precision (rich lives only in the CLI layer; the plan itself is ``runtime/plan.py``)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from dymoe.runtime.plan import Plan
from dymoe.targets.devices import DeviceProfile


def size(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:,.1f} MiB"


def print_plan(p: Plan, what: str, memory: str | None, profile: DeviceProfile | None, console: Console) -> None:
    """``memory``: the size as the user gave it (None: the profile's usable memory)."""
    f = p.facts
    mem = f"{memory} = {size(p.memory)}" if memory is not None else f"{size(p.memory)} usable on {profile.name}"
    costs = f"{profile.name}, GPU costs" if profile else "CPU costs"
    facts = Table(show_header=False, box=None, title=f"plan for {what} ({costs})")
    for k, v in [
        ("memory", mem),
        (f"backbone ({f.backbone_precision}, resident)", size(f.backbone_bytes)),
        (f"KV cache ({p.context:,} tokens, float32)", size(p.kv_bytes)),
        ("runtime reserve", size(p.reserve)),
        ("expert budget", size(p.expert_budget) if p.expert_budget >= 0 else f"none ({size(-p.expert_budget)} short)"),
    ]:
        facts.add_row(f"[bold]{k}[/]", v)
    console.print(facts)
    speed = profile.storage.read_mb_per_s if profile else None
    table = Table(title=f"experts in the budget ({f.experts:,} in all; a token uses top-{f.top_k} in each of "
                        f"{f.moe_layers} MoE layers)")
    for col in ["precision", "per expert", "experts that fit", "share", "read per token",
                *(["read ms per token"] if speed else [])]:
        table.add_column(col, justify="right")
    for r in p.rows:
        ms = [f"{r.read_ms_per_token:,.1f}"] if speed else []
        table.add_row(r.precision, size(r.expert_bytes), f"{r.experts_fit:,}", f"{r.share:.0%}",
                      size(r.read_per_token), *ms)
    console.print(table)
    at = f" at {speed:,.0f} MB/s" if speed else ""
    console.print("read per token assumes uniform routing: a cache holding a share h of the experts hits with "
                  f"probability h, so each token reads (1 - h) x top-k x MoE layers experts{at}; skewed routing "
                  "reads less (dymoe bench measures it)")
