"""ONNX graphs for everything but the routed experts: embeddings, one graph per layer
(attention with KV cache, router, shared expert), and the final norm with the LM head.

The math follows transformers' Mixtral/Qwen/OLMoE modules in float32: RMSNorm, rotary
embedding (default rope), grouped-query attention with a causal (optionally sliding-window)
mask built from ``position_ids``, then the post-attention RMSNorm that feeds router and experts.
Dimension letters: T new tokens, P cached, S = P + T, H hidden, K kv heads, G = heads / K,
D head_dim, E experts, V vocabulary.
"""

from __future__ import annotations

import numpy as np
import onnx

from dymoe.bundle import graph_io as io
from dymoe.bundle.manifest import ModelSpec

from .onnx_build import FLOAT, INT64, GraphBuilder

Tensors = dict[str, np.ndarray]  # canonical name (without "layers.{l}.") -> float32 array


def embed_graph(embed: np.ndarray) -> onnx.ModelProto:
    g = GraphBuilder("dymoe_embed")
    ids = g.input(io.EMBED_IN_IDS, INT64, ["T"])
    out = g.op("Gather", [g.init("embed", embed.astype(np.float32)), ids], axis=0)
    g.output(out, io.EMBED_OUT, FLOAT, ["T", embed.shape[1]])
    return g.model()


def head_graph(spec: ModelSpec, final_norm: np.ndarray, lm_head: np.ndarray) -> onnx.ModelProto:
    g = GraphBuilder("dymoe_head")
    x = g.input(io.HEAD_IN, FLOAT, ["T", spec.hidden_size])
    x = g.rms_norm(x, final_norm, spec.rms_norm_eps, "final_norm")
    # Gemm with transB keeps the [V, H] weight as stored: no transposed copy of the largest
    # backbone tensor during export
    logits = g.op("Gemm", [x, g.init("lm_head", np.asarray(lm_head, dtype=np.float32))], transB=1)
    g.output(logits, io.HEAD_OUT, FLOAT, ["T", spec.vocab_size])
    return g.model()


def rope_inv_freq(spec: ModelSpec) -> np.ndarray:
    # as transformers' default rope: base ** (arange(0, D, 2) / D) in float32
    d = spec.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    return (1.0 / (np.float32(spec.rope_theta) ** exponent)).astype(np.float32)


