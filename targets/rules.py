"""Which ONNX Runtime provider can run an expert graph, and why not: rules over the facts of a
graph's weights (``runtime/graph_facts.py`` reads them from ONNX). Pure: no onnx, no onnxruntime.

The rules, from the TensorRT and ONNX Runtime documentation:

* TensorRT's INT4 is weight-only: signed INT4, symmetric (no zero point, or an all-zero one),
  blocks of 64 or 128 along one of the last two axes (dividing it), codes and scales constant
  initializers, ``DequantizeLinear`` (opset 21+) straight into ``MatMul``, the scales of the
  activations' type (fp16 scales for fp16 activations), built strongly typed. TensorRT has no
  INT8 weight-only quantization (its INT8 quantizes activations too), no 2-bit type, and does not
  parse ONNX Runtime's contrib ops (``com.microsoft::MatMulNBits``).
* ONNX Runtime's CUDA provider runs ``MatMulNBits`` of the bit widths its release supports (4 and
  8; 2 only in the newest releases) and fuses a blocked 4-bit ``DequantizeLinear -> MatMul`` into
  it; an 8-bit blocked ``DequantizeLinear`` is not fused.
* ONNX Runtime's CPU provider runs all of these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

TRT_INT4_BLOCKS = (64, 128)
TRT_INT4_SINCE = (10, 0)  # TensorRT 10.0 added INT4 weight-only quantization
CUDA_NBITS = (4, 8)  # without a device profile: what current onnxruntime-gpu releases run
ORT_DOMAINS = ("", "ai.onnx", "com.microsoft")


@dataclass(frozen=True)
class WeightFacts:
    """How one projection's weight reaches its matrix product."""

    name: str  # the projection (gate, up, down)
    op: str  # "MatMul" or "MatMulNBits"
    weight_type: str  # float32 | float16 | int4 | uint4 | int8 | uint8 (MatMulNBits: uint8 packing of `bits`)
    bits: int | None  # code width of a quantized weight
    K: int
    N: int
    activation_type: str  # element type of the product's other input
    block_size: int | None = None
    axis: int | None = None  # DequantizeLinear's blocked axis (non-negative)
    rank: int = 2
    zero_point: str = "none"  # none | zero | nonzero
    scale_type: str | None = None
    constant: bool = True  # codes, scales and zero points are initializers
    direct: bool = True  # DequantizeLinear's output feeds only this product's weight input
    cast: bool = False  # a float weight Cast to another type before the product


@dataclass(frozen=True)
class GraphFacts:
    opset: int
    domains: tuple[str, ...]  # operator domains used
    weights: tuple[WeightFacts, ...]


@dataclass(frozen=True)
class Verdict:
    provider: str  # cpu | cuda | tensorrt
    ok: bool
    reasons: tuple[str, ...] = ()  # why it cannot (ok False)
    notes: tuple[str, ...] = ()  # what to know when it can

    def text(self) -> str:
        said = self.notes if self.ok else self.reasons
        return ("yes" if self.ok else "no") + (": " + "; ".join(said) if said else "")


def version(v: str | None) -> tuple[int, ...] | None:
    """``"10.3"`` -> ``(10, 3)``; None or unparsable -> None."""
    try:
        return tuple(int(x) for x in v.split(".")) if v else None
    except ValueError:
        return None


Rule = Callable[[WeightFacts], str | None]


def _dq(w: WeightFacts) -> bool:
    return w.op == "MatMul" and w.bits is not None


# TensorRT, per DequantizeLinear weight; each returns why not, or None
def _trt_int8(w):
    return "TensorRT has no INT8 weight-only quantization (its INT8 quantizes the activations too)" if w.bits == 8 \
        else None


def _trt_signed(w):
    return f"{w.weight_type.upper()} codes: TensorRT's INT4 is signed" if w.weight_type == "uint4" else None


def _trt_symmetric(w):
    return "a zero point: TensorRT's INT4 is symmetric" if w.bits == 4 and w.zero_point == "nonzero" else None


def _trt_block(w):
    if w.bits != 4:
        return None
    if w.block_size not in TRT_INT4_BLOCKS:
        return f"block {w.block_size}: TensorRT's INT4 blocks are 64 or 128"
    return f"block {w.block_size} does not divide {w.name}'s {w.K} input features" if w.K % w.block_size else None


def _trt_axis(w):
    return f"blocks along axis {w.axis}: must be one of the last two" if w.bits == 4 and w.axis is not None and \
        w.axis < w.rank - 2 else None


