"""Input and output names of the bundle's ONNX graphs: part of the export/run contract.

Shapes use T new tokens, P cached tokens, S = P + T, H hidden, E experts, k experts per token,
V vocabulary. Batch size is 1 and has no axis. A layer's KV cache is the list of tensors the
manifest declares (``model.kv_cache``): each ``[heads, P, dim]`` in, ``[heads, S, dim]`` out.
"""

# embed.onnx
EMBED_IN_IDS = "input_ids"  # int64 [T]
EMBED_OUT = "hidden"  # float [T, H]

# layer_{l}.onnx (every layer)
LAYER_IN_HIDDEN = "hidden"  # float [T, H]   residual stream entering the layer
LAYER_IN_POSITIONS = "position_ids"  # int64 [T]
LAYER_OUT_RESIDUAL = "residual"  # float [T, H]  the layer's output without its routed experts (all of it if dense)
LAYER_OUT_ATTN_COLSUM = "attn_colsum"  # float [S]  attention probabilities summed over heads and queries
LAYER_OUT_ATTN_INPUT = "attn_input"  # float [T, H]  input RMSNorm of the layer (what attention sees)
# MoE layers only: the routing decision, made inside the graph by the architecture's own rule
LAYER_OUT_EXPERT_INPUT = "expert_input"  # float [T, H]  post-attention RMSNorm: what router and experts see
LAYER_OUT_EXPERT_IDS = "expert_ids"  # int64 [T, k]  selected experts, highest weight first
LAYER_OUT_EXPERT_WEIGHTS = "expert_weights"  # float [T, k]  their weights in the layer's output


def past(name: str) -> str:
    """A cache tensor entering the layer: float [heads, P, dim]."""
    return f"past_{name}"


def present(name: str) -> str:
    """The cache tensor after the layer: float [heads, S, dim]."""
    return f"present_{name}"


# router_{l}.onnx (MoE layers): layer l's routing rule on any hidden state, for look-ahead prediction
ROUTER_IN = "x"  # float [T, H]
# outputs: LAYER_OUT_EXPERT_IDS, LAYER_OUT_EXPERT_WEIGHTS and
ROUTER_OUT_SCORES = "router_scores"  # float [T, E]  what the top-k is taken over (ranks every expert)

# expert graphs
EXPERT_IN = "x"  # float [T, H]
EXPERT_OUT = "y"  # float [T, H]

# head.onnx
HEAD_IN = "hidden"  # float [T, H]
HEAD_OUT = "logits"  # float [T, V]
