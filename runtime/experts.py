"""The expert-execution step: the seam where policies (which precision, what is resident,
what to prefetch) plug in. The model hands each layer's routing decision to an
``ExpertExecutor``; this module holds the interface and the simplest executor, every expert
resident at one precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dymoe.bundle import graph_io as io
from dymoe.bundle.progress import Counter, ProgressFn

from .bundle import Bundle
from .ort_session import create_session


@dataclass
class LayerStep:
    """What a layer knows when its routed experts must run (T tokens, H hidden, k per token)."""

    layer: int
    phase: str  # "prefill" or "decode"
    router_input: np.ndarray  # [T, H] normalised hidden state the experts consume
    router_logits: np.ndarray  # [T, E]
    experts: np.ndarray  # [T, k] selected expert ids, highest weight first
    weights: np.ndarray  # [T, k] routing weights
    attn_colsum: np.ndarray  # [S] attention mass each key token received in this layer
    hidden_in: np.ndarray  # [T, H] residual stream entering the layer
    attn_input: np.ndarray  # [T, H] the layer's input RMSNorm (before attention)


class ExpertExecutor(Protocol):
    def run(self, step: LayerStep) -> np.ndarray:
        """Return the weighted sum of the selected experts' outputs, ``[T, H]``."""
        ...

    def close(self) -> None: ...


def combine(step: LayerStep, expert_forward) -> np.ndarray:
    """Sum ``weight * expert(x)`` over each token's selected experts, one expert call per
    distinct expert (its tokens batched), in ascending expert order like transformers."""
    x = step.router_input
    out = np.zeros_like(x)
    for e in np.unique(step.experts):
        tok, slot = np.nonzero(step.experts == e)
        y = expert_forward(int(e), x[tok])
        out[tok] += step.weights[tok, slot][:, None] * y
    return out


class StaticExperts:
    """Every routed expert resident at one precision (the `--precision P` mode)."""

    def __init__(self, bundle: Bundle, precision: str, progress: ProgressFn | None = None,
                 session_config: dict[str, str] | None = None) -> None:
        self.precision = bundle.check_precision(precision)
        spec = bundle.spec
        self.sessions: dict[tuple[int, int], object] = {}
        self.resident_file_bytes = 0
        counter = Counter(progress, f"loading {precision} experts", spec.num_layers * spec.num_experts)
        for layer in range(spec.num_layers):
            for e in range(spec.num_experts):
                rel = bundle.expert_rel(layer, e, precision)
                data = bundle.read(rel)
                self.resident_file_bytes += len(data)
                self.sessions[(layer, e)] = create_session(data, 1, str(bundle.path / rel), session_config)
                counter.tick()

    def run(self, step: LayerStep) -> np.ndarray:
        def forward(e: int, x: np.ndarray) -> np.ndarray:
            return self.sessions[(step.layer, e)].run([io.EXPERT_OUT], {io.EXPERT_IN: x})[0]

        return combine(step, forward)

    def close(self) -> None:
        self.sessions.clear()
