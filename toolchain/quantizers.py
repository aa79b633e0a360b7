"""Choosing the codes of one expert at one precision: ``rtn``, ``hqq`` or ``gptq``.

An expert is ``y = down(silu(gate(x)) * up(x))`` (torch-layout weights: gate, up ``[I, H]``, down
``[H, I]``). Letters: ``T`` routed tokens, ``H`` hidden, ``I`` intermediate.

* ``rtn``: round to nearest over the block's min/max (``quantize.py``).
* ``hqq``: data-free optimised scale / zero point (``hqq.py``).
* ``gptq``: error compensation with the expert's own routed inputs ``X [T, H]`` (``gptq.py``):
  gate and up share ``X^T X``; down sees ``silu(X Wg_q) * (X Wu_q)`` - the activations it will
  really get once gate and up are quantized - so its Hessian is built after those two.
  An expert with fewer than ``min_tokens`` routed tokens (the statistics would fit noise) falls
  back to ``hqq`` and says so in ``note``.

Every result also reports the output error on the routed inputs when they are known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dymoe.bundle.precisions import BITS

from .blockquant import QuantizedMatrix, dequantize, quantize_rtn
from .expert_graph import reference_forward, silu, weight_kn
from .gptq import GptqOptions, inverse_factor, quantize_gptq
from .hqq import HqqOptions, quantize_hqq
from .options import GPTQ_MIN_TOKENS, QUANTIZER, QUANTIZERS

FALLBACK = "hqq"  # what gptq uses for an expert without enough routed tokens


@dataclass(frozen=True)
class QuantizerOptions:
    name: str = QUANTIZER
    min_tokens: int = GPTQ_MIN_TOKENS
    hqq: HqqOptions = field(default_factory=HqqOptions)
    gptq: GptqOptions = field(default_factory=GptqOptions)

    def __post_init__(self) -> None:
        if self.name not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.name!r}")

    @property
    def needs_inputs(self) -> bool:
        return self.name == "gptq"


@dataclass
class ExpertQuant:
    """One expert's codes at one precision and how they were made."""

    mats: dict[str, QuantizedMatrix]  # "gate", "up", "down", each [K, N]
    quantizer: str  # the one that ran: rtn | hqq | gptq
    note: str | None  # why it differs from the one asked for, if it does
    tokens: int | None  # routed tokens available (None: no inputs were given)
    routed_output_rel_error: float | None  # ||y - y_q|| / ||y|| on those tokens


class RoutedInputs:
    """An expert's routed inputs ``x [T, H]`` and what gptq derives from them once for all of the
    expert's precisions (gate and up share ``X^T X`` and its inverse factor: the costly part)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = np.asarray(x, dtype=np.float32)
        self._gram: np.ndarray | None = None
        self._factor: tuple[float, np.ndarray] | None = None

    @property
    def tokens(self) -> int:
        return int(self.x.shape[0])

    def gram(self) -> np.ndarray:
        if self._gram is None:
            self._gram = gram(self.x)
        return self._gram

    def factor(self, damp: float) -> np.ndarray:
        if self._factor is None or self._factor[0] != damp:
            self._factor = (damp, inverse_factor(self.gram(), damp))
        return self._factor[1]


def _one(w_kn: np.ndarray, bits: int, block_size: int, how: str, options: QuantizerOptions,
         hessian: np.ndarray | None = None, factor: np.ndarray | None = None, memo: dict | None = None
         ) -> QuantizedMatrix:
    if how == "rtn":
        return quantize_rtn(w_kn, bits, block_size)
    if how == "hqq":
        return quantize_hqq(w_kn, bits, block_size, options.hqq, memo)
    return quantize_gptq(w_kn, bits, block_size, hessian, options.gptq, factor)


def gram(x: np.ndarray) -> np.ndarray:
    """``X^T X`` (``x [T, K]``), float32 like GPTQ's reference: the sums run over at most a few
    thousand routed tokens."""
    x = np.asarray(x, dtype=np.float32)
    return x.T @ x


def quantize_expert(gate: np.ndarray, up: np.ndarray, down: np.ndarray, precision: str, block_size: int,
                    options: QuantizerOptions, inputs: np.ndarray | RoutedInputs | None = None,
                    memo: dict | None = None) -> ExpertQuant:
    """Quantize one expert (torch-layout weights) to ``precision`` (int8 / int4 / int2).

    ``inputs`` are the expert's routed hidden states ``[T, H]`` (required for gptq to run; without
    them or with too few rows gptq falls back to hqq); pass the same :class:`RoutedInputs` for all
    precisions of an expert to share its factorisation. Likewise ``memo``, a dict kept for the
    expert's weights across its precisions, shares what hqq derives from them.
    """
    bits = BITS[precision]
    if inputs is not None and not isinstance(inputs, RoutedInputs):
        inputs = RoutedInputs(inputs)
    tokens = None if inputs is None else inputs.tokens
    how, note = options.name, None
    if how == "gptq" and (tokens or 0) < options.min_tokens:
        how = FALLBACK
        note = (f"gptq fell back to {FALLBACK}: {tokens or 0} routed calibration tokens "
                f"< {options.min_tokens} (--gptq-min-tokens)")
    memos = {p: None if memo is None else memo.setdefault(p, {}) for p in ("gate", "up", "down")}
    g_kn, u_kn, d_kn = (weight_kn(w, memos[p]) for p, w in (("gate", gate), ("up", up), ("down", down)))
    if how == "gptq":
        x, hs = inputs.x, inputs.gram()
        factor = None if options.gptq.act_order else inputs.factor(options.gptq.damp)  # act order permutes first
        mats = {"gate": _one(g_kn, bits, block_size, how, options, hs, factor),
                "up": _one(u_kn, bits, block_size, how, options, hs, factor)}
        act = silu(x @ dequantize(mats["gate"])) * (x @ dequantize(mats["up"]))  # [T, I] as served
        mats["down"] = _one(d_kn, bits, block_size, how, options, gram(act))
    else:
        mats = {p: _one(w, bits, block_size, how, options, memo=memos[p])
                for p, w in (("gate", g_kn), ("up", u_kn), ("down", d_kn))}
    err = None
    if tokens:
        err = routed_output_error(inputs.x, gate, up, down, mats)
    return ExpertQuant(mats=mats, quantizer=how, note=note, tokens=tokens, routed_output_rel_error=err)


def routed_output_error(inputs: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                        mats: dict[str, QuantizedMatrix]) -> float:
    """``||y - y_q|| / ||y||`` over the routed tokens, float32 numpy forward."""
    y = reference_forward(inputs, gate, up, down)
    yq = reference_forward(inputs, *(dequantize(mats[p]).T for p in ("gate", "up", "down")))
    return float(np.linalg.norm(y - yq) / max(float(np.linalg.norm(y)), 1e-30))
