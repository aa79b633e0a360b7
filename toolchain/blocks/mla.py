"""DeepSeek Multi-head Latent Attention (MLA) with a compressed KV cache, as an ONNX graph piece.

Matches transformers' DeepseekV2Attention / DeepseekV3Attention (5.24), which also cache the
compressed latent: the cache holds only the kv_a_layernorm-ed latent c [S, r] and the rotated
shared rope key k_pe [S, dr] -- never per-head keys or values.

Weight-absorbed form (exact in real arithmetic, since kv_b_proj has no bias):
    k_nope[h] = c @ W_uk[h].T  =>  q_nope[h] . k_nope[h]  = (q_nope[h] @ W_uk[h]) . c
    v[h]      = c @ W_uv[h].T  =>  probs[h] @ v[h]        = (probs[h] @ c) @ W_uv[h].T
so a decode step costs O(S * (r + dr)) per head and never re-expands the cached positions.

Dimension letters: T new tokens, P cached, S = P + T, H hidden, n heads, r kv_lora_rank,
dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim, rq q_lora_rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..onnx_build import GraphBuilder
from .attention import masked
from .rope import apply_rope, rope_cos_sin, rope_spec

# q_a_layernorm / kv_a_layernorm are built as DeepseekV2RMSNorm(rank) with the class default eps,
# not config.rms_norm_eps
LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MlaConfig:
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None
    rope: dict  # {"rope_parameters": standardised rope params, "max_position_embeddings": N}
    rope_style: str  # "complex" (V2), "interleaved" (V3 rope_interleave), "half" (V3 otherwise)
    softmax_scale: float
    attention_bias: bool = False


def yarn_softmax_scale(params: dict, qk_head_dim: int) -> float:
    """qk_head_dim**-0.5, times mscale**2 for any non-default rope with mscale_all_dim (yarn_apply_mscale)."""
    scale = qk_head_dim ** (-0.5)
    if params.get("rope_type", "default") != "default":
        mscale_all_dim = params.get("mscale_all_dim", 0)
        if mscale_all_dim:
            factor = params["factor"]
            m = 1.0 if factor <= 1 else 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scale = scale * m * m
    return scale


def cache_shapes(cfg: MlaConfig) -> dict[str, tuple[int, int]]:
    """The layer's cache: the normed latent and the shared rotated rope key, one "head" each."""
    return {"ckv": (1, cfg.kv_lora_rank), "kpe": (1, cfg.qk_rope_head_dim)}


def weight_shapes(cfg: MlaConfig, hidden: int) -> dict[str, tuple[int, ...]]:
    """Canonical attention tensors (torch Linear layout) and their shapes."""
    n, r = cfg.num_heads, cfg.kv_lora_rank
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank is None:
        shapes = {"q": (n * (dn + dr), hidden)}
    else:
        rq = cfg.q_lora_rank
        shapes = {"q_a": (rq, hidden), "q_a_norm": (rq,), "q_b": (n * (dn + dr), rq)}
        if cfg.attention_bias:
            shapes["q_a_bias"] = (rq,)
    shapes |= {"kv_a": (r + dr, hidden), "kv_a_norm": (r,), "kv_b": (n * (dn + dv), r), "o": (hidden, n * dv)}
    if cfg.attention_bias:
        shapes |= {"kv_a_bias": (r + dr,), "o_bias": (hidden,)}
    return shapes


def _linear(g: GraphBuilder, x: str, w: dict, name: str, prefix: str) -> str:
    return g.linear(x, np.asarray(w[name], np.float32), f"{prefix}.{name}", w.get(f"{name}_bias"))


def _heads(g: GraphBuilder, y: str, n: int, d: int) -> str:
    """[T, n*d] -> [n, T, d]."""
    return g.op("Transpose", [g.op("Reshape", [y, g.const([-1, n, d])])], perm=[1, 0, 2])


