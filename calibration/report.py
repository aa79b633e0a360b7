"""The calibration report: PNG plots and a Markdown summary, rebuilt from calibration.json alone.

Needs matplotlib, drawn with the non-interactive Agg backend and imported only here: the
statistics (and the runtime reading calibration.json) never need it.
"""

from __future__ import annotations

from pathlib import Path

from dymoe.bundle.calibration import Calibration
from dymoe.bundle.errors import InputError
from dymoe.bundle.fsutil import atomic_write_text, check_output_dir
from dymoe.bundle.precisions import SKIP
from dymoe.runtime.plotting import require_matplotlib, save_png

FIGURES = {
    "importance": "importance_heatmap.png",
    "skew": "skew_by_depth.png",
    "sensitivity": "sensitivity_by_depth.png",
    "prediction": "prediction_recall.png",
    "schedule": "retention_schedule.png",
}
REPORT_MD = "report.md"


def check_report_folder(folder: Path) -> Path:
    """The report goes into a new or empty folder, or one holding an earlier report (its
    ``report.md``): never among someone else's files, whose names it might share."""
    folder = check_output_dir(folder, "--report")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / REPORT_MD).is_file():
        raise InputError(f"--report {folder} is not empty and holds no dymoe calibration report",
                         "choose a new or empty folder for the report")
    return folder


def write_report(cal: Calibration, folder: Path, seconds: dict[str, float] | None = None,
                 source: str = "calibration.json") -> list[Path]:
    """Write the PNGs and ``report.md`` into ``folder``; return the paths written."""
    plt = require_matplotlib()
    folder = check_report_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key, draw in (("importance", _importance), ("skew", _skew), ("sensitivity", _sensitivity),
                      ("prediction", _prediction), ("schedule", _schedule)):
        fig = draw(plt, cal)
        if fig is None:
            (folder / FIGURES[key]).unlink(missing_ok=True)  # no stale plot from an earlier run
            continue
        written.append(save_png(fig, folder / FIGURES[key], dpi=110))
    names = {p.name for p in written}
    atomic_write_text(folder / REPORT_MD, markdown(cal, seconds, names, source))
    written.append(folder / REPORT_MD)
    return written


# --- plots --------------------------------------------------------------------------------


def _importance(plt, cal: Calibration):
    import numpy as np

    grid = np.array([[e.gate_share for e in layer.experts] for layer in cal.importance])
    L, E = grid.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * E + 2), max(2.5, 0.35 * L + 1.2)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(E))
    ax.set_yticks(range(L))
    ax.tick_params(labelsize=7)
    ax.set_title(f"gate-mass share per expert (uniform = {1 / E:.3f})")
    fig.colorbar(im, ax=ax, label="share of the layer's gate mass")
    return fig


