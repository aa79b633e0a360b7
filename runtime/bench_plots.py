"""Plots of a ``dymoe bench`` result (matplotlib, headless; an optional extra: dymoe[report])."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .plotting import require_matplotlib, save_png


def write_plots(result: dict, folder: Path) -> list[Path]:
    plt = require_matplotlib()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    policies = result["options"]["policies"]
    markers = dict(zip(policies, "osD^v*P<>", strict=False))

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for entry in result["results"]:
        pts = [(r["tpot_s"] * 1e3, r["perplexity"], p) for p, r in entry["policies"].items()
               if r["perplexity"] is not None]
        if not pts:
            continue
        xs, ys, names = zip(*sorted(pts), strict=True)
        ax.plot(xs, ys, "-", color="0.7", lw=0.8, zorder=1)
        for x, y, name in zip(xs, ys, names, strict=True):
            ax.scatter(x, y, marker=markers[name], s=45, zorder=2, label=f"{name}" if entry is result["results"][0]
                       else None)
        ax.annotate(f"budget {entry['budget']}", (xs[-1], ys[-1]), fontsize=7, color="0.4",
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("time per output token (ms, median)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("speed vs accuracy (each policy a point, each budget a line)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, folder / "tpot_vs_perplexity.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.8 / len(result["results"])
    for i, entry in enumerate(result["results"]):
        vals = [entry["policies"][p]["ttft_s"] * 1e3 for p in policies]
        ax.bar([j + i * width for j in range(len(policies))], vals, width, label=f"budget {entry['budget']}")
    ax.set_xticks([j + width * (len(result["results"]) - 1) / 2 for j in range(len(policies))], policies,
                  rotation=20, fontsize=8)
    ax.set_ylabel("time to first token (ms, median)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("TTFT per policy")
    paths.append(_save(fig, folder / "ttft.png"))

    dymoe = [e for e in result["results"] if "dymoe" in e["policies"]]
    if dymoe:
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
        paths.append(_save(fig, folder / "precision_mix.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return save_png(fig, path)
