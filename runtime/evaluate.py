"""Held-out perplexity of a bundle: the accuracy number every precision and policy is judged by.

Text is tokenised once and cut into non-overlapping windows of ``window`` tokens; each window
starts from an empty KV cache and scores its tokens 1..L-1 (teacher forcing, one prefill).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dymoe.bundle.errors import InputError
from dymoe.bundle.progress import Counter, ProgressFn

from .maths import log_softmax
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


def perplexity(model: MoEModel, ids: list[int], window: int = 128, max_windows: int | None = None,
               progress: ProgressFn | None = None, stepwise: bool = False, label: str = "perplexity") -> Perplexity:
    """``stepwise`` feeds each window token by token (one prefill token, then decode steps),
    so a policy makes its decode-time decisions exactly as it does while generating."""
    context = model.spec.max_position_embeddings
    window = min(window, context)
    total, count, top1 = 0.0, 0, []
    chunks = windows(ids, window, max_windows)
    counter = Counter(progress, f"{label}: {len(chunks)} windows of {window} tokens"
                      + (", fed token by token" if stepwise else ""), len(chunks))
    for chunk in chunks:
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
        counter.tick()
    return Perplexity(nll=total / count, tokens=count, windows=len(chunks), top1=top1)


def reference_precision(precisions: list[str]) -> str:
    """What accuracy is measured against: fp32 when the bundle has it, else its highest precision."""
    return "fp32" if "fp32" in precisions else precisions[0]


@dataclass
class Evaluation:
    run: Perplexity
    label: str  # what ran: a precision, or "policy P"
    reference: Perplexity | None  # the all-resident reference precision (None: the run is the reference)
    reference_label: str

    @property
    def top1_agreement(self) -> float | None:
        return None if self.reference is None else top1_agreement(self.run, self.reference)


def evaluate(bundle: Path, ids: list[int], precision: str | None = None, policy=None, window: int = 128,
             max_windows: int | None = None, progress: ProgressFn | None = None,
             reference: Perplexity | None = None, target=None) -> Evaluation:
    """Perplexity of ``bundle`` on ``ids`` with every expert at ``precision`` or under ``policy``
    (a :class:`PolicyRun`, fed token by token so it decides as while generating), and top-1
    agreement with the reference precision (computed unless given or the run is the reference).
    ``target`` (an ``ExecutionTarget``, or the policy's) is where the graphs run (default: the CPU)."""
    from .model_session import open_model

    if policy is not None and precision is not None:
        raise InputError("--precision and --policy exclude each other", "choose one")
    target = target or (policy.target if policy is not None else None)
    session = open_model(bundle, precision=precision, policy=policy, target=target)
    try:
        run = perplexity(session.model, ids, window, max_windows, progress, stepwise=policy is not None,
                         label=f"perplexity ({session.label})")
        ref_prec = reference_precision(session.bundle.precisions)
    finally:
        session.close()
    if reference is None and (policy is not None or (precision or session.bundle.precisions[0]) != ref_prec):
        ref = open_model(bundle, precision=ref_prec, target=target)
        try:
            reference = perplexity(ref.model, ids, window, max_windows, progress, label=f"reference ({ref_prec})")
        finally:
            ref.close()
    return Evaluation(run, session.label, reference, ref_prec)
