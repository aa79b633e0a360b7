"""The expert-execution step: the seam where policies (which precision, what is resident,
what to prefetch) plug in. The model hands each layer's routing decision to an
``ExpertExecutor``; this module holds the interface and the simplest executor, every expert
resident at one precision.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dymoe.bundle import graph_io as io
from dymoe.bundle.progress import Counter, ProgressFn

from .bundle import Bundle
from .options import EXPERT_THREADS
from .ort_session import create_session


@dataclass
class LayerStep:
    """What a layer knows when its routed experts must run (T tokens, H hidden, k per token)."""

    layer: int
    phase: str  # "prefill" or "decode"
    router_input: np.ndarray  # [T, H] normalised hidden state the router and the experts consume
    experts: np.ndarray  # [T, k] selected expert ids, highest weight first (the layer graph's decision)
    weights: np.ndarray  # [T, k] their routing weights
    attn_colsum: np.ndarray  # [S] attention mass each key token received in this layer
    attn_input: np.ndarray  # [T, H] the layer's input RMSNorm (before attention)


class ExpertExecutor(Protocol):
    def run(self, step: LayerStep) -> np.ndarray:
        """Return the weighted sum of the selected experts' outputs, ``[T, H]``."""
        ...

    def close(self) -> None: ...


def groups(step: LayerStep):
    """Each distinct selected expert ``e`` of a step, ascending like transformers, with the tokens
    routed to it and the slot (rank) it holds for each: ``(e, tok [n], slot [n])``."""
    for e in np.unique(step.experts):
        tok, slot = np.nonzero(step.experts == e)
        yield int(e), tok, slot


def accumulate(step: LayerStep, outputs: dict[int, np.ndarray | None], weights: np.ndarray | None = None,
               grouped: list | None = None) -> np.ndarray:
    """Sum ``weight * y`` over each token's selected experts from ``outputs[e]`` (``y [n, H]`` for
    the tokens routed to ``e``, None for a skipped expert), in ascending expert order whatever
    order they were computed in, so the result does not depend on load timing. ``weights``
    overrides the step's routing weights (renormalised after skips); ``grouped``: the step's
    :func:`groups`, when the caller already has them (it runs on every layer of every token)."""
    x = step.router_input
    w = step.weights if weights is None else weights
    out = np.zeros_like(x)
    for e, tok, slot in groups(step) if grouped is None else grouped:
        y = outputs.get(e)
        if y is not None:
            out[tok] += w[tok, slot][:, None] * y
    return out


def combine(step: LayerStep, expert_forward, weights: np.ndarray | None = None,
            pool: ThreadPoolExecutor | None = None, threads: int = 1) -> np.ndarray:
    """Run each distinct selected expert once on its tokens (batched), ``expert_forward(e, x)``
    returning ``y`` or None for a skipped expert, and :func:`accumulate` the outputs.

    With a ``pool`` the experts are dealt into ``threads`` shares, one run here and the others on
    the pool (ORT releases the GIL in ``run``): one hand-off per thread, not one per expert, since
    a decode step's expert takes tens of microseconds."""
    x = step.router_input
    jobs = list(groups(step))

    def share(part: list) -> dict[int, np.ndarray | None]:
        return {e: expert_forward(e, x[tok]) for e, tok, _ in part}

    if pool is None or threads < 2 or len(jobs) < 2:
        return accumulate(step, share(jobs), weights, jobs)
    parts = [jobs[i::threads] for i in range(min(threads, len(jobs)))]
    futures = [pool.submit(share, part) for part in parts[1:]]
    outputs = share(parts[0])
    for f in futures:
        outputs.update(f.result())
    return accumulate(step, outputs, weights, jobs)


class ExpertSessions:
    """Expert engine sessions built from checksum-verified bundle bytes (one intra-op thread each:
    many sessions must not fight over a small device's cores), keyed (layer, expert, precision),
    loaded when first asked for. The all-resident runtime and calibration keep theirs here; the
    budgeted runtime's are in ``resident.ResidentSet``."""

    def __init__(self, bundle: Bundle, session_config: dict[str, str] | None = None) -> None:
        self.bundle = bundle
        self.session_config = session_config
        self.file_bytes = 0
        self._sessions: dict[tuple[int, int, str], object] = {}

    def get(self, layer: int, expert: int, precision: str):
        key = (layer, expert, precision)
        sess = self._sessions.get(key)
        if sess is None:
            rel = self.bundle.expert_rel(layer, expert, precision)
            data = self.bundle.read(rel)
            self.file_bytes += len(data)
            sess = self._sessions[key] = create_session(data, 1, str(self.bundle.path / rel), self.session_config,
                                                        **self.bundle.expert_graph(precision, rel))
        return sess

    def load_all(self, precision: str, progress: ProgressFn | None = None) -> None:
        spec = self.bundle.spec
        counter = Counter(progress, f"loading {precision} experts", len(spec.moe_layers) * spec.num_experts)
        for layer in spec.moe_layers:
            for e in range(spec.num_experts):
                self.get(layer, e, precision)
                counter.tick()

    def forward(self, layer: int, expert: int, precision: str, x: np.ndarray) -> np.ndarray:
        return self.get(layer, expert, precision).run([io.EXPERT_OUT], {io.EXPERT_IN: x})[0]

    def drop(self, layer: int, precision: str) -> None:
        """Forget ``layer``'s sessions at ``precision``."""
        for key in [k for k in self._sessions if k[0] == layer and k[2] == precision]:
            del self._sessions[key]

    def close(self) -> None:
        self._sessions.clear()


class StaticExperts:
    """Every routed expert resident at one precision (the `--precision P` mode); a step's experts
    run on ``threads`` threads at once."""

    def __init__(self, bundle: Bundle, precision: str, progress: ProgressFn | None = None,
                 session_config: dict[str, str] | None = None, threads: int = EXPERT_THREADS) -> None:
        self.precision = bundle.check_precision(precision)
        self.sessions = ExpertSessions(bundle, session_config)
        self.sessions.load_all(precision, progress)
        threads = max(1, min(threads, os.cpu_count() or 1))
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="dymoe-expert") if threads > 1 else None

    @property
    def resident_file_bytes(self) -> int:
        return self.sessions.file_bytes

    def run(self, step: LayerStep) -> np.ndarray:
        return combine(step, lambda e, x: self.sessions.forward(step.layer, e, self.precision, x),
                       pool=self._pool, threads=self.threads)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.sessions.close()
