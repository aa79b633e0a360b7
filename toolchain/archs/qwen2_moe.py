"""Qwen2-MoE: routed experts plus an always-on shared expert scaled by
``sigmoid(shared_expert_gate(x))``; q/k/v projections carry biases."""

from __future__ import annotations

from dymoe.bundle.manifest import ModelSpec

from ..layout import Ref
from ._common import attention_refs, base_spec, expert_refs, need_int, reject_dense_layers, top_refs

MODEL_TYPE = "qwen2_moe"


def spec_from_config(cfg: dict) -> ModelSpec:
    reject_dense_layers(cfg)
    return base_spec(
        cfg,
        keys={"expert_intermediate_size": "moe_intermediate_size"},
        num_experts=need_int(cfg, "num_experts", "num_local_experts"),
        expert_intermediate_size=need_int(cfg, "moe_intermediate_size"),
        shared_intermediate_size=need_int(cfg, "shared_expert_intermediate_size"),
        shared_expert_gate=True,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        attention_bias=bool(cfg.get("qkv_bias", True)),
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window") else None,
    )


def tensor_map(spec: ModelSpec, names: set[str]) -> dict[str, Ref]:
    refs = top_refs(spec)
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        c = f"layers.{layer}."
        refs.update(attention_refs(spec, layer, p))
        refs[c + "router"] = Ref(f"{p}mlp.gate.weight")
        refs.update(expert_refs(spec, layer, f"{p}mlp.experts.", names))
        for n in ("gate", "up", "down"):
            refs[f"{c}shared.{n}"] = Ref(f"{p}mlp.shared_expert.{n}_proj.weight")
        refs[c + "shared_gate"] = Ref(f"{p}mlp.shared_expert_gate.weight")
    return refs
