"""Config parsing and tensor-name helpers shared by the architecture modules."""

from __future__ import annotations

from typing import Any

from dymoe.bundle.errors import CheckpointError
from dymoe.bundle.manifest import ModelSpec, spec_problems

from ..layout import Ref


def need(cfg: dict, *keys: str) -> Any:
    """The first of ``keys`` present in config.json, or a clear error naming them."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    raise CheckpointError(
        f"config.json lacks '{keys[0]}' (model_type {cfg.get('model_type')!r})",
        "the config is incomplete; compare it with the model's original config.json",
    )


def _bad_value(key: str, value: Any, what: str) -> CheckpointError:
    return CheckpointError(f"config.json: {key} is {value!r}, which is not {what}",
                           "fix config.json; compare it with the model's original config.json")


def as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise _bad_value(key, value, "an integer")
    return int(value)


def as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_value(key, value, "a number")
    return float(value)


def need_int(cfg: dict, *keys: str) -> int:
    """As :func:`need`, checked to be an integer (the error names the key that held it)."""
    key = next((k for k in keys if cfg.get(k) is not None), keys[0])
    return as_int(key, need(cfg, *keys))


def opt_int(cfg: dict, key: str, default: int | None = None) -> int | None:
    return default if cfg.get(key) is None else as_int(key, cfg[key])


def rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise _bad_value("rope_scaling", params, "an object")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise CheckpointError(
            f"rope type {kind!r} is not supported yet (only the default rotary embedding)",
            "export a model without rope scaling, or report this model to the dymoe developers",
        )
    return as_float("rope_theta", params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def eos_ids(cfg: dict) -> list[int]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return []
    ids = [as_int("eos_token_id", i) for i in (eos if isinstance(eos, list) else [eos])]
    vocab = need_int(cfg, "vocab_size")
    return [i for i in ids if 0 <= i < vocab]


def reject_dense_layers(cfg: dict) -> None:
    """Qwen-style configs can make some layers dense; dymoe's layout needs every layer MoE."""
    step = opt_int(cfg, "decoder_sparse_step", 1) or 1
    dense = cfg.get("mlp_only_layers") or []
    n = need_int(cfg, "num_hidden_layers")
    if dense or any((layer + 1) % step for layer in range(n)):
        raise CheckpointError(
            "this checkpoint mixes dense and MoE layers (mlp_only_layers / decoder_sparse_step), "
            "which dymoe does not export yet",
            "use a checkpoint whose every layer is a MoE layer",
        )


# ModelSpec field -> the config.json key it is read from (an architecture names its own differences)
CONFIG_KEYS = {
    "hidden_size": "hidden_size", "vocab_size": "vocab_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
    "top_k": "num_experts_per_tok", "rms_norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
    "max_position_embeddings": "max_position_embeddings", "sliding_window": "sliding_window",
    "clip_qkv": "clip_qkv", "eos_token_ids": "eos_token_id", "bos_token_id": "bos_token_id",
    "num_experts": "num_experts", "expert_intermediate_size": "intermediate_size",
    "shared_intermediate_size": "shared_expert_intermediate_size",
}


