"""Policies side by side on one bundle, in one process: interleaved runs (A B C A B C ...)
after a warm-up, medians and spreads, ratios from the raw numbers, and held-out perplexity per
policy beside the speed. Each run opens the bundle afresh and generates twice: a cold prompt
(empty expert cache, as right after start-up) and a warm one (the next prompt in the same
session, as a long-running server sees)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from dymoe.bundle.progress import Counter

from .evaluate import Perplexity, evaluate
from .model_session import ModelSession, open_model
from .policy_config import PolicyRun

SPEED_KEYS = ("ttft_s", "tpot_s", "stall_per_token_s", "bytes_read_per_token", "hit_rate", "prefetch_recall",
              "prefetch_precision", "peak_resident_bytes", "load_read_s", "load_create_s")


@dataclass
class Comparison:
    runs: dict[str, list[dict]]  # policy -> one metrics dict per measured run
    perplexity: dict[str, float]
    top1_agreement: dict[str, float]

    def summary(self) -> dict[str, dict]:
        out = {}
        for policy, runs in self.runs.items():
            row = {}
            for k in SPEED_KEYS:
                xs = [r[k] for r in runs if r.get(k) is not None]
                row[k] = statistics.median(xs) if xs else None
                row[k + "_spread"] = (max(xs) - min(xs)) if xs else None
            row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
            row["perplexity"] = self.perplexity.get(policy)
            row["top1_agreement"] = self.top1_agreement.get(policy)
            out[policy] = row
        for base in ("ondemand", "lru"):
            if base in out:
                for row in out.values():
                    for k in ("ttft_s", "tpot_s"):
                        row[f"{k}_speedup_vs_{base}"] = out[base][k] / row[k] if row[k] else None
        return out


def _one_run(bundle: Path, plan: PolicyRun, cold: list[int], warm: list[int] | None,
             new_tokens: int) -> tuple[dict, dict | None]:
    """Open the bundle, generate from ``cold`` (the cache starts empty), then from ``warm`` in the
    same session (the cache as the first prompt left it, as a server's second request finds it)."""
    s: ModelSession = open_model(bundle, policy=plan)
    try:
        first = s.metrics(s.generate_ids(cold, max_new_tokens=new_tokens))
        second = s.metrics(s.generate_ids(warm, max_new_tokens=new_tokens)) if warm is not None else None
        return first, second
    finally:
        s.close()


def speed_runs(bundle: Path, policies: list[str], base: PolicyRun, prompts: list[list[int]], new_tokens: int,
               repeats: int, counter: Counter | None = None) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Per policy, the cold runs (a fresh process-level cache each) and the warm runs (the next
    prompt in the same session): ``(cold, warm)``, each policy -> one metrics dict per run."""
    plans = {p: replace(base, policy=p) for p in policies}
    for p in policies:  # warm-up: imports, measured costs, engine cache, page cache
        _one_run(bundle, plans[p], prompts[0], None, 2)
        if counter:
            counter.tick(what=f"bench: warm-up {p}")
    cold: dict[str, list[dict]] = {p: [] for p in policies}
    warm: dict[str, list[dict]] = {p: [] for p in policies}
    for r in range(repeats):
        for i, prompt in enumerate(prompts):
            following = prompts[(i + 1) % len(prompts)]
            for p in policies:  # interleaved, so drifts of a shared machine hit every policy alike
                first, second = _one_run(bundle, plans[p], prompt, following, new_tokens)
                cold[p].append(first)
                warm[p].append(second)
                if counter:
                    counter.tick(what=f"bench: round {r + 1}/{repeats}, {p}")
    return cold, warm


def accuracy(bundle: Path, policies: list[str], base: PolicyRun, ids: list[int], window: int, windows: int,
             counter: Counter | None = None, reference: Perplexity | None = None,
             ) -> tuple[Perplexity, dict[str, float], dict[str, float]]:
    """The reference's perplexity (measured once, unless given), then each policy's held-out
    perplexity (decode path, token by token) and top-1 agreement with the reference."""
    ppl, agree = {}, {}
    for p in policies:
        result = evaluate(bundle, ids, policy=replace(base, policy=p), window=window, max_windows=windows,
                          reference=reference)
        reference = result.reference
        ppl[p], agree[p] = result.run.ppl, result.top1_agreement
        if counter:
            counter.tick(what=f"bench: perplexity {p}")
    return reference, ppl, agree
