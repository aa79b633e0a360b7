"""Expert sessions at several precisions for calibration's executors.

The reference precision (the bundle's highest) is loaded for every expert up front; a lower
precision is loaded per layer when first asked for and dropped with :meth:`ExpertBank.drop`, so
the sensitivity sweep holds at most one layer's lower-precision copies besides the reference.
Sessions are built from checksum-verified bytes with the runtime's expert-session settings, so
calibration measures what ``dymoe run`` computes.
"""

from __future__ import annotations

import numpy as np

from dymoe.bundle import graph_io as io
from dymoe.runtime.bundle import Bundle
from dymoe.runtime.ort_session import create_session


class ExpertBank:
    def __init__(self, bundle: Bundle, on_load=None) -> None:
        self.bundle = bundle
        self.reference = bundle.precisions[0]
        self.lower = list(bundle.precisions[1:])
        self._sessions: dict[tuple[int, int, str], object] = {}
        spec = bundle.spec
        for layer in range(spec.num_layers):
            for e in range(spec.num_experts):
                self._load(layer, e, self.reference)
                if on_load:
                    on_load()

    def _load(self, layer: int, expert: int, precision: str):
        rel = self.bundle.expert_rel(layer, expert, precision)
        sess = create_session(self.bundle.read(rel), 1, str(self.bundle.path / rel))
        self._sessions[(layer, expert, precision)] = sess
        return sess

    def forward(self, layer: int, expert: int, precision: str, x: np.ndarray) -> np.ndarray:
        sess = self._sessions.get((layer, expert, precision)) or self._load(layer, expert, precision)
        return sess.run([io.EXPERT_OUT], {io.EXPERT_IN: x})[0]

    def drop(self, layer: int, precision: str) -> None:
        """Forget ``layer``'s sessions at a lower ``precision`` (the reference ones stay)."""
        if precision == self.reference:
            return
        for key in [k for k in self._sessions if k[0] == layer and k[2] == precision]:
            del self._sessions[key]

    def close(self) -> None:
        self._sessions.clear()
