"""How the backbone's weights are stored at each ``--backbone-precision`` (``bundle.precisions``).

The backbone is everything resident outside the routed experts: embeddings, the layer graphs
(attention, norms, routing, shared experts, dense MLPs) and the LM head. At float32 it is 1.5 B
parameters for Qwen3-30B-A3B, more than a third of a 16 GB board, so its large matrices take the
experts' forms:

* a **linear weight** of a layer (a ``MatMul`` whose second input is a 2-D float32 initializer:
  attention projections, shared experts, dense MLPs) is ``fp32`` MatMul, ``fp16`` initializer ->
  Cast -> MatMul, or ``int8`` / ``int4`` blocked ``DequantizeLinear`` -> MatMul: the experts' QDQ
  form (``expert_graph.qdq_weight``), which ONNX Runtime's CPU provider fuses into MatMulNBits and
  whose codes the export's data-free quantizer (rtn or hqq) chooses. For ``--target tensorrt`` an int8
  one is ORT's MatMulNBits itself (``expert_graph.nbits_matmul``): the CUDA provider that runs the
  backbone on a Jetson fuses only 4-bit QDQ (``bundle.precisions.BACKBONE_FORMATS``);
* the **LM head** takes the same forms, at most int8 (``bundle.precisions.VOCAB_OF``);
* the **embedding table** is ``fp32``, ``fp16`` (Gather, then Cast of the T rows) or ``int8``:
  the codes, scales and zero points of the T rows asked for are gathered and only those rows are
  dequantized (blocks along the hidden axis), so the table stays int8 in memory;
* **float32 stays**: norms, biases, rotary tables, the routers (``FLOAT_LINEARS``: a layer must pick
  exactly the experts its float router graph predicts) and MLA's per-head absorbed ``kv_b`` (3-D).

Layer graphs are built in float32 by the architecture's code and rewritten here
(:func:`quantize_linears`), so no architecture file knows about precisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dymoe.bundle.precisions import BACKBONE_FORMATS, BITS, VOCAB_OF

from .blockquant import QuantizedMatrix, dequantize, quantize_rtn
from .expert_graph import MS_DOMAIN, nbits_matmul, qdq_weight
from .hqq import quantize_hqq
from .onnx_build import FLOAT, GraphBuilder
from .transpose import c_order
from .vocab_rows import VocabRows, quantize_vocab

# MatMul weights (initializer names, as the blocks name them) that stay float32 at every precision
FLOAT_LINEARS = ("router", "shared_gate")
ACCURACY_LEVEL = 4  # of a MatMulNBits node: int8 activations, what ORT's CPU fusion of QDQ uses too


@dataclass(frozen=True)
class BackboneForm:
    """One backbone precision, with the block size and data-free quantizer of its integer codes."""

    precision: str = "fp32"
    block_size: int = 32
    quantizer: str = "hqq"  # rtn | hqq
    target: str = "ort"  # the export's --target: which integer forms (BACKBONE_FORMATS)

    @property
    def embedding(self) -> str:
        return VOCAB_OF[self.precision]

    @property
    def lm_head(self) -> str:
        return VOCAB_OF[self.precision]

    @property
    def quantized(self) -> bool:
        return any(p in BITS for p in (self.precision, self.embedding, self.lm_head))

    @property
    def formats(self) -> dict[str, str]:
        """The form of each integer precision of a linear (manifest ``backbone.formats``)."""
        return {p: BACKBONE_FORMATS[self.target][p] for p in (self.precision, self.lm_head) if p in BITS}


def bytes_per_weight(precision: str, block_size: int) -> float:
    """Bytes one weight of a linear takes at ``precision``: codes plus each block's float32 scale and
    zero point of the code width (for size estimates)."""
    if precision not in BITS:
        return {"fp32": 4.0, "fp16": 2.0}[precision]
    bits = BITS[precision]
    return (bits + (32 + bits) / block_size) / 8


def quantize_matrix(w_kn: np.ndarray, bits: int, form: BackboneForm) -> QuantizedMatrix:
    """Codes of ``w_kn`` ``[K, N]`` (blocks along K) chosen by the form's quantizer."""
    if form.quantizer == "hqq":
        return quantize_hqq(w_kn, bits, form.block_size)
    return quantize_rtn(w_kn, bits, form.block_size)


def _is_float_linear(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in FLOAT_LINEARS)


def _encode(node: onnx.NodeProto, w_kn: np.ndarray, precision: str, form: BackboneForm):
    """Initializers and nodes computing the ``MatMul`` ``node`` (input 1 its weight) at ``precision``."""
    name = node.input[1]
    if precision == "fp16":
        init = numpy_helper.from_array(np.ascontiguousarray(w_kn, dtype=np.float16), f"{name}_fp16")
        return [init], [helper.make_node("Cast", [init.name], [name], name=f"{name}_cast", to=TensorProto.FLOAT), node]
    qm = quantize_matrix(w_kn, BITS[precision], form)
    if form.formats[precision] == "matmulnbits":
        inits, nbits = nbits_matmul(name, qm, node.input[0], node.output[0], ACCURACY_LEVEL)
        return inits, [nbits]
    inits, dq = qdq_weight(name, qm, name)  # the dequantized weight takes the initializer's name
    return inits, [dq, node]


