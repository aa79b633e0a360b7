"""Routing as transformers does it: softmax over all experts in float32, top-k, and an
optional renormalisation of the k weights. Pure; T tokens, E experts, k chosen per token."""

from __future__ import annotations

import numpy as np


def route(logits: np.ndarray, top_k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(experts [T, k] int64, weights [T, k] float32)``, highest weight first."""
    z = logits.astype(np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    # stable descending sort so ties resolve to the lower expert index, as torch.topk does on CPU
    order = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(p, order, axis=-1)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return order.astype(np.int64), weights.astype(np.float32)
