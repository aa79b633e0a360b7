"""Plots of a ``dymoe bench`` result (matplotlib, headless; an optional extra: dymoe[report]).

Times are on linear axes from zero (a log axis makes a 9 % spread look large); every point is
labelled with its policy; the reference's perplexity and agreement are drawn as lines.

* ``front.png``: each policy's TPOT against its top-1 agreement with the reference, one point per
  budget joined in budget order: the speed/accuracy front each policy reaches (warm cache).
* ``tpot_vs_perplexity.png``: per budget, every policy as a labelled point (warm cache).
* ``ttft.png``: time to first token per policy, cold and warm cache side by side, per budget.
* ``precision_mix.png``: which precisions ``dymoe`` ran, per layer.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .plotting import require_matplotlib, save_png

MARKERS = "osD^v*P<>X"


def _phase(entry: dict) -> dict:
    """The warm-cache rows when measured (older results have only cold ones)."""
    return entry.get("warm") or entry["policies"]


def write_plots(result: dict, folder: Path) -> list[Path]:
    plt = require_matplotlib()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    policies = result["options"]["policies"]
    markers = dict(zip(policies, MARKERS, strict=False))
    entries = result["results"]
    return [p for p in (_front(plt, entries, policies, markers, folder),
                        _perplexity(plt, result, entries, policies, markers, folder),
                        _ttft(plt, entries, policies, folder),
                        _mix(plt, entries, folder)) if p is not None]


def _front(plt, entries, policies, markers, folder):
    pts = {p: [(_phase(e)[p]["tpot_s"] * 1e3, _phase(e)[p]["top1_agreement"], e["budget"]) for e in entries
               if _phase(e)[p].get("top1_agreement") is not None and _phase(e)[p].get("tpot_s")] for p in policies}
    if not any(pts.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for p in policies:
        if not pts[p]:
            continue
        xs, ys, budgets = zip(*pts[p], strict=True)
        line, = ax.plot(xs, ys, "-", marker=markers[p], ms=6, lw=1.2 if p == "dymoe" else 0.8, label=p)
        for x, y, b in zip(xs, ys, budgets, strict=True):
            ax.annotate(b, (x, y), fontsize=7, color=line.get_color(), xytext=(4, -9), textcoords="offset points")
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.annotate("reference (full precision, all resident)", (0, 1.0), fontsize=7, color="0.4",
                xytext=(4, 3), textcoords="offset points")
    ax.set_xlim(left=0)
    ax.set_xlabel("time per output token, warm cache (ms, median)")
    ax.set_ylabel("top-1 agreement with the reference")
    ax.set_title("speed vs accuracy per policy; each point a budget (up and left is better)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, folder / "front.png")


def _perplexity(plt, result, entries, policies, markers, folder):
    if not any(r.get("perplexity") is not None for e in entries for r in _phase(e).values()):
        return None
    fig, axes = plt.subplots(1, len(entries), figsize=(4.2 * len(entries), 4), squeeze=False, sharey=True)
    for ax, entry in zip(axes[0], entries, strict=True):
        for p in policies:
            r = _phase(entry)[p]
            if r.get("perplexity") is None:
                continue
            x = r["tpot_s"] * 1e3
            ax.scatter(x, r["perplexity"], marker=markers[p], s=45, zorder=2)
            ax.annotate(p, (x, r["perplexity"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if result.get("reference"):
            ax.axhline(result["reference"]["perplexity"], color="0.5", lw=0.8, ls="--")
        ax.set_xlim(left=0)
        ax.set_title(f"budget {entry['budget']}", fontsize=9)
        ax.set_xlabel("TPOT, warm cache (ms)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out perplexity (dashed: reference)")
    return _save(fig, folder / "tpot_vs_perplexity.png")


def _ttft(plt, entries, policies, folder):
    fig, axes = plt.subplots(1, len(entries), figsize=(4.2 * len(entries), 4), squeeze=False, sharey=True)
    for ax, entry in zip(axes[0], entries, strict=True):
        xs = range(len(policies))
        cold = [entry["policies"][p]["ttft_s"] * 1e3 for p in policies]
        ax.bar([x - 0.2 for x in xs], cold, 0.4, label="cold cache")
        if entry.get("warm"):
            ax.bar([x + 0.2 for x in xs], [entry["warm"][p]["ttft_s"] * 1e3 for p in policies], 0.4,
                   label="warm cache")
        ax.set_xticks(list(xs), policies, rotation=30, fontsize=8, ha="right")
        ax.set_ylim(bottom=0)
        ax.set_title(f"budget {entry['budget']}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("time to first token (ms, median)")
    axes[0][0].legend(fontsize=8)
    return _save(fig, folder / "ttft.png")


def _mix(plt, entries, folder):
    dymoe = [e for e in entries if "dymoe" in e["policies"]]
    if not dymoe:
        return None
    mix: dict[int, Counter] = {}
    for run in dymoe[0]["policies"]["dymoe"]["runs"]:
        for layer, counts in run.get("precision_mix", {}).items():
            mix.setdefault(int(layer), Counter()).update(counts)
    precs = [p for p in ("fp32", "fp16", "int8", "int4", "int2", "skip") if any(p in c for c in mix.values())]
    layers = sorted(mix)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bottom = [0.0] * len(layers)
    for p in precs:
        share = [mix[layer][p] / max(sum(mix[layer].values()), 1) for layer in layers]
        ax.bar(layers, share, bottom=bottom, label=p)
        bottom = [b + s for b, s in zip(bottom, share, strict=True)]
    ax.set_xlabel("layer")
    ax.set_ylabel("share of expert runs")
    ax.set_title(f"dymoe precision mix per layer (budget {dymoe[0]['budget']})")
    ax.legend(fontsize=8)
    return _save(fig, folder / "precision_mix.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return save_png(fig, path)