def quantize_linears(model: onnx.ModelProto, form: BackboneForm) -> onnx.ModelProto:
    """Rewrite, in place, every linear of a float32 layer graph into ``form``'s precision: each MatMul
    whose only weight use it is keeps its input and output names, so the rest of the graph is as built."""
    if form.precision == "fp32":
        return model
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node.op_type, i))
    linear = {name for name, t in inits.items()
              if len(t.dims) == 2 and t.data_type == TensorProto.FLOAT and not _is_float_linear(name)
              and uses.get(name) == [("MatMul", 1)]}
    if not linear:
        return model
    taken = set(inits) | {o for n in g.node for o in n.output}
    nodes = []
    for node in g.node:
        if node.op_type != "MatMul" or node.input[1] not in linear:
            nodes.append(node)
            continue
        t_inits, t_nodes = _encode(node, numpy_helper.to_array(inits[node.input[1]]), form.precision, form)
        clash = {t.name for t in t_inits} & taken
        if clash:
            raise ValueError(f"initializer names {sorted(clash)} already exist in {g.name}")
        g.initializer.remove(inits[node.input[1]])
        g.initializer.extend(t_inits)
        nodes += t_nodes  # a weight's nodes read initializers only: placed before their MatMul, still topological
    del g.node[:]
    g.node.extend(nodes)
    if any(n.domain == MS_DOMAIN for n in nodes) and all(o.domain != MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def head_logits(g: GraphBuilder, x: str, lm_head: np.ndarray | VocabRows, form: BackboneForm) -> str:
    """``x [T, H] @ lm_head.T`` for the ``[V, H]`` LM head, the largest backbone matrix (read a slab of
    rows at a time when it is a ``VocabRows``)."""
    if form.lm_head in ("fp32", "fp16"):
        # Gemm with transB keeps the [V, H] weight as stored: no transposed copy during export
        dtype = np.float32 if form.lm_head == "fp32" else np.float16
        w = g.init("lm_head", np.asarray(lm_head, dtype=dtype))
        if form.lm_head == "fp16":
            w = g.op("Cast", [w], to=FLOAT)
        return g.op("Gemm", [x, w], transB=1)
    nbits = form.formats[form.lm_head] == "matmulnbits"
    # MatMulNBits stores the weight [N, K] = [V, H], the table's own rows; DequantizeLinear [K, N]
    qm = quantize_vocab(lm_head, lambda w: quantize_matrix(w, BITS[form.lm_head], form), rows_major=nbits)
    if nbits:
        inits, node = nbits_matmul("lm_head", qm, x, g.fresh("lm_head_matmul"), ACCURACY_LEVEL, make=g.tensor)
    else:
        inits, dq = qdq_weight("lm_head", qm, "lm_head_dq", make=g.tensor)
        g.nodes.append(dq)
        node = helper.make_node("MatMul", [x, "lm_head_dq"], [g.fresh("matmul")], name=g.fresh("n_MatMul"))
    del qm  # the graph builder holds the codes now (aside, when vocabulary-sized)
    g.inits += inits
    g.nodes.append(node)
    return node.output[0]


def gather_rows(g: GraphBuilder, embed: np.ndarray | VocabRows, ids: str, form: BackboneForm) -> str:
    """Rows ``ids`` of the ``[V, H]`` embedding table as float32 ``[T, H]``."""
    if form.embedding == "fp32":
        return g.op("Gather", [g.init("embed", np.asarray(embed, dtype=np.float32)), ids], axis=0)
    if form.embedding == "fp16":
        rows = g.op("Gather", [g.init("embed_fp16", np.asarray(embed, dtype=np.float16)), ids], axis=0)
        return g.op("Cast", [rows], to=FLOAT)
    # int8: blocks run along H within each row (quantized as the [H, V] matrix, one column per token)
    qm = quantize_vocab(embed, lambda w: quantize_matrix(w, BITS[form.embedding], form), rows_major=True)
    table = {"embed_codes": qm.q.T, "embed_scale": qm.scale.T, "embed_zero_point": qm.zero_point.T}
    rows = {k: g.op("Gather", [g.init(k, c_order(v)), ids], axis=0) for k, v in table.items()}
    return g.op("DequantizeLinear", [rows["embed_codes"], rows["embed_scale"], rows["embed_zero_point"]],
                axis=1, block_size=qm.block_size)


def effective_embedding(embed: np.ndarray, form: BackboneForm) -> np.ndarray:
    """The float32 table the embedding graph of ``form`` reads from (tests and accuracy studies)."""
    if form.embedding == "fp32":
        return np.asarray(embed, dtype=np.float32)
    if form.embedding == "fp16":
        return np.asarray(embed, dtype=np.float16).astype(np.float32)
    return dequantize(quantize_matrix(np.asarray(embed).T, BITS[form.embedding], form)).T
