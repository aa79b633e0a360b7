"""An expert session whose engine takes at most ``rows`` tokens per call (a TensorRT optimisation
profile ends at the prefill chunk): longer calls are cut into chunks and the outputs joined. An
expert is applied to each token separately, so chunking does not change the result."""

from __future__ import annotations

import numpy as np


class ChunkedSession:
    def __init__(self, session, rows: int) -> None:
        self.session = session
        self.rows = rows

    def run(self, output_names, feeds: dict[str, np.ndarray]):
        n = max(len(v) for v in feeds.values())
        if n <= self.rows:
            return self.session.run(output_names, feeds)
        parts = [self.session.run(output_names, {k: v[i:i + self.rows] for k, v in feeds.items()})
                 for i in range(0, n, self.rows)]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]

    def __getattr__(self, name):  # get_inputs, get_providers ...: the wrapped session's
        return getattr(self.session, name)
