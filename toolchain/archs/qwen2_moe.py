"""Qwen2-MoE: grouped-query attention with q/k/v biases; softmax routing (renormalised per
``norm_topk_prob``) plus an always-on shared expert scaled by ``sigmoid(shared_expert_gate(x))``;
layers in ``mlp_only_layers`` (or off the ``decoder_sparse_step``) are dense SwiGLU MLPs."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from dymoe.bundle.manifest import ModelSpec

from ..blocks.attention import GqaConfig, cache_shapes, gqa_attention, weight_shapes
from ..blocks.routing import RouterConfig, route
from ..layout import Ref
from . import base

MODEL_TYPE = "qwen2_moe"
KEYS = {"expert_intermediate_size": "moe_intermediate_size"}


@dataclass(frozen=True)
class Settings:
    decoder: base.Decoder
    attention: GqaConfig
    routing: RouterConfig
    shared_intermediate_size: int


def read_config(cfg: dict) -> Settings:
    d = base.read_decoder(cfg, ("num_experts", "num_local_experts"), "moe_intermediate_size")
    window = base.opt_int(cfg, "sliding_window") if cfg.get("use_sliding_window") else None
    attention = base.read_gqa(cfg, d, bias=bool(cfg.get("qkv_bias", True)), sliding_window=window)
    shared = base.need_int(cfg, "shared_expert_intermediate_size")
    base.positive("shared_expert_intermediate_size", shared)
    return Settings(d, attention, RouterConfig("softmax", d.num_experts, d.top_k,
                                               norm_topk_prob=bool(cfg.get("norm_topk_prob", False))), shared)


def model_spec(s: Settings) -> ModelSpec:
    return base.model_spec(s.decoder, cache_shapes(s.attention), KEYS)


def tensor_map(s: Settings, names: set[str]) -> dict[str, Ref]:
    refs = base.top_refs(s.decoder)
    for layer in range(s.decoder.num_layers):
        p = f"model.layers.{layer}."
        refs |= base.norm_refs(layer, p) | base.gqa_refs(s.attention, layer, p)
        if layer in s.decoder.dense_layers:
            refs |= base.mlp_refs(layer, "mlp.", f"{p}mlp.")
            continue
        refs[f"layers.{layer}.router"] = Ref(f"{p}mlp.gate.weight")
        refs |= base.expert_refs(s.decoder, layer, f"{p}mlp.experts.", names)
        refs |= base.mlp_refs(layer, "shared.", f"{p}mlp.shared_expert.")
        refs[f"layers.{layer}.shared_gate"] = Ref(f"{p}mlp.shared_expert_gate.weight")
    return refs


def shapes(s: Settings) -> dict[str, tuple[int, ...]]:
    d, S, H = s.decoder, s.shared_intermediate_size, s.decoder.hidden_size
    shared = {"shared.gate": (S, H), "shared.up": (S, H), "shared.down": (H, S), "shared_gate": (1, H)}
    return (base.decoder_shapes(d) | base.per_layer(weight_shapes(s.attention, H), range(d.num_layers))
            | base.per_layer(shared, d.moe_layers))


def layer_graph(s: Settings, t: base.Tensors, layer: int) -> onnx.ModelProto:
    lg = base.LayerGraph(s.decoder, layer, cache_shapes(s.attention))
    g, eps = lg.g, s.decoder.rms_norm_eps
    x = g.rms_norm(lg.hidden, t["attn_norm"], eps, "attn_norm")
    attn = gqa_attention(g, x, lg.positions, lg.past, t, s.attention)
    h = g.op("Add", [lg.hidden, attn["attn_out"]])
    xe = g.rms_norm(h, t["ffn_norm"], eps, "ffn_norm")
    if layer in s.decoder.dense_layers:
        return lg.dense(g.op("Add", [h, base.swiglu(g, xe, t, "mlp.")]), attn, x)
    gate = g.op("Sigmoid", [g.matmul_t(xe, t["shared_gate"], "shared_gate")])  # [T, 1]
    shared = g.op("Mul", [base.swiglu(g, xe, t, "shared."), gate])
    return lg.moe(g.op("Add", [h, shared]), xe, route(g, xe, t["router"], s.routing), attn, x)
