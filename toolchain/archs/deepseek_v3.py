"""DeepSeek-V3 (and R1): the DeepSeek-V2 layer (``deepseek_v2.py``) with Multi-head Latent Attention
(rope on interleaved pairs unless ``rope_interleave`` is false; YaRN scaling with mscale);
sigmoid routing: ``e_score_correction_bias`` is added for SELECTION only, groups ranked by the
sum of their two best biased scores keep the top ``topk_group``, the weights are the un-biased
sigmoids, renormalised per ``norm_topk_prob``, times ``routed_scaling_factor``; shared experts;
the first ``first_k_dense_replace`` layers dense."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from dymoe.bundle.errors import CheckpointError
from dymoe.bundle.manifest import ModelSpec

from ..blocks.mla import MlaConfig, cache_shapes
from ..blocks.routing import RouterConfig
from ..layout import Ref
from . import base, deepseek_v2

MODEL_TYPE = "deepseek_v3"
# DeepseekV3Config's defaults, for keys a config.json leaves out
DEFAULTS = {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128}


@dataclass(frozen=True)
class Settings:
    decoder: base.Decoder
    attention: MlaConfig
    routing: RouterConfig
    shared_intermediate_size: int  # n_shared_experts x moe_intermediate_size (0: none)


def read_config(cfg: dict) -> Settings:
    deepseek_v2.check_moe_frequency(cfg)
    if cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise CheckpointError(f"config.json: scoring_func {cfg['scoring_func']!r}; DeepSeek-V3 scores with sigmoid",
                              "a softmax-scored model is a deepseek_v2 model_type")
    d = base.read_decoder(cfg, "n_routed_experts", "moe_intermediate_size")
    n_group = base.opt_int(cfg, "n_group", 8) or 1
    topk_group = base.opt_int(cfg, "topk_group", 4) or 1
    deepseek_v2.check_groups(d.num_experts, n_group, topk_group, need_per_group=2 if topk_group < n_group else 1)
    routing = RouterConfig("deepseek_v3", d.num_experts, d.top_k, norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                           n_group=n_group, topk_group=topk_group,
                           routed_scaling_factor=base.opt_float(cfg, "routed_scaling_factor", 2.5))
    style = "interleaved" if cfg.get("rope_interleave", True) else "half"
    return Settings(d, deepseek_v2.read_mla(cfg, style, DEFAULTS), routing, deepseek_v2.shared_size(cfg, d, 1))


def model_spec(s: Settings) -> ModelSpec:
    return base.model_spec(s.decoder, cache_shapes(s.attention), deepseek_v2.KEYS)


# The layer is DeepSeek-V2's (MLA, shared experts, dense first layers) with V3's router in it:
# its tensors, shapes and graph are built by the same code.
def tensor_map(s: Settings, names: set[str]) -> dict[str, Ref]:
    return deepseek_v2.tensor_map(s, names)


def shapes(s: Settings) -> dict[str, tuple[int, ...]]:
    return deepseek_v2.shapes(s)


def layer_graph(s: Settings, t: base.Tensors, layer: int) -> onnx.ModelProto:
    return deepseek_v2.layer_graph(s, t, layer)
