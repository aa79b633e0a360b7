"""Mixtral: grouped-query attention with an optional sliding window; a ``block_sparse_moe`` of
SwiGLU experts ``w1`` (gate), ``w3`` (up), ``w2`` (down) behind a softmax router whose top-k
weights are always renormalised."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from dymoe.bundle.manifest import ModelSpec

from ..blocks.attention import GqaConfig, cache_shapes, gqa_attention, weight_shapes
from ..blocks.routing import RouterConfig, route
from ..layout import Ref
from . import base

MODEL_TYPE = "mixtral"
KEYS = {"num_experts": "num_local_experts"}  # config.json names of ModelSpec fields, for errors


@dataclass(frozen=True)
class Settings:
    decoder: base.Decoder
    attention: GqaConfig
    routing: RouterConfig


def read_config(cfg: dict) -> Settings:
    d = base.read_decoder(cfg, "num_local_experts", "intermediate_size")
    window = base.opt_int(cfg, "sliding_window")
    return Settings(d, base.read_gqa(cfg, d, sliding_window=window),
                    RouterConfig("softmax", d.num_experts, d.top_k, norm_topk_prob=True))


def model_spec(s: Settings) -> ModelSpec:
    return base.model_spec(s.decoder, cache_shapes(s.attention), KEYS)


def tensor_map(s: Settings, names: set[str]) -> dict[str, Ref]:
    refs = base.top_refs(s.decoder)
    for layer in range(s.decoder.num_layers):
        p = f"model.layers.{layer}."
        # checkpoints name the block block_sparse_moe; transformers 5 in memory names it mlp
        block = "mlp" if f"{p}mlp.experts.gate_up_proj" in names else "block_sparse_moe"
        refs |= base.norm_refs(layer, p) | base.gqa_refs(s.attention, layer, p)
        refs[f"layers.{layer}.router"] = Ref(f"{p}{block}.gate.weight")
        refs |= base.expert_refs(s.decoder, layer, f"{p}{block}.experts.", names, ("w1", "w3", "w2"))
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