def _trt_constant(w):
    return "codes or scales are not constant initializers" if not w.constant else None


def _trt_direct(w):
    return "DequantizeLinear's output does not go straight into the MatMul" if not w.direct else None


def _trt_scale_type(w):
    if w.bits == 4 and w.scale_type != w.activation_type:
        return (f"{w.scale_type} scales with {w.activation_type} activations: TensorRT wants the activations' type "
                "(fp16 scales for fp16 activations)")
    return None


TRT_RULES: tuple[Rule, ...] = (_trt_int8, _trt_signed, _trt_symmetric, _trt_block, _trt_axis, _trt_constant,
                               _trt_direct, _trt_scale_type)


def _tensorrt(g: GraphFacts, trt: tuple[int, ...] | None) -> Verdict:
    reasons: list[str] = []
    notes: list[str] = []
    if "com.microsoft" in g.domains:
        reasons.append("MatMulNBits is an ONNX Runtime contrib op TensorRT cannot parse (with the TensorRT provider "
                       "those nodes run on CUDA)")
    if any(d not in ORT_DOMAINS for d in g.domains):
        reasons.append("operators of unknown domains")
    int4 = [w for w in g.weights if _dq(w) and w.bits == 4]
    if any(_dq(w) for w in g.weights):
        if g.opset < 21:
            reasons.append(f"opset {g.opset}: blocked and INT4 DequantizeLinear need opset 21")
        for w in g.weights:
            if _dq(w):
                reasons += [r for rule in TRT_RULES if (r := rule(w))]
    if int4 and not reasons:
        if trt is not None and trt < TRT_INT4_SINCE:
            reasons.append(f"TensorRT {'.'.join(map(str, trt))} has no INT4 (10.0 added it)")
        notes.append("INT4 weight-only GEMM; build strongly typed (dymoe build-engines does)")
    if any(w.cast and w.weight_type == "float16" and w.activation_type == "float32" for w in g.weights):
        notes.append("fp32 arithmetic: the fp16 weights are Cast to fp32, which TensorRT folds into fp32 copies "
                     "(twice the memory); export --target tensorrt writes fp16 arithmetic")
    return Verdict("tensorrt", not reasons, tuple(dict.fromkeys(reasons)), tuple(notes) if not reasons else ())


def _cuda(g: GraphFacts, nbits: tuple[int, ...]) -> Verdict:
    reasons, notes = [], []
    if any(d not in ORT_DOMAINS for d in g.domains):
        reasons.append("operators of unknown domains")
    for w in g.weights:
        if w.op == "MatMulNBits" and w.bits not in nbits:
            reasons.append(f"{w.bits}-bit MatMulNBits: this onnxruntime-gpu's CUDA kernels take "
                           f"{' and '.join(map(str, nbits))} bits (2-bit only in the newest releases)")
        elif _dq(w) and w.bits == 8:
            reasons.append("8-bit blocked DequantizeLinear: ORT's CUDA provider fuses only 4-bit ones into "
                           "MatMulNBits; this one would dequantize the whole weight every call (or run on the CPU)")
        elif _dq(w) and not (w.constant and w.direct and w.axis == 0 and w.block_size and w.block_size >= 16
                             and w.block_size & (w.block_size - 1) == 0):
            reasons.append("4-bit DequantizeLinear that ORT cannot fuse into MatMulNBits (needs constant codes, "
                           "axis 0, a power-of-two block >= 16, straight into the MatMul)")
    if not reasons and any(_dq(w) for w in g.weights):
        notes.append("DequantizeLinear + MatMul fused into MatMulNBits")
    return Verdict("cuda", not reasons, tuple(dict.fromkeys(reasons)), tuple(notes) if not reasons else ())


def _cpu(g: GraphFacts) -> Verdict:
    reasons = []
    if any(d not in ORT_DOMAINS for d in g.domains):
        reasons.append("operators of unknown domains")
    if any(_dq(w) for w in g.weights) and g.opset < 21:
        reasons.append(f"opset {g.opset}: blocked and INT4 DequantizeLinear need opset 21")
    return Verdict("cpu", not reasons, tuple(reasons))


def verdicts(g: GraphFacts, cuda_bits: tuple[int, ...] = CUDA_NBITS, tensorrt: str | None = None) -> list[Verdict]:
    """One verdict per provider (tensorrt, cuda, cpu) for graph ``g``; ``cuda_bits`` and ``tensorrt``
    (a version) come from a device profile when there is one."""
    return [_tensorrt(g, version(tensorrt)), _cuda(g, tuple(cuda_bits)), _cpu(g)]