def base_spec(cfg: dict, keys: dict[str, str] | None = None, **arch: Any) -> ModelSpec:
    """The fields every architecture reads the same way; ``arch`` supplies the rest, ``keys`` the
    config.json names of its own fields (for errors). An impossible model is refused here, each
    problem named by its config.json key."""
    hidden = need_int(cfg, "hidden_size")
    heads = need_int(cfg, "num_attention_heads")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(
            f"config.json: hidden_act {act!r} is not supported (dymoe's experts are SwiGLU with silu)",
            "export a model whose experts use silu",
        )
    bos = cfg.get("bos_token_id")
    fields: dict[str, Any] = dict(
        model_type=str(cfg["model_type"]),
        hidden_size=hidden,
        vocab_size=need_int(cfg, "vocab_size"),
        num_layers=need_int(cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=opt_int(cfg, "num_key_value_heads") or heads,
        head_dim=opt_int(cfg, "head_dim") or (hidden // heads if heads > 0 else 0),
        top_k=need_int(cfg, "num_experts_per_tok"),
        rms_norm_eps=as_float("rms_norm_eps", cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta(cfg),
        max_position_embeddings=opt_int(cfg, "max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=None if bos is None else as_int("bos_token_id", bos),
        eos_token_ids=eos_ids(cfg),
        shared_intermediate_size=0,
        shared_expert_gate=False,
        sliding_window=None,
        qk_norm="none",
        clip_qkv=None,
        attention_bias=False,
    )
    fields.update(arch)
    spec = ModelSpec(**fields)
    names = {**CONFIG_KEYS, **(keys or {})}
    if cfg.get("head_dim") is None and heads > 0 and hidden % heads:
        raise CheckpointError(f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                              "(and no head_dim is given)", "fix config.json; compare it with the model's original")
    problems = spec_problems(spec)
    if problems:
        name, what = problems[0]
        base, _, index = name.partition("[")
        raise CheckpointError(f"config.json: {names.get(base, base)}{'[' + index if index else ''} {what}",
                              "fix config.json: it does not describe a model dymoe can run "
                              "(compare it with the model's original config.json)")
    return spec


def attention_refs(spec: ModelSpec, layer: int, prefix: str) -> dict[str, Ref]:
    """``{prefix}self_attn.{q,k,v,o}_proj`` plus biases and q/k norms as the spec says."""
    a = f"{prefix}self_attn."
    c = f"layers.{layer}."
    refs = {c + n: Ref(f"{a}{n}_proj.weight") for n in ("q", "k", "v", "o")}
    if spec.attention_bias:
        refs.update({c + f"{n}_bias": Ref(f"{a}{n}_proj.bias") for n in ("q", "k", "v")})
    if spec.qk_norm != "none":
        refs.update({c + "q_norm": Ref(f"{a}q_norm.weight"), c + "k_norm": Ref(f"{a}k_norm.weight")})
    refs[c + "attn_norm"] = Ref(f"{prefix}input_layernorm.weight")
    refs[c + "ffn_norm"] = Ref(f"{prefix}post_attention_layernorm.weight")
    return refs


def expert_refs(
    spec: ModelSpec,
    layer: int,
    experts_prefix: str,
    names: set[str],
    unfused: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
) -> dict[str, Ref]:
    """Routed experts, either one tensor per expert and matrix (what HF checkpoints hold on
    disk) or transformers 5's fused in-memory form saved as is: ``gate_up_proj [E, 2I, H]``
    (gate rows first, then up) and ``down_proj [E, H, I]``."""
    c = f"layers.{layer}.experts."
    I = spec.expert_intermediate_size
    refs: dict[str, Ref] = {}
    if f"{experts_prefix}gate_up_proj" in names:
        for e in range(spec.num_experts):
            refs[f"{c}{e}.gate"] = Ref(f"{experts_prefix}gate_up_proj", index=e, rows=(0, I))
            refs[f"{c}{e}.up"] = Ref(f"{experts_prefix}gate_up_proj", index=e, rows=(I, 2 * I))
            refs[f"{c}{e}.down"] = Ref(f"{experts_prefix}down_proj", index=e)
        return refs
    g, u, d = unfused
    for e in range(spec.num_experts):
        refs[f"{c}{e}.gate"] = Ref(f"{experts_prefix}{e}.{g}.weight")
        refs[f"{c}{e}.up"] = Ref(f"{experts_prefix}{e}.{u}.weight")
        refs[f"{c}{e}.down"] = Ref(f"{experts_prefix}{e}.{d}.weight")
    return refs


def top_refs(spec: ModelSpec) -> dict[str, Ref]:
    refs = {"embed": Ref("model.embed_tokens.weight"), "final_norm": Ref("model.norm.weight")}
    if not spec.tie_word_embeddings:
        refs["lm_head"] = Ref("lm_head.weight")
    return refs