def layer_graph(spec: ModelSpec, t: Tensors, layer: int) -> onnx.ModelProto:
    H, D, K = spec.hidden_size, spec.head_dim, spec.num_kv_heads
    NH = spec.num_heads
    G = NH // K
    g = GraphBuilder(f"dymoe_layer_{layer}")
    hidden = g.input(io.LAYER_IN_HIDDEN, FLOAT, ["T", H])
    pos = g.input(io.LAYER_IN_POSITIONS, INT64, ["T"])
    past_k = g.input(io.LAYER_IN_PAST_KEY, FLOAT, [K, "P", D])
    past_v = g.input(io.LAYER_IN_PAST_VALUE, FLOAT, [K, "P", D])

    x = g.rms_norm(hidden, t["attn_norm"], spec.rms_norm_eps, "attn_norm")
    proj = {}
    for n in ("q", "k", "v"):
        y = g.matmul_t(x, t[n], n)
        if spec.attention_bias:
            y = g.op("Add", [y, g.init(f"{n}_bias", t[f"{n}_bias"])])
        if spec.clip_qkv is not None:
            c = spec.clip_qkv
            y = g.op("Clip", [y, g.const(-c, np.float32), g.const(c, np.float32)])
        proj[n] = y
    if spec.qk_norm == "full":  # OLMoE: norm over all heads before the split
        proj["q"] = g.rms_norm(proj["q"], t["q_norm"], spec.rms_norm_eps, "q_norm")
        proj["k"] = g.rms_norm(proj["k"], t["k_norm"], spec.rms_norm_eps, "k_norm")

    def heads(y: str, n_heads: int) -> str:  # [T, n*D] -> [n, T, D]
        return g.op("Transpose", [g.op("Reshape", [y, g.const([-1, n_heads, D])])], perm=[1, 0, 2])

    q, k, v = heads(proj["q"], NH), heads(proj["k"], K), heads(proj["v"], K)
    if spec.qk_norm == "head":  # Qwen3: norm per head over D
        q = g.rms_norm(q, t["q_norm"], spec.rms_norm_eps, "q_norm")
        k = g.rms_norm(k, t["k_norm"], spec.rms_norm_eps, "k_norm")

    # rotary embedding: cos/sin [T, D] from positions, rotate_half on the two halves of D
    pos_f = g.op("Cast", [pos], to=FLOAT)
    freqs = g.op("Mul", [g.op("Unsqueeze", [pos_f, g.const([1])]), g.init("inv_freq", rope_inv_freq(spec)[None, :])])
    emb = g.op("Concat", [freqs, freqs], axis=-1)
    cos, sin = g.op("Cos", [emb]), g.op("Sin", [emb])

    def rope(y: str) -> str:
        first = g.op("Slice", [y, g.const([0]), g.const([D // 2]), g.const([-1])])
        second = g.op("Slice", [y, g.const([D // 2]), g.const([D]), g.const([-1])])
        rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
        return g.op("Add", [g.op("Mul", [y, cos]), g.op("Mul", [rotated, sin])])

    q, k = rope(q), rope(k)
    k_all = g.op("Concat", [past_k, k], axis=1, out=io.LAYER_OUT_PRESENT_KEY)  # [K, S, D]
    v_all = g.op("Concat", [past_v, v], axis=1, out=io.LAYER_OUT_PRESENT_VALUE)

    # grouped-query attention without repeating K/V: q [K, G, T, D] against k [K, 1, D, S]
    qg = g.op("Reshape", [q, g.const([K, G, -1, D])])
    kt = g.op("Unsqueeze", [g.op("Transpose", [k_all], perm=[0, 2, 1]), g.const([1])])
    scores = g.op("Mul", [g.op("MatMul", [qg, kt]), g.const(1.0 / np.sqrt(D), np.float32)])  # [K, G, T, S]

    # mask: key j is visible to query at position p iff j <= p (and p - j < window)
    s_len = g.op("Gather", [g.op("Shape", [k_all]), g.const(1)], axis=0)
    key_pos = g.op("Range", [g.const(0), s_len, g.const(1)])  # [S]
    q_col = g.op("Unsqueeze", [pos, g.const([1])])  # [T, 1]
    visible = g.op("LessOrEqual", [key_pos, q_col])  # [T, S]
    if spec.sliding_window:
        near = g.op("Less", [g.op("Sub", [q_col, key_pos]), g.const(spec.sliding_window)])
        visible = g.op("And", [visible, near])
    neg = g.const(np.finfo(np.float32).min, np.float32)
    scores = g.op("Where", [visible, scores, neg])
    probs = g.op("Softmax", [scores], axis=-1)
    ctx = g.op("MatMul", [probs, g.op("Unsqueeze", [v_all, g.const([1])])])  # [K, G, T, D]
    ctx = g.op("Reshape", [ctx, g.const([NH, -1, D])])
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[1, 0, 2]), g.const([-1, NH * D])])
    residual = g.op("Add", [hidden, g.matmul_t(ctx, t["o"], "o")])

    colsum = g.op("ReduceSum", [probs, g.const([0, 1, 2])], keepdims=0)  # [S]
    router_in = g.rms_norm(residual, t["ffn_norm"], spec.rms_norm_eps, "ffn_norm")
    logits = g.matmul_t(router_in, t["router"], "router")

    g.output(residual, io.LAYER_OUT_RESIDUAL, FLOAT, ["T", H])
    g.output(router_in, io.LAYER_OUT_ROUTER_INPUT, FLOAT, ["T", H])
    g.output(logits, io.LAYER_OUT_ROUTER_LOGITS, FLOAT, ["T", spec.num_experts])
    g.output(k_all, io.LAYER_OUT_PRESENT_KEY, FLOAT, [K, "S", D])
    g.output(v_all, io.LAYER_OUT_PRESENT_VALUE, FLOAT, [K, "S", D])
    g.output(colsum, io.LAYER_OUT_ATTN_COLSUM, FLOAT, ["S"])
    g.output(x, io.LAYER_OUT_ATTN_INPUT, FLOAT, ["T", H])
    if spec.shared_intermediate_size:
        shared = g.swiglu(router_in, t["shared.gate"], t["shared.up"], t["shared.down"], "shared")
        if spec.shared_expert_gate:
            gate = g.op("Sigmoid", [g.matmul_t(router_in, t["shared_gate"], "shared_gate")])  # [T, 1]
            shared = g.op("Mul", [shared, gate])
        g.output(shared, io.LAYER_OUT_SHARED, FLOAT, ["T", H])
    return g.model()
