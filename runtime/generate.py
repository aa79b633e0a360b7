"""Token-by-token generation with a KV cache, timing every step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from dymoe.bundle.errors import InputError

from .model import MoEModel
from .sampling import SamplingParams, choose_token


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    ttft_s: float  # prompt in -> first new token chosen (prefill + head + sampling)
    token_times_s: list[float] = field(default_factory=list)  # each later token's own time
    stop_reason: str = "length"  # "length" | "eos" | "context" | "cancelled"

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (0 when only one token was made)."""
        return float(np.mean(self.token_times_s)) if self.token_times_s else 0.0


class Cancel(Protocol):
    """What stops a generation from outside (a ``threading.Event``): checked once per token."""

    def is_set(self) -> bool: ...


def check_prompt(n_prompt: int, context: int) -> None:
    if n_prompt == 0:
        raise InputError("the prompt is empty after tokenisation", "pass a non-empty --prompt")
    if n_prompt >= context:
        raise InputError(
            f"the prompt has {n_prompt} tokens but the model's context is {context} tokens",
            "shorten the prompt so that at least one token can be generated",
        )


def generate(
    model: MoEModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    eos_ids: list[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    cancel: Cancel | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt_ids``. ``cancel`` (set from any thread,
    or from ``on_token``) ends the generation before its next step, with stop reason
    "cancelled": the cache and sessions stay consistent, unlike killing the thread."""
    context = model.spec.max_position_embeddings
    check_prompt(len(prompt_ids), context)
    eos = set(model.spec.eos_token_ids if eos_ids is None else eos_ids)
    rng = np.random.default_rng(sampling.seed)
    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = model.forward(np.asarray(prompt_ids), cache)
    token = choose_token(logits[-1], sampling, rng)
    result = GenerationResult(list(prompt_ids), [token], ttft_s=time.perf_counter() - t0)
    if on_token:
        on_token(token)
    while True:
        if token in eos:
            result.stop_reason = "eos"
            break
        if cancel is not None and cancel.is_set():
            result.stop_reason = "cancelled"
            break
        if len(result.token_ids) >= max_new_tokens:
            break
        if cache.length + 1 >= context:
            result.stop_reason = "context"
            break
        t = time.perf_counter()
        logits = model.forward(np.asarray([token]), cache)
        token = choose_token(logits[-1], sampling, rng)
        result.token_times_s.append(time.perf_counter() - t)
        result.token_ids.append(token)
        if on_token:
            on_token(token)
    return result
