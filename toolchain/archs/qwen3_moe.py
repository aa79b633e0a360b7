"""Qwen3-MoE: RMSNorm on each head of q and k (``q_norm``/``k_norm`` of size head_dim), explicit
``head_dim``, no shared expert; top-k renormalisation per ``norm_topk_prob``."""

from __future__ import annotations

from dymoe.bundle.manifest import ModelSpec

from ..layout import Ref
from ._common import attention_refs, base_spec, expert_refs, need_int, reject_dense_layers, top_refs

MODEL_TYPE = "qwen3_moe"


def spec_from_config(cfg: dict) -> ModelSpec:
    reject_dense_layers(cfg)
    return base_spec(
        cfg,
        keys={"expert_intermediate_size": "moe_intermediate_size"},
        num_experts=need_int(cfg, "num_experts", "num_local_experts"),
        expert_intermediate_size=need_int(cfg, "moe_intermediate_size"),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="head",
        # transformers applies the window whenever the config sets one
        sliding_window=cfg.get("sliding_window"),
    )


def tensor_map(spec: ModelSpec, names: set[str]) -> dict[str, Ref]:
    refs = top_refs(spec)
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        refs.update(attention_refs(spec, layer, p))
        refs[f"layers.{layer}.router"] = Ref(f"{p}mlp.gate.weight")
        refs.update(expert_refs(spec, layer, f"{p}mlp.experts.", names))
    return refs
