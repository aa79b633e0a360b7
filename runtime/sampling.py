"""Next-token choice from logits: greedy, or temperature with nucleus (top-p) sampling. Pure,
given the random generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dymoe.bundle.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature < float("inf"):
            raise InputError(f"--temperature {self.temperature} must be 0 (greedy) or positive",
                             "for example --temperature 0.8, or leave it out for greedy decoding")
        if not 0.0 <= self.top_p <= 1.0:
            raise InputError(f"--top-p {self.top_p} must lie in [0, 1]", "1 keeps every token")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"--seed {self.seed} must be a non-negative integer", "for example --seed 0")


def choose_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """``logits`` is one row ``[V]``."""
    if params.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = order[: int(np.searchsorted(cum, params.top_p) + 1)]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(p.shape[0], p=p))
