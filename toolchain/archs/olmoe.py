"""OLMoE: grouped-query attention with RMSNorm over the whole q and k projections (``q_norm``
[heads*head_dim], applied before splitting heads) and an optional ``clip_qkv``; softmax routing
with optional renormalisation; no shared expert."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from dymoe.bundle.manifest import ModelSpec

from ..blocks.attention import GqaConfig, cache_shapes, gqa_attention, weight_shapes
from ..blocks.routing import RouterConfig, route
from ..layout import Ref
from . import base

MODEL_TYPE = "olmoe"


@dataclass(frozen=True)
class Settings:
    decoder: base.Decoder
    attention: GqaConfig
    routing: RouterConfig


def read_config(cfg: dict) -> Settings:
    d = base.read_decoder(cfg, "num_experts", "intermediate_size")
    attention = base.read_gqa(cfg, d, qk_norm="full", clip_qkv=base.opt_float(cfg, "clip_qkv"),
                              bias=bool(cfg.get("attention_bias", False)))
    return Settings(d, attention, RouterConfig("softmax", d.num_experts, d.top_k,
                                               norm_topk_prob=bool(cfg.get("norm_topk_prob", False))))


def model_spec(s: Settings) -> ModelSpec:
    return base.model_spec(s.decoder, cache_shapes(s.attention))


def tensor_map(s: Settings, names: set[str]) -> dict[str, Ref]:
    refs = base.top_refs(s.decoder)
    for layer in range(s.decoder.num_layers):
        p = f"model.layers.{layer}."
        refs |= base.norm_refs(layer, p) | base.gqa_refs(s.attention, layer, p)
        refs[f"layers.{layer}.router"] = Ref(f"{p}mlp.gate.weight")
        refs |= base.expert_refs(s.decoder, layer, f"{p}mlp.experts.", names)
    return refs


def shapes(s: Settings) -> dict[str, tuple[int, ...]]:
    d = s.decoder
    return base.decoder_shapes(d) | base.per_layer(weight_shapes(s.attention, d.hidden_size), range(d.num_layers))


def layer_graph(s: Settings, t: base.Tensors, layer: int) -> onnx.ModelProto:
    lg = base.LayerGraph(s.decoder, layer, cache_shapes(s.attention))
    g, eps = lg.g, s.decoder.rms_norm_eps
    x = g.rms_norm(lg.hidden, t["attn_norm"], eps, "attn_norm")
    attn = gqa_attention(g, x, lg.positions, lg.past, t, s.attention)
    h = g.op("Add", [lg.hidden, attn["attn_out"]])
    xe = g.rms_norm(h, t["ffn_norm"], eps, "ffn_norm")
    return lg.moe(h, xe, route(g, xe, t["router"], s.routing), attn, x)
