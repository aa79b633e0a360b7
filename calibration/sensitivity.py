"""Depth sensitivity: how much the next-token distribution moves when one layer's routed experts
drop to a lower precision or are skipped, everything else at the reference (highest) precision.

A :class:`Perturbation` names the layer, the mode (a lower precision in the bundle, or ``"skip"``:
the expert adds nothing) and the retention r. r = 0 lowers every selected expert of the layer;
r > 0 keeps each token's ``schedule.kept_per_token(r, k)`` highest-gate experts (the *critical*
ones) at the reference precision and lowers only the others, which is what the runtime does.
Routing weights are never renormalised. Loss is measured against the reference pass on the same
windows: the mean KL(P_ref || P) over every position, and the change in perplexity of the
windows' own next tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dymoe.bundle.precisions import SKIP
from dymoe.runtime.experts import LayerStep, groups

from .bank import ExpertBank
from .collect import ReferenceCache
from .schedule import kept_per_token


@dataclass(frozen=True)
class Perturbation:
    layer: int
    mode: str  # a lower precision, or "skip"
    retention: float  # 0: every selected expert of the layer is lowered


def perturbations(layers: Sequence[int], modes: Sequence[str], retentions: Sequence[float]) -> list[Perturbation]:
    """Every (MoE layer, mode, retention) to measure: retention 0 plus each of ``retentions``."""
    return [Perturbation(layer, mode, r) for layer in layers for mode in modes for r in (0.0, *retentions)]


class PerturbedExperts:
    """Runs ``perturbation``'s layer lowered, every other layer at the reference precision; layers
    below it (identical to the reference pass) come from ``cache`` when it holds them."""

    def __init__(self, bank: ExpertBank, perturbation: Perturbation, cache: ReferenceCache | None = None) -> None:
        self.bank = bank
        self.p = perturbation
        self.cache = cache
        self.window = -1  # set by the caller before each window's forward pass
        self.top_k = bank.bundle.spec.top_k

    def run(self, step: LayerStep) -> np.ndarray:
        if self.cache is not None and step.layer < self.p.layer:
            out = self.cache.get(self.window, step)
            if out is not None:
                return out
        bank, ref = self.bank, self.bank.reference
        x = step.router_input
        out = np.zeros_like(x)
        target = step.layer == self.p.layer
        keep = kept_per_token(self.p.retention, self.top_k) if target else self.top_k
        for e, tok, slot in groups(step):
            w = step.weights[tok, slot][:, None]
            critical = slot < keep  # experts are ordered by gate score, highest first
            if critical.all():
                out[tok] += w * bank.forward(step.layer, e, ref, x[tok])
                continue
            if critical.any():
                t = tok[critical]
                out[t] += w[critical] * bank.forward(step.layer, e, ref, x[t])
            if self.p.mode != SKIP:
                t = tok[~critical]
                out[t] += w[~critical] * bank.forward(step.layer, e, self.p.mode, x[t])
        return out

    def close(self) -> None:
        pass
