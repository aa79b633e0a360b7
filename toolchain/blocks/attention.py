"""Grouped-query attention with a KV cache (Mixtral, Qwen2/3-MoE, OLMoE), and the causal mask
every attention block here shares.

The maths follows transformers in float32: q/k/v projections (optional bias, optional clip),
optional RMSNorm on q and k (per head, Qwen3; or over all heads before the split, OLMoE),
rotary embedding, attention over the cache plus the new tokens without repeating K/V, the
output projection. The cache is ``[K, S, D]`` per key and value.

Dimension letters: T new tokens, P cached, S = P + T, H hidden, K kv heads, G = heads / K,
D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..onnx_build import GraphBuilder
from .rope import apply_rope, rope_cos_sin, rope_spec

QK_NORMS = ("none", "head", "full")


@dataclass(frozen=True)
class GqaConfig:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: dict  # {"rope_parameters": standardised rope params, "max_position_embeddings": N}
    rms_norm_eps: float
    qk_norm: str = "none"  # "head": RMSNorm per head (Qwen3); "full": over all heads (OLMoE)
    clip_qkv: float | None = None  # clamp q, k, v projections to +-clip_qkv (OLMoE option)
    bias: bool = False  # q/k/v projections carry biases (Qwen2-MoE)
    sliding_window: int | None = None


def cache_shapes(cfg: GqaConfig) -> dict[str, tuple[int, int]]:
    return {"key": (cfg.num_kv_heads, cfg.head_dim), "value": (cfg.num_kv_heads, cfg.head_dim)}


def weight_shapes(cfg: GqaConfig, hidden: int) -> dict[str, tuple[int, ...]]:
    """Canonical attention tensors (torch Linear layout) and their shapes."""
    Q, KV = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"q": (Q, hidden), "k": (KV, hidden), "v": (KV, hidden), "o": (hidden, Q)}
    if cfg.bias:
        shapes |= {"q_bias": (Q,), "k_bias": (KV,), "v_bias": (KV,)}
    if cfg.qk_norm == "head":
        shapes |= {"q_norm": (cfg.head_dim,), "k_norm": (cfg.head_dim,)}
    elif cfg.qk_norm == "full":
        shapes |= {"q_norm": (Q,), "k_norm": (KV,)}
    return shapes


def masked(g: GraphBuilder, scores: str, positions: str, keys: str, window: int | None = None) -> str:
    """Causal mask from positions: key j ([..., S, ...] on axis 1 of ``keys``) is visible to the query
    at position p iff j <= p (and p - j < window); invisible scores become float32's minimum."""
    s_len = g.op("Gather", [g.op("Shape", [keys]), g.const(1)], axis=0)
    key_pos = g.op("Range", [g.const(0), s_len, g.const(1)])  # [S]
    q_col = g.op("Unsqueeze", [positions, g.const([1])])  # [T, 1]
    visible = g.op("LessOrEqual", [key_pos, q_col])  # [T, S]
    if window:
        near = g.op("Less", [g.op("Sub", [q_col, key_pos]), g.const(window)])
        visible = g.op("And", [visible, near])
    return g.op("Where", [visible, scores, g.const(np.finfo(np.float32).min, np.float32)])


def gqa_attention(g: GraphBuilder, x: str, positions: str, past: dict[str, str], w: dict, cfg: GqaConfig,
                  prefix: str = "attn") -> dict[str, str]:
    """Attention of the input-normed hidden x [T, H]; ``past`` holds ``key`` and ``value`` [K, P, D].
    Returns names: ``present_key``, ``present_value`` [K, S, D], ``attn_out`` [T, H] (after o),
    ``attn_colsum`` [S] (attention probabilities summed over heads and query rows)."""
    NH, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = NH // K
    proj = {}
    for n in ("q", "k", "v"):
        y = g.linear(x, w[n], f"{prefix}.{n}", w.get(f"{n}_bias") if cfg.bias else None)
        if cfg.clip_qkv is not None:
            c = cfg.clip_qkv
            y = g.op("Clip", [y, g.const(-c, np.float32), g.const(c, np.float32)])
        proj[n] = y
    if cfg.qk_norm == "full":  # OLMoE: norm over all heads before the split
        proj["q"] = g.rms_norm(proj["q"], w["q_norm"], cfg.rms_norm_eps, f"{prefix}.q_norm")
        proj["k"] = g.rms_norm(proj["k"], w["k_norm"], cfg.rms_norm_eps, f"{prefix}.k_norm")

    def heads(y: str, n_heads: int) -> str:  # [T, n*D] -> [n, T, D]
        return g.op("Transpose", [g.op("Reshape", [y, g.const([-1, n_heads, D])])], perm=[1, 0, 2])

    q, k, v = heads(proj["q"], NH), heads(proj["k"], K), heads(proj["v"], K)
    if cfg.qk_norm == "head":  # Qwen3: norm per head over D
        q = g.rms_norm(q, w["q_norm"], cfg.rms_norm_eps, f"{prefix}.q_norm")
        k = g.rms_norm(k, w["k_norm"], cfg.rms_norm_eps, f"{prefix}.k_norm")
    cos, sin = rope_cos_sin(g, positions, rope_spec(cfg.rope, D))
    q, k = apply_rope(g, q, cos, sin, "half"), apply_rope(g, k, cos, sin, "half")
    k_all = g.op("Concat", [past["key"], k], axis=1)  # [K, S, D]
    v_all = g.op("Concat", [past["value"], v], axis=1)

    # grouped-query attention without repeating K/V: q [K, G, T, D] against k [K, 1, D, S]
    qg = g.op("Reshape", [q, g.const([K, G, -1, D])])
    kt = g.op("Unsqueeze", [g.op("Transpose", [k_all], perm=[0, 2, 1]), g.const([1])])
    scores = g.op("Mul", [g.op("MatMul", [qg, kt]), g.const(1.0 / np.sqrt(D), np.float32)])  # [K, G, T, S]
    probs = g.op("Softmax", [masked(g, scores, positions, k_all, cfg.sliding_window)], axis=-1)
    ctx = g.op("MatMul", [probs, g.op("Unsqueeze", [v_all, g.const([1])])])  # [K, G, T, D]
    ctx = g.op("Reshape", [ctx, g.const([NH, -1, D])])
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[1, 0, 2]), g.const([-1, NH * D])])
    return {"present_key": k_all, "present_value": v_all, "attn_out": g.matmul_t(ctx, w["o"], f"{prefix}.o"),
            "attn_colsum": g.op("ReduceSum", [probs, g.const([0, 1, 2])], keepdims=0)}
