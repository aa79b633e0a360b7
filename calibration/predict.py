"""Predictability of routing: can layer l's state tell which experts layer l + d will select?

The look-ahead predictor applies layer (l + d)'s router weights to a state layer l already has:
``router_input`` (layer l's post-attention RMSNorm, the paper's choice) or ``attn_input`` (layer
l's input RMSNorm, available before layer l's attention, so earlier). Its top-k' experts are
compared with the experts layer l + d actually selects for the same tokens:
recall@k' = |predicted top-k' ∩ selected| / |selected|, averaged over tokens.

The router weights are read from each layer graph's initializer ``router`` (stored ``[H, E]``,
the transpose of the checkpoint's ``[E, H]``), from checksum-verified bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from dymoe.bundle.errors import BundleError
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.experts import LayerStep

from .stats import recall_hits, topk_experts

ROUTER_INITIALIZER = "router"
SOURCES = ("router_input", "attn_input")
DISTANCES = (1, 2)


def read_routers(bundle: Bundle) -> list[np.ndarray]:
    """Each layer's router weights ``[H, E]`` (float32)."""
    spec = bundle.spec
    routers = []
    for rel in bundle.manifest.backbone.layers:
        model = onnx.load_from_string(bundle.read(rel))
        found = [t for t in model.graph.initializer if t.name == ROUTER_INITIALIZER]
        if len(found) != 1:
            raise BundleError(f"{bundle.path / rel} has no initializer '{ROUTER_INITIALIZER}'",
                              "re-export the bundle with this dymoe version")
        w = numpy_helper.to_array(found[0]).astype(np.float32)
        if w.shape != (spec.hidden_size, spec.num_experts):
            raise BundleError(f"{bundle.path / rel}: router weights have shape {w.shape}, expected "
                              f"{(spec.hidden_size, spec.num_experts)}", "re-export the bundle")
        routers.append(w)
    return routers


@dataclass(frozen=True)
class PredictionKey:
    layer: int  # the layer whose selection is predicted
    distance: int  # predicted from layer - distance
    source: str  # "router_input" or "attn_input"
    k: int  # experts predicted per token


class PredictionTally:
    """Fed every layer step of each prefill in order (layer 0 first); counts recall hits."""

    def __init__(self, routers: Sequence[np.ndarray], ks: Sequence[int]) -> None:
        self.routers = list(routers)
        self.ks = sorted(set(ks))
        self.hits: dict[PredictionKey, int] = {}
        self.total: dict[PredictionKey, int] = {}
        self._pending: dict[tuple[int, int, str], np.ndarray] = {}  # (target, distance, source) -> top-k'

    def observe(self, step: LayerStep) -> None:
        if step.layer == 0:
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
            target = step.layer + distance
            if target >= len(self.routers):
                continue
            for source in SOURCES:
                logits = np.asarray(states[source], dtype=np.float32) @ self.routers[target]
                self._pending[(target, distance, source)] = topk_experts(logits, max(self.ks))

    def recalls(self) -> dict[PredictionKey, float]:
        return {key: self.hits[key] / self.total[key] for key in sorted(self.total, key=_order) if self.total[key]}


def _order(key: PredictionKey):
    return key.layer, key.distance, SOURCES.index(key.source), key.k
