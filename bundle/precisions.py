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
# how a variant is stored in ONNX: float initializers, blocked DequantizeLinear + MatMul (QDQ), or
# ORT's MatMulNBits (ONNX has no 2-bit type ORT CPU runs)
FORMATS = {"fp32": "float", "fp16": "float", "int8": "qdq", "int4": "qdq", "int2": "matmulnbits"}
KNOWN_FORMATS = ("float", "qdq", "matmulnbits")
SHORT = {"32": "fp32", "16": "fp16", "8": "int8", "4": "int4", "2": "int2", "0": SKIP}  # ladders: "4/2", "16/4/0"


def highest_first(precisions) -> tuple[str, ...]:
    """``precisions`` in ladder order, duplicates dropped (unknown names are the caller's to refuse)."""
    return tuple(p for p in PRECISIONS if p in set(precisions))
