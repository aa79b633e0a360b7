"""One expert variant's graph in the ONNX form its manifest format names (``bundle.precisions``):
the quantizer that suits the form, then the graph builder. Export and requantize call this, so a
format name always means the same bytes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from dymoe.bundle.precisions import BITS, FORMAT_PRECISIONS, FORMATS

from .expert_graph import ExpertQuantStats, build_expert_model, reference_forward
from .quantizers import QuantizerOptions, quantize_expert
from .symmetric import effective, quantize_sym_int4
from .trt_graph import build_fp16_model, trt_block

SYMMETRIC_QUANTIZERS = ("rtn", "hqq")  # what the symmetric int4 form can be quantized with (no gptq yet)


@dataclass
class Variant:
    model: onnx.ModelProto
    stats: ExpertQuantStats
    quantizer: str | None = None  # None: a float precision
    note: str | None = None
    tokens: int | None = None
    routed_output_rel_error: float | None = None


def build_variant(gate, up, down, precision: str, block_size: int, quantizer: QuantizerOptions, name: str,
                  inputs=None, fmt: str | None = None, memo: dict | None = None) -> Variant:
    """The graph of one expert (torch-layout float weights) at ``precision`` in format ``fmt``
    (default: the portable one, ``FORMATS[precision]``). ``memo``: a dict kept for this expert's
    weights across its variants, so that they share what is derived from the weights alone."""
    fmt = fmt or FORMATS[precision]
    if precision not in FORMAT_PRECISIONS.get(fmt, ()):
        raise ValueError(f"format {fmt!r} cannot hold {precision}")
    if fmt == "float16":
        model, stats = build_fp16_model(gate, up, down, "fp16", name=name)
        return Variant(model, stats)
    if fmt == "qdq_sym_int4_fp16":
        return _symmetric_int4(gate, up, down, quantizer, name, inputs)
    quant = (quantize_expert(gate, up, down, precision, block_size, quantizer, inputs, memo)
             if precision in BITS else None)
    model, stats = build_expert_model(gate, up, down, precision, block_size, name=name,
                                      fmt="nbits" if fmt == "matmulnbits" else None,
                                      quantized=quant.mats if quant else None, memo=memo)
    if quant is None:
        return Variant(model, stats)
    return Variant(model, stats, quant.quantizer, quant.note, quant.tokens, quant.routed_output_rel_error)


def _symmetric_int4(gate, up, down, quantizer: QuantizerOptions, name: str, inputs) -> Variant:
    if quantizer.name not in SYMMETRIC_QUANTIZERS:
        raise ValueError(f"the symmetric int4 form is quantized with {' or '.join(SYMMETRIC_QUANTIZERS)}, "
                         f"not {quantizer.name}")
    mats = {}
    for proj, w in (("gate", gate), ("up", up), ("down", down)):
        w_kn = np.asarray(w, dtype=np.float32).T
        block = trt_block(w_kn.shape[0])
        if block is None:
            raise ValueError(f"{proj}: {w_kn.shape[0]} input features are not a multiple of 64 "
                             "(TensorRT's INT4 blocks)")
        mats[proj] = quantize_sym_int4(w_kn, block, quantizer.name)
    model, stats = build_fp16_model(gate, up, down, "int4", quantized=mats, name=name)
    x = getattr(inputs, "x", inputs)  # a quantizers.RoutedInputs or an array of routed rows
    routed = None
    if x is not None and len(x):
        y = reference_forward(x, gate, up, down)
        yq = reference_forward(x, *(effective(mats[p]).T for p in ("gate", "up", "down")))
        routed = float(np.linalg.norm(y - yq) / max(float(np.linalg.norm(y)), 1e-30))
    return Variant(model, stats, quantizer.name, None, None if x is None else int(len(x)), routed)
