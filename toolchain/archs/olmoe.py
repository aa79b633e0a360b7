"""OLMoE: RMSNorm over the whole q and k projections (``q_norm [heads*head_dim]``, applied
before splitting heads), optional ``clip_qkv``, no shared expert."""

from __future__ import annotations

from dymoe.bundle.manifest import ModelSpec

from ..layout import Ref
from ._common import as_float, attention_refs, base_spec, expert_refs, need_int, top_refs

MODEL_TYPE = "olmoe"


def spec_from_config(cfg: dict) -> ModelSpec:
    clip = cfg.get("clip_qkv")
    return base_spec(
        cfg,
        num_experts=need_int(cfg, "num_experts"),
        expert_intermediate_size=need_int(cfg, "intermediate_size"),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="full",
        clip_qkv=as_float("clip_qkv", clip) if clip is not None else None,
    )


def tensor_map(spec: ModelSpec, names: set[str]) -> dict[str, Ref]:
    refs = top_refs(spec)
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        refs.update(attention_refs(spec, layer, p))
        refs[f"layers.{layer}.router"] = Ref(f"{p}mlp.gate.weight")
        refs.update(expert_refs(spec, layer, f"{p}mlp.experts.", names))
    return refs
