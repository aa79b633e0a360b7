"""Held-out perplexity of a bundle: the accuracy number every precision and policy is judged by.

Text is tokenised once and cut into non-overlapping windows of ``window`` tokens; each window
starts from an empty KV cache and scores its tokens 1..L-1 (teacher forcing, one prefill).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dymoe.errors import InputError

from .model import MoEModel


@dataclass
class Perplexity:
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int
    top1: list[np.ndarray] = field(default_factory=list, repr=False)  # argmax per scored position

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll))


def top1_agreement(run: Perplexity, reference: Perplexity) -> float:
    """Share of scored positions where ``run`` and ``reference`` predict the same next token."""
    same = sum(int((a == b).sum()) for a, b in zip(run.top1, reference.top1, strict=True))
    return same / run.tokens


def windows(ids: list[int], window: int, max_windows: int | None = None) -> list[list[int]]:
    if window < 2:
        raise InputError(f"window {window} is too short", "use a window of at least 2 tokens")
    chunks = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise InputError(f"the text has {len(ids)} tokens, fewer than one window needs",
                         "give more text or a shorter window")
    return chunks[:max_windows] if max_windows else chunks


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def perplexity(model: MoEModel, ids: list[int], window: int = 128, max_windows: int | None = None,
               on_window: Callable[[int], None] | None = None, stepwise: bool = False) -> Perplexity:
    """``stepwise`` feeds each window token by token (one prefill token, then decode steps),
    so a policy makes its decode-time decisions exactly as it does while generating."""
    context = model.spec.max_position_embeddings
    window = min(window, context)
    total, count, top1 = 0.0, 0, []
    chunks = windows(ids, window, max_windows)
    for i, chunk in enumerate(chunks):
        if stepwise:
            cache = model.new_cache()
            logits = np.concatenate([model.forward(np.asarray([t]), cache) for t in chunk[:-1]])
        else:
            logits = model.forward(np.asarray(chunk), model.new_cache(), all_logits=True)[:-1]
        logp = log_softmax(logits)
        target = np.asarray(chunk[1:])
        total -= float(logp[np.arange(len(target)), target].sum())
        count += len(target)
        top1.append(logits.argmax(axis=-1))
        if on_window:
            on_window(i)
    return Perplexity(nll=total / count, tokens=count, windows=len(chunks), top1=top1)
