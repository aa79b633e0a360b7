"""The precision ladder, declared once: names, order, bits, ONNX form and short names.

An expert variant is stored at one of these precisions; ``skip`` is the runtime's extra step
below the lowest (the expert is not run). A higher rank serves a request for a lower one.
"""

from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "int8", "int4", "int2")  # highest first
FLOAT = ("fp32", "fp16")
BITS = {"int8": 8, "int4": 4, "int2": 2}  # integer precisions and their code width
SKIP = "skip"
RANK = {"fp32": 5, "fp16": 4, "int8": 3, "int4": 2, "int2": 1, SKIP: 0}
# How a variant is stored in ONNX (manifest ``quantization.formats``, one per precision), so that the
# checker and the runtime never guess from a name:
#   float              float initializers -> MatMul (fp16 ones are Cast to float32 first)
#   qdq                blocked DequantizeLinear (opset 21; UINT8 / UINT4 codes, float32 scales, zero
#                      points) -> MatMul: asymmetric, --block-size (32)
#   matmulnbits        ORT's com.microsoft::MatMulNBits (ONNX has no 2-bit type ORT runs)
#   float16            fp16 weights and fp16 arithmetic inside; float32 in and out
#   qdq_sym_int4_fp16  signed INT4 codes, no zero point, fp16 scales, blocks of 128 (64 where a
#                      projection's input features are not a multiple of 128) -> MatMul in fp16;
#                      float32 in and out: the form TensorRT's INT4 weight-only GEMM takes
FORMATS = {"fp32": "float", "fp16": "float", "int8": "qdq", "int4": "qdq", "int2": "matmulnbits"}
# dymoe export --target tensorrt: TensorRT runs fp32, fp16 and int4; int8 and int2 are MatMulNBits
# for ONNX Runtime's CUDA provider (TensorRT has neither INT8 weight-only nor a 2-bit type)
TENSORRT_FORMATS = {"fp32": "float", "fp16": "float16", "int8": "matmulnbits", "int4": "qdq_sym_int4_fp16",
                    "int2": "matmulnbits"}
EXPORT_TARGETS = {"ort": FORMATS, "tensorrt": TENSORRT_FORMATS}  # dymoe export --target
KNOWN_FORMATS = ("float", "qdq", "matmulnbits", "float16", "qdq_sym_int4_fp16")
FORMAT_PRECISIONS = {"float": FLOAT, "float16": ("fp16",), "qdq": ("int8", "int4"), "matmulnbits": tuple(BITS),
                     "qdq_sym_int4_fp16": ("int4",)}  # which precisions each format can hold
SHORT = {"32": "fp32", "16": "fp16", "8": "int8", "4": "int4", "2": "int2", "0": SKIP}  # ladders: "4/2", "16/4/0"


def highest_first(precisions) -> tuple[str, ...]:
    """``precisions`` in ladder order, duplicates dropped (unknown names are the caller's to refuse)."""
    return tuple(p for p in PRECISIONS if p in set(precisions))


# The backbone (``dymoe export --backbone-precision``): one precision for the linear weights of its
# layers (attention, shared experts, dense MLPs), stored in the portable forms above (float, or QDQ
# that ONNX Runtime fuses into MatMulNBits). The vocabulary matrices (embedding table, LM head) stop
# at int8: a Gather reads no 4-bit type, and an int4 LM head cost the demo model 8x the perplexity of
# int4 layers (README "Backbone precision"). Norms, biases and routers stay float32: they are small,
# and a router must pick the same experts as the look-ahead predictor's float copy.
BACKBONE_PRECISIONS = ("fp32", "fp16", "int8", "int4")
VOCAB_PRECISIONS = ("fp32", "fp16", "int8")  # embedding table and LM head
VOCAB_OF = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "int8"}
# The form of the backbone's integer linears (manifest ``backbone.formats``). The backbone runs on ONNX
# Runtime (CPU or CUDA provider), never TensorRT. Portable QDQ is fused into MatMulNBits by the CPU
# provider at both widths, by the CUDA provider at 4 bits only; so the export for a Jetson
# (--target tensorrt) writes int8 as MatMulNBits, which the CUDA provider runs, rather than leave a
# DequantizeLinear to expand every weight each step (the LM head: 1.2 GB of float32 per token).
BACKBONE_FORMATS = {"ort": {"int8": "qdq", "int4": "qdq"}, "tensorrt": {"int8": "matmulnbits", "int4": "qdq"}}
