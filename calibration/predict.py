"""Predictability of routing: can layer l's state tell which experts the MoE layer d MoE layers
later will select?

The look-ahead predictor (``runtime.predictor``, the same one the runtime prefetches with)
applies the later layer's own routing rule to a state layer l already has: ``router_input``
(layer l's post-attention RMSNorm, the paper's choice) or ``attn_input`` (layer l's input
RMSNorm, available before layer l's attention, so earlier). Its top-k' experts by score are
compared with the experts the later layer actually selects for the same tokens:
recall@k' = |predicted top-k' ∩ selected| / |selected|, averaged over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dymoe.runtime.experts import LayerStep
from dymoe.runtime.predictor import Predictor

from .stats import recall_hits, topk_experts

SOURCES = ("router_input", "attn_input")
DISTANCES = (1, 2)


@dataclass(frozen=True)
class PredictionKey:
    layer: int  # the layer whose selection is predicted
    distance: int  # predicted from layer - distance
    source: str  # "router_input" or "attn_input"
    k: int  # experts predicted per token


class PredictionTally:
    """Fed every layer step of each prefill in order (layer 0 first); counts recall hits."""

    def __init__(self, predictor: Predictor, ks: Sequence[int]) -> None:
        self.predictor = predictor
        self.ks = sorted(set(ks))
        self.hits: dict[PredictionKey, int] = {}
        self.total: dict[PredictionKey, int] = {}
        self._pending: dict[tuple[int, int, str], np.ndarray] = {}  # (target, distance, source) -> top-k'

    def observe(self, step: LayerStep) -> None:
        if step.layer == self.predictor.moe_layers[0]:  # a new window starts
            self._pending.clear()
        for distance in DISTANCES:
            for source in SOURCES:
                predicted = self._pending.pop((step.layer, distance, source), None)
                if predicted is None:
                    continue
                for k in self.ks:
                    key = PredictionKey(step.layer, distance, source, k)
                    self.hits[key] = self.hits.get(key, 0) + recall_hits(predicted[:, :k], step.experts)
                    self.total[key] = self.total.get(key, 0) + step.experts.size
        states = {"router_input": step.router_input, "attn_input": step.attn_input}
        for distance in DISTANCES:
            target = self.predictor.ahead(step.layer, distance)
            if target is None:
                continue
            for source in SOURCES:
                scores = self.predictor.scores(target, states[source])
                self._pending[(target, distance, source)] = topk_experts(scores, max(self.ks))

    def recalls(self) -> dict[PredictionKey, float]:
        return {key: self.hits[key] / self.total[key] for key in sorted(self.total, key=_order) if self.total[key]}


def _order(key: PredictionKey):
    return key.layer, key.distance, SOURCES.index(key.source), key.k