def mla_attention(
    g: GraphBuilder,
    x: str,
    position_ids: str,
    past_ckv: str,
    past_kpe: str,
    w: dict,
    cfg: MlaConfig,
    prefix: str = "attn",
) -> dict[str, str]:
    """MLA on the input-normed hidden x [T, H] with position_ids int64 [T].

    past_ckv [1, P, r], past_kpe [1, P, dr]. ``w``: the canonical torch-layout weights of
    :func:`weight_shapes` (``q`` or ``q_a``, ``q_a_norm``, ``q_b``; ``kv_a``, ``kv_a_norm``,
    ``kv_b``, ``o``; biases ``*_bias`` when attention_bias).
    Returns names: present_ckv [1, S, r], present_kpe [1, S, dr], attn_out [T, H] (after o_proj),
    attn_colsum [S] (probabilities summed over heads and query rows).
    """
    n, r = cfg.num_heads, cfg.kv_lora_rank
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

    # queries: full projection or the low-rank path through q_a_layernorm
    if cfg.q_lora_rank is None:
        q = _linear(g, x, w, "q", prefix)
    else:
        qa = _linear(g, x, w, "q_a", prefix)
        qa = g.rms_norm(qa, np.asarray(w["q_a_norm"]), LATENT_NORM_EPS, f"{prefix}.q_a_norm")
        q = _linear(g, qa, w, "q_b", prefix)
    q_nope, q_pe = g.ops("Split", [_heads(g, q, n, dn + dr), g.const([dn, dr])], 2, axis=-1)  # [n, T, dn|dr]

    # the compressed latent and the single shared rope key: these two are what the cache keeps
    kv = _linear(g, x, w, "kv_a", prefix)  # [T, r + dr]
    latent, k_pe = g.ops("Split", [kv, g.const([r, dr])], 2, axis=-1)
    latent = g.rms_norm(latent, np.asarray(w["kv_a_norm"]), LATENT_NORM_EPS, f"{prefix}.kv_a_norm")

    cos, sin = rope_cos_sin(g, position_ids, rope_spec(cfg.rope, dr))
    q_pe = apply_rope(g, q_pe, cos, sin, cfg.rope_style)
    k_pe = apply_rope(g, g.op("Unsqueeze", [k_pe, g.const([0])]), cos, sin, cfg.rope_style)  # [1, T, dr]

    ckv_all = g.op("Concat", [past_ckv, g.op("Unsqueeze", [latent, g.const([0])])], axis=1)  # [1, S, r]
    kpe_all = g.op("Concat", [past_kpe, k_pe], axis=1)  # [1, S, dr]

    # absorb kv_b_proj [n*(dn+dv), r]: W_uk [n, dn, r] goes into the query, W_uv [n, r, dv] after attention
    kv_b = np.asarray(w["kv_b"], np.float32).reshape(n, dn + dv, r)
    w_uk = g.init(f"{prefix}.w_uk", np.ascontiguousarray(kv_b[:, :dn, :]))
    w_uv_t = g.init(f"{prefix}.w_uv_t", np.ascontiguousarray(kv_b[:, dn:, :].transpose(0, 2, 1)))
    q_latent = g.op("MatMul", [q_nope, w_uk])  # [n, T, r]

    # scores = q_nope . k_nope + q_pe . k_pe, both against the shared (1-head) cache, broadcast over n
    nope = g.op("MatMul", [q_latent, g.op("Transpose", [ckv_all], perm=[0, 2, 1])])  # [n, T, S]
    rope_part = g.op("MatMul", [q_pe, g.op("Transpose", [kpe_all], perm=[0, 2, 1])])
    scores = g.op("Mul", [g.op("Add", [nope, rope_part]), g.const(cfg.softmax_scale, np.float32)])

    scores = masked(g, scores, position_ids, ckv_all)
    probs = g.op("Softmax", [scores], axis=-1)  # [n, T, S]

    ctx = g.op("MatMul", [g.op("MatMul", [probs, ckv_all]), w_uv_t])  # [n, T, r] -> [n, T, dv]
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[1, 0, 2]), g.const([-1, n * dv])])  # [T, n*dv]
    out = _linear(g, ctx, w, "o", prefix)
    colsum = g.op("ReduceSum", [probs, g.const([0, 1])], keepdims=0)  # [S]
    return {"present_ckv": ckv_all, "present_kpe": kpe_all, "attn_out": out, "attn_colsum": colsum}
