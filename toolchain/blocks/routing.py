"""MoE routing as graph outputs: expert ids, their weights and the per-expert selection scores.

Three families, matching transformers 5.24's router modules:
  "softmax"      Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE: softmax over all experts, top-k,
                 optional renormalisation (norm_topk_prob; Mixtral always renormalises);
  "deepseek_v2"  DeepseekV2TopkRouter: softmax, topk_method "greedy" or "group_limited_greedy"
                 (groups ranked by their max score, the other groups' scores set to 0), weights
                 times routed_scaling_factor, never renormalised;
  "deepseek_v3"  DeepseekV3TopkRouter: sigmoid; e_score_correction_bias added for selection only;
                 groups ranked by the sum of their top-2 biased scores, the other groups masked to
                 -inf; weights gathered from the un-biased sigmoid, optionally divided by their
                 sum + 1e-20, times routed_scaling_factor.

Outputs are sorted by weight, descending, ties to the lower expert index (ONNX TopK's tie rule).
Dimension letters: T tokens, H hidden, E experts, k experts per token, G groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..onnx_build import GraphBuilder

KINDS = ("softmax", "deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class RouterConfig:
    kind: str
    num_experts: int
    top_k: int
    norm_topk_prob: bool = False
    topk_method: str = "greedy"  # deepseek_v2 only
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0


def _topk(g: GraphBuilder, x: str, k: int) -> tuple[str, str]:
    """Largest k along the last axis, sorted descending, ties to the lower index."""
    values, indices = g.ops("TopK", [x, g.const([k])], 2, axis=-1, largest=1, sorted=1)
    return values, indices


def _f32_tensor(v: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array([v], np.float32))


def _keep_top_groups(g: GraphBuilder, scores: str, group_scores: str, cfg: RouterConfig, fill: float) -> str:
    """scores [T, E] with every expert outside the topk_group best groups set to ``fill``."""
    _, group_idx = _topk(g, group_scores, cfg.topk_group)  # [T, topk_group]
    zeros = g.op("ConstantOfShape", [g.op("Shape", [group_scores])], value=_f32_tensor(0.0))  # [T, G]
    ones = g.op("ConstantOfShape", [g.op("Shape", [group_idx])], value=_f32_tensor(1.0))
    group_mask = g.op("ScatterElements", [zeros, group_idx, ones], axis=1)  # [T, G] of 0/1
    per_group = cfg.num_experts // cfg.n_group
    expert_mask = g.op("Expand", [g.op("Unsqueeze", [group_mask, g.const([2])]), g.const([1, 1, per_group])])
    keep = g.op("Cast", [g.op("Reshape", [expert_mask, g.const([-1, cfg.num_experts])])], to=TensorProto.BOOL)  # [T, E]
    return g.op("Where", [keep, scores, g.const(fill, np.float32)])


def _grouped(g: GraphBuilder, scores: str, cfg: RouterConfig) -> str:
    return g.op("Reshape", [scores, g.const([-1, cfg.n_group, cfg.num_experts // cfg.n_group])])  # [T, G, E/G]


def route(g: GraphBuilder, x: str, weight: np.ndarray, cfg: RouterConfig, bias: np.ndarray | None = None,
          prefix: str = "router") -> tuple[str, str, str]:
    """Routing of hidden states x [T, H] through the router ``weight`` [E, H] (torch Linear
    layout; x @ W.T in float32); ``bias`` is deepseek_v3's e_score_correction_bias [E].

    Returns (expert_ids int64 [T, k], expert_weights float32 [T, k], scores float32 [T, E]) where
    scores are what the top-k was taken over (after group masking: 0 for dropped groups in
    deepseek_v2, -inf in deepseek_v3) -- the ranking the look-ahead prefetch predicts with.
    """
    if cfg.kind not in KINDS:
        raise ValueError(f"unknown router kind {cfg.kind!r}")
    logits = g.matmul_t(x, np.asarray(weight, np.float32), prefix)
    k = cfg.top_k

    if cfg.kind in ("softmax", "deepseek_v2"):
        scores = g.op("Softmax", [logits], axis=-1)
        if cfg.kind == "deepseek_v2" and cfg.topk_method == "group_limited_greedy" and cfg.topk_group < cfg.n_group:
            group_scores = g.op("ReduceMax", [_grouped(g, scores, cfg), g.const([-1])], keepdims=0)  # [T, G]
            scores = _keep_top_groups(g, scores, group_scores, cfg, 0.0)
        elif cfg.kind == "deepseek_v2" and cfg.topk_method != "greedy":
            raise ValueError(f"unsupported deepseek_v2 topk_method {cfg.topk_method!r}")
        # weights are the selected scores themselves (or a positive rescale), so TopK's order is final
        weights, ids = _topk(g, scores, k)
        if cfg.kind == "softmax" and cfg.norm_topk_prob:
            weights = g.op("Div", [weights, g.op("ReduceSum", [weights, g.const([-1])], keepdims=1)])
        if cfg.kind == "deepseek_v2" and cfg.routed_scaling_factor != 1.0:
            weights = g.op("Mul", [weights, g.const(cfg.routed_scaling_factor, np.float32)])
        return ids, weights, scores

    # deepseek_v3: select on biased scores, weigh with the un-biased ones
    probs = g.op("Sigmoid", [logits])
    choice = probs
    if bias is not None:
        choice = g.op("Add", [probs, g.init(f"{prefix}.e_score_correction_bias", np.asarray(bias, np.float32))])
    scores = choice
    if cfg.topk_group < cfg.n_group:  # otherwise every group is kept and the mask is a no-op
        top2, _ = _topk(g, _grouped(g, choice, cfg), 2)  # [T, G, 2]
        group_scores = g.op("ReduceSum", [top2, g.const([-1])], keepdims=0)  # [T, G]
        scores = _keep_top_groups(g, choice, group_scores, cfg, float("-inf"))
    _, chosen = _topk(g, scores, k)
    # re-sort the chosen experts by their un-biased weight: scatter into a -inf [T, E] row and take
    # TopK again, which also breaks ties toward the lower expert index
    dense = g.op(
        "ScatterElements",
        [
            g.op("ConstantOfShape", [g.op("Shape", [probs])], value=_f32_tensor(float("-inf"))),
            chosen,
            g.op("GatherElements", [probs, chosen], axis=1),
        ],
        axis=1,
    )
    weights, ids = _topk(g, dense, k)
    if cfg.norm_topk_prob:
        denom = g.op("Add", [g.op("ReduceSum", [weights, g.const([-1])], keepdims=1), g.const(1e-20, np.float32)])
        weights = g.op("Div", [weights, denom])
    if cfg.routed_scaling_factor != 1.0:
        weights = g.op("Mul", [weights, g.const(cfg.routed_scaling_factor, np.float32)])
    return ids, weights, scores
