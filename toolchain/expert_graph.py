"""One ONNX graph per (expert, precision).

An expert is a SwiGLU MLP ``y = down(silu(gate(x)) * up(x))``.

Dimension letters:

* ``T`` - tokens (symbolic graph dimension ``"T"``; T = 1 is decode),
* ``H`` - hidden size (expert input and output width),
* ``I`` - intermediate size,
* ``K`` / ``N`` - in / out features of one projection (gate, up: K = H, N = I;
  down: K = I, N = H),
* ``B`` - quantization block size along K.

Inputs use torch ``Linear`` layout: gate, up ``[I, H]``, down ``[H, I]``.  Graphs use
MatMul "B" layout ``[K, N]`` (the transpose).

Precisions and the ONNX encoding of each projection weight:

* ``fp32``: float32 initializer ``[K, N]`` -> MatMul.
* ``fp16``: float16 initializer -> ``Cast(to=float)`` -> MatMul (ORT CPU folds the Cast
  at session creation; TensorRT handles the pattern natively).
* ``int8`` / ``int4`` (default format ``"qdq"``): uint8 / UINT4 codes ``[K, N]``, float32
  scale ``[nb, N]``, uint8 / UINT4 zero point ``[nb, N]`` ->
  ``DequantizeLinear(axis=0, block_size=B)`` (opset 21 blocked quantization) -> MatMul.
* ``int2`` (default format ``"nbits"``): ORT contrib op ``com.microsoft::MatMulNBits``.
  ``int8``/``int4`` can use it too with ``fmt="nbits"``.

The codes, scales and zero points come from :mod:`dymoe.toolchain.quantizers` (RTN when none are
given); whichever quantizer made them, the graph computes exactly ``x @ dequantize(qm)`` up to float
summation order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dymoe.bundle.precisions import BITS, PRECISIONS

from .blockquant import QuantizedMatrix, dequantize, pack_codes, quantize_rtn
from .onnx_build import IR_VERSION, OPSET
from .transpose import c_order

DEFAULT_FORMAT = {"int8": "qdq", "int4": "qdq", "int2": "nbits"}
FORMATS = ("qdq", "nbits")

MS_DOMAIN = "com.microsoft"

_PROJS = ("gate", "up", "down")


@dataclass
class ExpertQuantStats:
    """Quantization error of one expert at one precision.

    weight_rel_error: ``||W - W_eff||_F / ||W||_F`` over gate, up and down together.
    output_rel_error: ``||y - y_eff|| / ||y||`` on the fixed probe input
        ``default_rng(0).standard_normal((16, H))``, numpy reference forward (not ORT).
    """

    weight_rel_error: float
    output_rel_error: float


def silu(z: np.ndarray) -> np.ndarray:
    # sigmoid(z) = (1 + tanh(z/2)) / 2: no exp overflow for very negative z.
    return z * (np.float32(0.5) * (np.float32(1.0) + np.tanh(np.float32(0.5) * z)))


def reference_forward(x: np.ndarray, gate: np.ndarray, up: np.ndarray,
                      down: np.ndarray) -> np.ndarray:
    """Float32 numpy SwiGLU: ``x [T, H]``, torch-layout weights -> ``y [T, H]``."""
    x = np.asarray(x, dtype=np.float32)
    g = x @ np.asarray(gate, dtype=np.float32).T
    u = x @ np.asarray(up, dtype=np.float32).T
    return ((silu(g) * u) @ np.asarray(down, dtype=np.float32).T).astype(np.float32, copy=False)


@functools.lru_cache(maxsize=4)
def probe_input(H: int) -> np.ndarray:
    """The fixed input used for ``ExpertQuantStats.output_rel_error`` (read-only: made once per H,
    not once per variant)."""
    x = np.random.default_rng(0).standard_normal((16, H)).astype(np.float32)
    x.flags.writeable = False
    return x


def expected_bytes(H: int, I: int, precision: str, block_size: int) -> int:
    """About how many bytes one expert's graph takes on disk at ``precision`` (codes, scales and
    zero points; the graph's own overhead is a few hundred bytes): for disk-space checks."""
    n = 3 * H * I
    if precision not in BITS:
        return n * (4 if precision == "fp32" else 2)
    bits = BITS[precision]
    total = 0
    for K, N in ((H, I), (H, I), (I, H)):
        nb = -(-K // block_size)
        total += nb * block_size * N * bits // 8 + nb * N * 4 + -(-nb * bits // 8) * N
    return total


def _check_precision(precision: str, fmt: str | None) -> str | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision in BITS:
        fmt = DEFAULT_FORMAT[precision] if fmt is None else fmt
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        if fmt == "qdq" and precision == "int2":
            # ONNX has INT2/UINT2 only from opset 25 and ORT CPU has no kernel for it.
            raise ValueError("int2 is only available as fmt='nbits' (MatMulNBits)")
    return fmt


def _check_shapes(gate, up, down) -> tuple[int, int]:
    I, H = gate.shape
    if up.shape != (I, H) or down.shape != (H, I):
        raise ValueError(f"expected gate/up [I, H] and down [H, I], got "
                         f"{gate.shape}, {up.shape}, {down.shape}")
    return H, I


def _effective_kn(w_kn: np.ndarray, precision: str, block_size: int):
    """Return ``(W_eff [K, N] float32, QuantizedMatrix | None)`` for one projection."""
    if precision == "fp32":
        return np.asarray(w_kn, dtype=np.float32), None
    if precision == "fp16":
        return w_kn.astype(np.float16).astype(np.float32), None
    qm = quantize_rtn(w_kn, BITS[precision], block_size)
    return dequantize(qm), qm


def effective_weights(gate, up, down, precision: str, block_size: int):
    """Torch-layout float32 ``(gate, up, down)`` that the graph at ``precision`` computes with
    (dequantized / fp16-rounded weights).  For tests and accuracy studies."""
    _check_precision(precision, None)
    return tuple(_effective_kn(np.asarray(w).T, precision, block_size)[0].T
                 for w in (gate, up, down))


def _probe_reference(gate, up, down, xp: np.ndarray, memo: dict | None) -> tuple[float, np.ndarray]:
    """``||W||^2`` of the three projections and the float expert's output on the probe: the same
    for every variant of an expert, so kept in ``memo`` when there is one."""
    if memo is not None and "probe reference" in memo:
        return memo["probe reference"]
    ws = [np.asarray(w, dtype=np.float32).T for w in (gate, up, down)]  # [K, N] views
    ref2 = sum(float(np.sum(np.square(w), dtype=np.float64)) for w in ws)
    y = reference_forward(xp, gate, up, down)
    if memo is not None:
        memo["probe reference"] = (ref2, y)
    return ref2, y


# ---------------------------------------------------------------------------------------
# Graph building.


def qdq_weight(proj: str, qm: QuantizedMatrix, out: str, make=numpy_helper.from_array):
    """Initializers + DequantizeLinear node producing float ``[K, N]`` named ``out`` (the backbone's
    quantized linears use the very same form, ``backbone_forms.py``). ``make(array, name)`` turns
    arrays into initializers (a graph builder's may keep large ones aside); 4-bit codes are packed here."""
    K, N = qm.K, qm.N
    if qm.bits == 8:
        w = make(c_order(qm.q), f"{proj}_w")
        zp = make(qm.zero_point, f"{proj}_zero_point")
    elif qm.bits == 4:
        # UINT4 raw data: the row-major flattened tensor, two values per byte, element
        # 2i in the low nibble (checked against onnx.numpy_helper.to_array in the tests).
        w = helper.make_tensor(f"{proj}_w", TensorProto.UINT4, [K, N],
                               pack_codes(c_order(qm.q).reshape(-1), 4).tobytes(), raw=True)
        zp = helper.make_tensor(f"{proj}_zero_point", TensorProto.UINT4, list(qm.zero_point.shape),
                                pack_codes(qm.zero_point.reshape(-1), 4).tobytes(), raw=True)
    else:
        raise ValueError(f"QDQ format supports 8 and 4 bits, got {qm.bits}")
    scale = make(qm.scale, f"{proj}_scale")
    node = helper.make_node("DequantizeLinear", [w.name, scale.name, zp.name], [out],
                            name=f"{proj}_dequant", axis=0, block_size=qm.block_size)
    return [w, scale, zp], node


def nbits_matmul(proj: str, qm: QuantizedMatrix, a: str, out: str, accuracy_level: int,
                 make=numpy_helper.from_array):
    """Initializers + ``com.microsoft::MatMulNBits`` node computing ``out = a @ W``; ``make(array, name)``
    as in :func:`qdq_weight`.

    Layout (ORT contrib op spec):
      B           uint8 [N, nb, B*bits/8]: column n, block kb, codes along K packed
                  low bits first (K zero-padded up to nb*B; padding uses the zero point
                  so it dequantizes to 0 - the kernel never reads it anyway).
      scales      float32 [N, nb].
      zero_points uint8 [N, ceil(nb*bits/8)]: per column, packed low bits first, each
                  column padded to a whole byte.
    """
    K, N, B, bits = qm.K, qm.N, qm.block_size, qm.bits
    nb = qm.n_blocks
    codes_nk = c_order(qm.q.T)  # [N, K]; no copy when the codes were laid out that way (vocab_rows.py)
    if nb * B > K:  # K padded to nb*B
        codes_nk = np.concatenate([codes_nk, np.repeat(qm.zero_point[-1][:, None], nb * B - K, axis=1)], axis=1)
    packed_b = pack_codes(codes_nk.reshape(N, nb, B), bits)
    del codes_nk
    w = make(packed_b, f"{proj}_w")
    scale = make(c_order(qm.scale.T), f"{proj}_scale")
    zp = make(pack_codes(c_order(qm.zero_point.T), bits), f"{proj}_zero_point")
    attrs = dict(K=K, N=N, bits=bits, block_size=B)
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    node = helper.make_node("MatMulNBits", [a, w.name, scale.name, zp.name], [out],
                            name=f"{proj}_matmul", domain=MS_DOMAIN, **attrs)
    return [w, scale, zp], node


def weight_kn(w_torch: np.ndarray, memo: dict | None = None) -> np.ndarray:
    """A torch weight ``[N, K]`` as the contiguous float32 ``[K, N]`` MatMul weight, copied in
    cache-sized strips; kept in ``memo`` (one dict per matrix) for the expert's other variants."""
    if memo is not None and "kn" in memo:
        return memo["kn"]
    w_kn = c_order(np.asarray(w_torch, dtype=np.float32).T)
    if memo is not None:
        memo["kn"] = w_kn
    return w_kn


def _projection(proj: str, w_kn: np.ndarray, precision: str, fmt: str | None,
                block_size: int, a: str, out: str, accuracy_level: int, qm: QuantizedMatrix | None = None):
    """Encode one projection ``out = a @ w_kn`` (``w_kn`` float32 ``[K, N]``, contiguous).

    Returns ``(initializers, nodes, W_eff [K, N] float32)``; ``W_eff`` is what the graph
    multiplies by (used for the error statistics, then dropped by the caller).
    """
    mm = f"{proj}_matmul"
    if precision == "fp32":
        init = numpy_helper.from_array(w_kn, f"{proj}_w")
        return [init], [helper.make_node("MatMul", [a, init.name], [out], name=mm)], w_kn
    if precision == "fp16":
        w16 = w_kn.astype(np.float16)
        init = numpy_helper.from_array(w16, f"{proj}_w")
        cast = helper.make_node("Cast", [init.name], [f"{proj}_w_f32"], name=f"{proj}_cast",
                                to=TensorProto.FLOAT)
        node = helper.make_node("MatMul", [a, f"{proj}_w_f32"], [out], name=mm)
        return [init], [cast, node], w16.astype(np.float32)
    if qm is None:
        qm = quantize_rtn(w_kn, BITS[precision], block_size)
    elif (qm.K, qm.N, qm.bits, qm.block_size) != (*w_kn.shape, BITS[precision], block_size):
        raise ValueError(f"{proj}: quantized matrix is {qm.bits}-bit {qm.K}x{qm.N} block {qm.block_size}, "
                         f"expected {BITS[precision]}-bit {w_kn.shape[0]}x{w_kn.shape[1]} block {block_size}")
    if fmt == "qdq":
        inits, dq = qdq_weight(proj, qm, f"{proj}_w_dq")
        nodes = [dq, helper.make_node("MatMul", [a, f"{proj}_w_dq"], [out], name=mm)]
    else:
        inits, node = nbits_matmul(proj, qm, a, out, accuracy_level)
        nodes = [node]
    return inits, nodes, dequantize(qm)


def build_expert_model(gate: np.ndarray, up: np.ndarray, down: np.ndarray, precision: str,
                       block_size: int, name: str = "expert", *, fmt: str | None = None,
                       accuracy_level: int = 4, quantized: dict[str, QuantizedMatrix] | None = None,
                       memo: dict | None = None) -> tuple[onnx.ModelProto, ExpertQuantStats]:
    """Build the ONNX model ``x [T, H] -> y [T, H]`` of one expert at ``precision``.

    ``fmt`` picks the encoding of int8/int4 (``"qdq"`` default, or ``"nbits"``); int2 is
    always ``"nbits"``.  ``accuracy_level`` is the MatMulNBits attribute (4 = int8
    activations compute on CPU, 0 = omit the attribute, i.e. float compute); it only
    matters for the nbits format.  ``block_size`` is ignored for fp32/fp16.  ``quantized`` gives
    the ``[K, N]`` codes of ``"gate"``, ``"up"`` and ``"down"`` made by another quantizer (RTN if
    omitted); it must match ``precision`` and ``block_size``. ``memo``: a dict kept for this
    expert's weights across its variants, which then share the float reference of the statistics.
    """
    fmt = _check_precision(precision, fmt)
    H, I = _check_shapes(gate, up, down)
    if precision in BITS and fmt == "nbits" and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"MatMulNBits needs a power-of-two block_size >= 16, got {block_size}")

    # Probe activations for output_rel_error, computed projection by projection so that
    # only one effective weight matrix is alive at a time.
    xp = probe_input(H)
    ref2, y = _probe_reference(gate, up, down, xp, memo)
    inits, proj_nodes, acts = [], {}, {}
    err2 = 0.0
    for proj, w, a, out in (("gate", gate, "x", "gate"), ("up", up, "x", "up"),
                            ("down", down, "h", "y")):
        w_kn = weight_kn(w, None if memo is None else memo.setdefault(proj, {}))
        i, n, w_eff = _projection(proj, w_kn, precision, fmt, block_size, a, out, accuracy_level,
                                  (quantized or {}).get(proj))
        inits += i
        proj_nodes[proj] = n
        if precision != "fp32":
            diff = np.subtract(w_kn, w_eff)
            np.square(diff, out=diff)
            err2 += float(diff.sum(dtype=np.float64))
            del diff
        acts[proj] = (xp if proj != "down" else acts["h"]) @ w_eff
        del w_eff
        if proj == "up":
            acts["h"] = silu(acts["gate"]) * acts["up"]

    # silu(g) = g * sigmoid(g) as Sigmoid + Mul: ORT CPU fuses the pair into one
    # QuickGelu(alpha=1) kernel; TensorRT fuses the pointwise chain.
    act = [
        helper.make_node("Sigmoid", ["gate"], ["gate_sigmoid"], name="gate_sigmoid"),
        helper.make_node("Mul", ["gate", "gate_sigmoid"], ["gate_silu"], name="gate_silu"),
        helper.make_node("Mul", ["gate_silu", "up"], ["h"], name="swiglu_mul"),
    ]
    nodes = proj_nodes["gate"] + proj_nodes["up"] + act + proj_nodes["down"]

    graph = helper.make_graph(
        nodes, name,
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", OPSET)]
    if any(n.domain == MS_DOMAIN for n in nodes):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="dymoe.toolchain")
    model.ir_version = IR_VERSION
    model.doc_string = f"SwiGLU expert H={H} I={I} precision={precision}" + (
        f" block_size={block_size} format={fmt}" if precision in BITS else "")

    if precision == "fp32":
        stats = ExpertQuantStats(weight_rel_error=0.0, output_rel_error=0.0)
    else:
        y_eff = acts["down"]
        stats = ExpertQuantStats(
            weight_rel_error=float(np.sqrt(err2 / ref2)) if ref2 > 0 else 0.0,
            output_rel_error=float(np.linalg.norm(y - y_eff) / max(np.linalg.norm(y), 1e-30)),
        )
    return model, stats
