"""Mixtral: ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up), ``w2`` (down);
softmax router whose top-k weights are always renormalised; optional sliding window."""

from __future__ import annotations

from dymoe.bundle.manifest import ModelSpec

from ..layout import Ref
from ._common import attention_refs, base_spec, expert_refs, need_int, top_refs

MODEL_TYPE = "mixtral"


def spec_from_config(cfg: dict) -> ModelSpec:
    return base_spec(
        cfg,
        keys={"num_experts": "num_local_experts"},
        num_experts=need_int(cfg, "num_local_experts"),
        expert_intermediate_size=need_int(cfg, "intermediate_size"),
        norm_topk_prob=True,
        sliding_window=cfg.get("sliding_window"),
    )


def tensor_map(spec: ModelSpec, names: set[str]) -> dict[str, Ref]:
    refs = top_refs(spec)
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        refs.update(attention_refs(spec, layer, p))
        # checkpoints name the block block_sparse_moe; transformers 5 in memory names it mlp
        block = "mlp" if f"{p}mlp.experts.gate_up_proj" in names else "block_sparse_moe"
        refs[f"layers.{layer}.router"] = Ref(f"{p}{block}.gate.weight")
        refs.update(expert_refs(spec, layer, f"{p}{block}.experts.", names, ("w1", "w3", "w2")))
    return refs
