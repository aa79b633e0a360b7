"""Which experts a later layer will want, guessed from a hidden state this layer already has
(the paper's look-ahead): the later layer's own routing rule, applied early. Each MoE layer's
rule is a small graph in the bundle (``backbone.routers``), built by the same code as the
routing inside its layer graph, so the guess uses exactly the rule the layer will apply (softmax
top-k, DeepSeek's grouped and biased sigmoid, ...). The runtime's prefetch and calibration's
predictability measurements both ask this class.

T tokens, H hidden, E experts.
"""

from __future__ import annotations

import numpy as np

from dymoe.bundle import graph_io as io

from .bundle import Bundle


class Predictor:
    def __init__(self, bundle: Bundle) -> None:
        spec = bundle.spec
        self.moe_layers = list(spec.moe_layers)
        # small graphs, read once at start-up
        self._sessions = {layer: bundle.session(rel, threads=1)
                          for layer, rel in zip(self.moe_layers, bundle.manifest.backbone.routers, strict=True)}

    def scores(self, layer: int, x: np.ndarray) -> np.ndarray:
        """Layer ``layer``'s selection scores ``[T, E]`` for hidden states ``x [T, H]`` (higher: likelier)."""
        return self._sessions[layer].run([io.ROUTER_OUT_SCORES], {io.ROUTER_IN: np.asarray(x, np.float32)})[0]

    def ahead(self, layer: int, distance: int) -> int | None:
        """The MoE layer ``distance`` MoE layers after ``layer`` (None past the last)."""
        later = [m for m in self.moe_layers if m > layer]
        return later[distance - 1] if len(later) >= distance else None