def _skew(plt, cal: Calibration):
    layers = [li.layer for li in cal.importance]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax.plot(layers, [li.skew.gini for li in cal.importance], "o-", label="Gini")
    ax.plot(layers, [li.skew.entropy for li in cal.importance], "s-", label="normalised entropy")
    top = f"top {cal.settings.top_share_fraction:.0%} share"
    ax.plot(layers, [li.skew.top_share for li in cal.importance], "^-", label=top)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_xticks(layers)
    ax.legend(fontsize=8)
    ax.set_title("skew of gate mass by depth")
    ax2.bar(layers, [li.skew.coverage_count for li in cal.importance], color="tab:gray")
    ax2.axhline(cal.bundle.num_experts * cal.settings.coverage_mass, ls=":", color="k", lw=1, label="if even")
    ax2.set_xlabel("layer")
    ax2.set_xticks(layers)
    ax2.set_ylabel("experts")
    ax2.set_title(f"experts covering {cal.settings.coverage_mass:.0%} of the gate mass")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _sensitivity(plt, cal: Calibration):
    if not cal.sensitivity:
        return None
    layers = list(range(cal.bundle.num_layers))
    panels = [(0.0, "every selected expert lowered")]
    cf = cal.settings.critical_fraction
    if 0 < cf < 1:
        panels.append((cf, f"non-critical only (top {cf:.0%} per token kept)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False, sharey=True)
    positive = [e.kl for e in cal.sensitivity.entries if e.kl > 0]
    floor = min(positive) if positive else 1e-9
    for ax, (r, title) in zip(axes[0], panels, strict=True):
        for mode in cal.settings.modes:
            ys = [(cal.entry(layer, mode, r).kl if cal.entry(layer, mode, r) else float("nan")) for layer in layers]
            ax.plot(layers, ys, "o-" if mode != SKIP else "x--", label=mode)
        ax.set_yscale("symlog", linthresh=floor)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean KL to reference (nats)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"depth sensitivity (reference {cal.settings.reference_precision})", fontsize=11)
    fig.tight_layout()
    return fig


def _prediction(plt, cal: Calibration):
    if not cal.prediction:
        return None
    k = cal.bundle.top_k
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for distance in (1, 2):
        for source, marker in (("router_input", "o"), ("attn_input", "s")):
            pts = [(p.layer, p.recall) for p in cal.prediction if (p.distance, p.source, p.k) == (distance, source, k)]
            if pts:
                ls = "-" if distance == 1 else ":"
                ax.plot(*zip(*pts, strict=True), marker=marker, ls=ls, label=f"from layer l-{distance}'s {source}")
    ax.axhline(k / cal.bundle.num_experts, color="gray", lw=0.8, ls="--", label="chance (k/E)")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("predicted layer l")
    ax.set_ylabel(f"recall@{k}")
    ax.set_xticks(range(1, cal.bundle.num_layers))
    ax.set_title(f"look-ahead routing prediction: layer l's router on an earlier state (top-{k})", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _schedule(plt, cal: Calibration):
    if not cal.schedule:
        return None
    from .schedule import effective_retention

    layers = list(range(cal.bundle.num_layers))
    k = cal.bundle.top_k
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(layers, cal.schedule.cosine, "--", color="0.3", label="cosine decay (the paper's r(l))")
    # what the runtime does with r(l): a whole number of a token's k experts stays high, so the
    # cosine's realised share is drawn as separate marks on the layers, not as a line of its own
    ax.plot(layers, [effective_retention(r, k) for r in cal.schedule.cosine], "s", mfc="none", color="0.3", ms=11,
            zorder=3, label=f"cosine as run: whole experts of the top-{k} kept high")
    lowest = [m for m in cal.settings.modes if m != SKIP][-1:] + [m for m in cal.settings.modes if m == SKIP]
    for mode in lowest:  # the runtime's configurations: critical high, the rest lowest or skipped
        ax.plot(layers, cal.schedule.recommended[mode], "o-", label=f"recommended (the rest at {mode})")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("layer (shallow to deep)")
    ax.set_xticks(layers)
    ax.set_ylabel("share of a token's experts\nkept at high precision")
    ax.set_title(f"retention r(l) per layer for a mean-KL budget of {cal.schedule.target_kl:g}", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return fig


# --- markdown -----------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _g(x: float | None, fmt: str = ".3g") -> str:
    return "—" if x is None else format(x, fmt)


def markdown(cal: Calibration, seconds: dict[str, float] | None, figures: set[str], source: str) -> str:
    s, b = cal.settings, cal.bundle
    out = [f"# Calibration report: {b.model_type}, {b.num_layers} layers x {b.num_experts} experts (top-{b.top_k})\n",
           f"From `{source}` (schema {cal.schema_version}, dymoe {cal.dymoe_version}).\n",
           f"- data: {', '.join(f'`{d.name}`' for d in s.data)}: {s.data_tokens} tokens, "
           f"{s.samples} windows of {s.seq_len} tokens (of {s.windows_available}), seed {s.seed}"
           + (f"; sensitivity reruns {s.sensitivity_samples} of them" if s.sensitivity_samples else ""),
           f"- reference precision {s.reference_precision}; lowered: {', '.join(s.modes) or 'none (sensitivity off)'}",
           f"- heavy hitters: top {s.heavy_hitter_fraction:.0%} of each window by accumulated attention; "
           f"critical experts: top {s.critical_fraction:.0%} per token by gate score"]
    if seconds:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
        out.append(f"- calibration took {sum(seconds.values()):.1f} s ({parts})")
    out.append("")

    out.append("## Importance and skew\n")
    if "importance_heatmap.png" in figures:
        out.append("![importance](importance_heatmap.png)\n")
    if "skew_by_depth.png" in figures:
        out.append("![skew](skew_by_depth.png)\n")
    top = f"top {s.top_share_fraction:.0%} share"
    cov = f"experts for {s.coverage_mass:.0%}"
    rows = []
    for li in cal.importance:
        hot = sorted(li.experts, key=lambda e: -e.gate_share)[:3]
        rows.append([str(li.layer), _g(li.skew.gini, ".3f"), _g(li.skew.entropy, ".3f"), _g(li.skew.top_share, ".3f"),
                     str(li.skew.coverage_count), ", ".join(f"{e.expert} ({e.gate_share:.1%})" for e in hot)])
    out.append(_table(["layer", "Gini", "norm. entropy", top, cov, "hottest experts (gate share)"], rows))

    if cal.sensitivity:
        sens = cal.sensitivity
        out.append("## Depth sensitivity\n")
        out.append(f"Reference perplexity {sens.reference_ppl:.4g} over {sens.scored_tokens} scored tokens; "
                   f"KL is the mean over {sens.positions} positions, in nats.\n")
        if "sensitivity_by_depth.png" in figures:
            out.append("![sensitivity](sensitivity_by_depth.png)\n")
        variants = [(0.0, "every selected expert of the layer lowered")]
        if 0 < s.critical_fraction < 1:
            variants.append((s.critical_fraction, f"non-critical only (top {s.critical_fraction:.0%} kept)"))
        for r, what in variants:
            for metric in ("kl", "ppl_delta"):
                label = "mean KL" if metric == "kl" else "perplexity change"
                out.append(f"**{label}, {what}**\n")
                rows = []
                for layer in range(b.num_layers):
                    row = [str(layer)]
                    for mode in s.modes:
                        e = cal.entry(layer, mode, r)
                        row.append(_g(getattr(e, metric) if e else None, ".3g" if metric == "kl" else "+.3g"))
                    rows.append(row)
                out.append(_table(["layer", *s.modes], rows))
        worst = max(sens.entries, key=lambda e: e.kl, default=None)
        if worst:
            out.append(f"Most sensitive: layer {worst.layer} ({worst.mode}, retention {worst.retention:g}): "
                       f"KL {worst.kl:.3g}, perplexity {worst.ppl_delta:+.3g}.\n")

    if cal.prediction:
        out.append("## Predictability (look-ahead routing)\n")
        if "prediction_recall.png" in figures:
            out.append("![prediction](prediction_recall.png)\n")
        cols = [(d, src, k) for d in (1, 2) for src in ("router_input", "attn_input") for k in s.recall_ks]
        cols = [c for c in cols if any((p.distance, p.source, p.k) == c for p in cal.prediction)]
        rows = [[str(layer)] + [_g(cal.recall(layer, *c), ".3f") for c in cols] for layer in range(1, b.num_layers)]
        out.append(_table(["layer", *[f"l-{d} {src} @{k}" for d, src, k in cols]], rows))
        out.append(f"Chance level: k/E = {', '.join(f'{k / b.num_experts:.3f}' for k in s.recall_ks)}.\n")

    if cal.schedule:
        sc = cal.schedule
        out.append("## Retention schedule r(l)\n")
        out.append(f"Budget: mean KL {sc.target_kl:g} in all, {sc.layer_budget_kl:.3g} per layer; r(l) is the "
                   "smallest measured retention whose loss fits the layer's share (see `calibration/schedule.py`). "
                   "Predicted KL assumes the layers' losses add up.\n")
        if "retention_schedule.png" in figures:
            out.append("![schedule](retention_schedule.png)\n")
        modes = [m for m in s.modes if m in sc.recommended]
        rows = [[str(layer), f"{sc.cosine[layer]:.3f}"] + [f"{sc.recommended[m][layer]:.3g}" for m in modes]
                for layer in range(b.num_layers)]
        rows.append(["predicted KL", "—"] + [f"{sc.recommended_kl[m]:.3g}" for m in modes])
        rows.append(["cosine's predicted KL", "—"] + [f"{sc.cosine_kl[m]:.3g}" for m in modes])
        rows.append(["mean r", f"{sum(sc.cosine) / len(sc.cosine):.3f}"]
                    + [f"{sum(sc.recommended[m]) / len(sc.recommended[m]):.3f}" for m in modes])
        out.append(_table(["layer", "cosine", *[f"recommended ({m})" for m in modes]], rows))
    return "\n".join(out)


def summary(cal: Calibration) -> tuple[list[str], list[list[str]]]:
    """The key numbers per layer, for the command line: header and rows."""
    s, b = cal.settings, cal.bundle
    k = min(s.recall_ks) if s.recall_ks else b.top_k
    header = ["layer", "Gini", f"top {s.top_share_fraction:.0%}", f"experts {s.coverage_mass:.0%}"]
    low = [m for m in s.modes if m != SKIP][-1:] + ([SKIP] if SKIP in s.modes else [])
    header += [f"KL {m}" for m in low] + [f"recall@{k}"]
    if cal.schedule:
        header += [f"r(l) {m}" for m in low] + ["cosine"]
    rows = []
    for li in cal.importance:
        layer = li.layer
        row = [str(layer), f"{li.skew.gini:.3f}", f"{li.skew.top_share:.3f}", str(li.skew.coverage_count)]
        row += [_g(cal.entry(layer, m, 0.0).kl if cal.entry(layer, m, 0.0) else None) for m in low]
        row.append(_g(cal.recall(layer, 1, "router_input", k), ".3f"))
        if cal.schedule:
            row += [f"{cal.schedule.recommended[m][layer]:.3g}" for m in low] + [f"{cal.schedule.cosine[layer]:.3f}"]
        rows.append(row)
    return header, rows
