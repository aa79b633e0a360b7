"""The reference pass: an expert executor that computes exactly what ``StaticExperts`` at the
bundle's highest precision computes (same batching, same order) and records, per layer and
expert, what the importance statistics need. It runs the expert sessions itself because "output
contribution" needs each expert's output, not only the weighted sum.

Recorded per layer l and expert e over every prefilled token:

* ``tokens``: tokens that selected e; ``gate_mass``: the sum of their routing weights for e;
* ``weights``: every routing weight e received (for the mean and percentiles);
* ``heavy``: heavy-hitter tokens (``runtime.policy.heavy_hitters`` of the layer's ``attn_colsum``) that selected e;
* ``contribution``: the sum of ||weight * expert(x)||_2 over the tokens that selected e;
* with a recorder (``--collect-inputs``): the rows x of the prefilled tokens that selected e, the
  expert's input (``inputs.InputRecorder`` keeps a bounded sample).
"""

from __future__ import annotations

import numpy as np

from dymoe.runtime.experts import LayerStep, groups
from dymoe.runtime.policy import heavy_hitters

from .bank import ExpertBank
from .inputs import InputRecorder
from .predict import PredictionTally


class LayerTally:
    def __init__(self, num_experts: int) -> None:
        self.tokens = np.zeros(num_experts, dtype=np.int64)
        self.gate_mass = np.zeros(num_experts, dtype=np.float64)
        self.heavy = np.zeros(num_experts, dtype=np.int64)
        self.contribution = np.zeros(num_experts, dtype=np.float64)
        self.weights: list[list[np.ndarray]] = [[] for _ in range(num_experts)]
        self.tokens_seen = 0
        self.heavy_seen = 0

    def weights_of(self, expert: int) -> np.ndarray:
        parts = self.weights[expert]
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


class ReferenceCache:
    """The reference pass's expert step per (window, layer) for the windows the sensitivity sweep
    reruns. A pass that perturbs layer l computes layers below l exactly as the reference did, so
    their expert output is taken from here, after checking that the step's input and selection
    are bit-identical (otherwise it is computed again)."""

    def __init__(self, windows: set[int]) -> None:
        self.windows = windows
        self._steps: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    def put(self, window: int, step: LayerStep, out: np.ndarray) -> None:
        if window in self.windows:
            self._steps[(window, step.layer)] = (step.router_input, step.experts, step.weights, out)

    def get(self, window: int, step: LayerStep) -> np.ndarray | None:
        hit = self._steps.get((window, step.layer))
        if hit is None:
            return None
        x, experts, weights, out = hit
        same = (np.array_equal(x, step.router_input) and np.array_equal(experts, step.experts)
                and np.array_equal(weights, step.weights))
        return out if same else None


class CollectingExperts:
    def __init__(self, bank: ExpertBank, heavy_hitter_fraction: float, prediction: PredictionTally,
                 cache: ReferenceCache, recorder: InputRecorder | None = None) -> None:
        spec = bank.bundle.spec
        self.bank = bank
        self.fraction = heavy_hitter_fraction
        self.prediction = prediction
        self.cache = cache
        self.recorder = recorder
        self.window = -1  # set by the caller before each window's forward pass
        self.layers = {layer: LayerTally(spec.num_experts) for layer in spec.moe_layers}

    def run(self, step: LayerStep) -> np.ndarray:
        tally = self.layers[step.layer]
        x = step.router_input
        T = x.shape[0]
        tally.tokens_seen += T
        heavy = np.zeros(T, dtype=bool)
        if step.phase == "prefill":
            heavy[heavy_hitters(step.attn_colsum, T, self.fraction)] = True
            tally.heavy_seen += int(heavy.sum())
        out = np.zeros_like(x)
        for e, tok, slot in groups(step):  # as the runtime combines: ascending experts, tokens batched
            w = step.weights[tok, slot]
            y = w[:, None] * self.bank.forward(step.layer, e, self.bank.reference, x[tok])
            out[tok] += y
            tally.tokens[e] += tok.size
            tally.gate_mass[e] += float(w.astype(np.float64).sum())
            tally.weights[e].append(w.copy())
            tally.heavy[e] += int(heavy[tok].sum())
            tally.contribution[e] += float(np.linalg.norm(y.astype(np.float64), axis=-1).sum())
            if self.recorder is not None and step.phase == "prefill":  # each window is one prefill; never decode
                self.recorder.add(step.layer, e, x[tok])
        self.prediction.observe(step)
        self.cache.put(self.window, step, out)
        return out

    def close(self) -> None:
        pass
