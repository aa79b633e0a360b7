"""DeepSeek-V2 (and V2-Lite): Multi-head Latent Attention whose KV cache is the compressed
latent plus one shared rope key (rope on complex pairs), with or without low-rank queries
(``q_lora_rank``); softmax routing, ``greedy`` or ``group_limited_greedy`` top-k (groups ranked
by their best expert), weights times ``routed_scaling_factor``, never renormalised; shared
experts beside the routed ones; the first ``first_k_dense_replace`` layers dense.
``deepseek_v3.py`` reuses this layer with its own router and rope layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx

from dymoe.bundle.errors import CheckpointError
from dymoe.bundle.manifest import ModelSpec

from ..blocks.mla import MlaConfig, cache_shapes, mla_attention, weight_shapes, yarn_softmax_scale
from ..blocks.routing import RouterConfig, route
from ..layout import Ref
from . import base

MODEL_TYPE = "deepseek_v2"
KEYS = {"num_experts": "n_routed_experts", "expert_intermediate_size": "moe_intermediate_size",
        "moe_layers": "first_k_dense_replace"}
# canonical MLA name -> name under self_attn. in the checkpoint
MLA_NAMES = {"q": "q_proj.weight", "q_a": "q_a_proj.weight", "q_a_norm": "q_a_layernorm.weight",
             "q_b": "q_b_proj.weight", "kv_a": "kv_a_proj_with_mqa.weight", "kv_a_norm": "kv_a_layernorm.weight",
             "kv_b": "kv_b_proj.weight", "o": "o_proj.weight", "q_a_bias": "q_a_proj.bias",
             "kv_a_bias": "kv_a_proj_with_mqa.bias", "o_bias": "o_proj.bias"}

# DeepseekV2Config's defaults, for keys a config.json leaves out
DEFAULTS = {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128}


@dataclass(frozen=True)
class Settings:
    decoder: base.Decoder
    attention: MlaConfig
    routing: RouterConfig
    shared_intermediate_size: int  # n_shared_experts x moe_intermediate_size (0: none)


def read_config(cfg: dict) -> Settings:
    check_moe_frequency(cfg)
    if cfg.get("scoring_func", "softmax") != "softmax":
        raise CheckpointError(f"config.json: scoring_func {cfg['scoring_func']!r}; DeepSeek-V2 scores with softmax",
                              "a sigmoid-scored model is a deepseek_v3 model_type")
    d = base.read_decoder(cfg, "n_routed_experts", "moe_intermediate_size")
    method = cfg.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise CheckpointError(f"config.json: topk_method {method!r} is not supported for deepseek_v2",
                              "use greedy or group_limited_greedy")
    n_group = base.opt_int(cfg, "n_group", 1) or 1
    topk_group = base.opt_int(cfg, "topk_group", 1) or 1
    if method == "group_limited_greedy":
        check_groups(d.num_experts, n_group, topk_group)
    scale = base.opt_float(cfg, "routed_scaling_factor", 1.0)
    routing = RouterConfig("deepseek_v2", d.num_experts, d.top_k, topk_method=method, n_group=n_group,
                           topk_group=topk_group, routed_scaling_factor=scale)
    return Settings(d, read_mla(cfg, "complex", DEFAULTS), routing, shared_size(cfg, d, 2))


def model_spec(s: Settings) -> ModelSpec:
    return base.model_spec(s.decoder, cache_shapes(s.attention), KEYS)


def read_mla(cfg: dict, rope_style: str, defaults: dict[str, Any]) -> MlaConfig:
    """MLA settings; a key absent from config.json takes the transformers config class's default."""
    def get(key: str) -> Any:
        return cfg[key] if key in cfg else defaults[key]

    heads = base.need_int(cfg, "num_attention_heads")
    q_lora = get("q_lora_rank")
    dims = {k: base.as_int(k, get(k)) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
    for key, value in [("num_attention_heads", heads), *dims.items()]:
        base.positive(key, value)
    if q_lora is not None:
        q_lora = base.as_int("q_lora_rank", q_lora)
        base.positive("q_lora_rank", q_lora)
    if dims["qk_rope_head_dim"] % 2:
        raise CheckpointError(f"config.json: qk_rope_head_dim is {dims['qk_rope_head_dim']}; the rotary "
                              "embedding needs an even size", "fix config.json; compare it with the model's original")
    rope = base.rope_config(cfg)
    return MlaConfig(num_heads=heads, q_lora_rank=q_lora, rope=rope, rope_style=rope_style,
                     softmax_scale=yarn_softmax_scale(rope["rope_parameters"],
                                                      dims["qk_nope_head_dim"] + dims["qk_rope_head_dim"]),
                     attention_bias=bool(cfg.get("attention_bias", False)), **dims)


def check_groups(num_experts: int, n_group: int, topk_group: int, need_per_group: int = 1) -> None:
    if n_group < 1 or num_experts % n_group or num_experts // n_group < need_per_group:
        raise CheckpointError(f"config.json: n_group {n_group} does not split the {num_experts} routed experts "
                              f"into equal groups of at least {need_per_group}", "fix config.json")
    if not 1 <= topk_group <= n_group:
        raise CheckpointError(f"config.json: topk_group {topk_group} must lie in 1..n_group ({n_group})",
                              "fix config.json")


def check_moe_frequency(cfg: dict) -> None:
    freq = base.opt_int(cfg, "moe_layer_freq", 1)
    if freq != 1:
        raise CheckpointError(f"config.json: moe_layer_freq {freq} is not supported (transformers' DeepSeek "
                              "makes every layer after first_k_dense_replace a MoE layer)",
                              "export a checkpoint with moe_layer_freq 1")


def shared_size(cfg: dict, d: base.Decoder, default_shared: int) -> int:
    n = cfg.get("n_shared_experts", default_shared)
    return 0 if not n else base.as_int("n_shared_experts", n) * d.expert_intermediate_size


def tensor_map(s: Settings, names: set[str]) -> dict[str, Ref]:
    d = s.decoder
    mla_names = set(weight_shapes(s.attention, d.hidden_size))
    refs = base.top_refs(d)
    for layer in range(d.num_layers):
        p = f"model.layers.{layer}."
        refs |= base.norm_refs(layer, p)
        refs |= base.named_refs(layer, "", {k: v for k, v in MLA_NAMES.items() if k in mla_names}, f"{p}self_attn.")
        if layer in d.dense_layers:
            refs |= base.mlp_refs(layer, "mlp.", f"{p}mlp.")
            continue
        refs[f"layers.{layer}.router"] = Ref(f"{p}mlp.gate.weight")
        if s.routing.kind == "deepseek_v3":
            refs[f"layers.{layer}.router_bias"] = Ref(f"{p}mlp.gate.e_score_correction_bias")
        refs |= base.expert_refs(d, layer, f"{p}mlp.experts.", names)
        if s.shared_intermediate_size:
            refs |= base.mlp_refs(layer, "shared.", f"{p}mlp.shared_experts.")
    return refs


def shapes(s: Settings) -> dict[str, tuple[int, ...]]:
    d, S, H = s.decoder, s.shared_intermediate_size, s.decoder.hidden_size
    moe: dict[str, tuple[int, ...]] = {}
    if s.routing.kind == "deepseek_v3":
        moe["router_bias"] = (d.num_experts,)
    if S:
        moe |= {"shared.gate": (S, H), "shared.up": (S, H), "shared.down": (H, S)}
    return (base.decoder_shapes(d) | base.per_layer(weight_shapes(s.attention, H), range(d.num_layers))
            | base.per_layer(moe, d.moe_layers))


def layer_graph(s: Settings, t: base.Tensors, layer: int) -> onnx.ModelProto:
    """The DeepSeek decoder layer: MLA, then a dense MLP, or routed experts plus shared ones."""
    lg = base.LayerGraph(s.decoder, layer, cache_shapes(s.attention))
    g, eps = lg.g, s.decoder.rms_norm_eps
    x = g.rms_norm(lg.hidden, t["attn_norm"], eps, "attn_norm")
    attn = mla_attention(g, x, lg.positions, lg.past["ckv"], lg.past["kpe"], t, s.attention)
    h = g.op("Add", [lg.hidden, attn["attn_out"]])
    xe = g.rms_norm(h, t["ffn_norm"], eps, "ffn_norm")
    if layer in s.decoder.dense_layers:
        return lg.dense(g.op("Add", [h, base.swiglu(g, xe, t, "mlp.")]), attn, x)
    if s.shared_intermediate_size:
        h = g.op("Add", [h, base.swiglu(g, xe, t, "shared.")])
    return lg.moe(h, xe, route(g, xe, t["router"], s.routing, t.get("router_bias")), attn, x)
