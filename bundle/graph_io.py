"""Input and output names of the bundle's ONNX graphs: part of the export/run contract.

Shapes use T new tokens, P cached tokens, S = P + T, H hidden, E experts, V vocabulary,
K key/value heads and D head dimension. Batch size is 1 and has no axis.
"""

# embed.onnx
EMBED_IN_IDS = "input_ids"  # int64 [T]
EMBED_OUT = "hidden"  # float [T, H]

# layer_{l}.onnx
LAYER_IN_HIDDEN = "hidden"  # float [T, H]   residual stream entering the layer
LAYER_IN_POSITIONS = "position_ids"  # int64 [T]
LAYER_IN_PAST_KEY = "past_key"  # float [K, P, D]
LAYER_IN_PAST_VALUE = "past_value"  # float [K, P, D]
LAYER_OUT_RESIDUAL = "attn_residual"  # float [T, H]   hidden + attention output
LAYER_OUT_ROUTER_INPUT = "router_input"  # float [T, H]  post-attention RMSNorm: what experts see
LAYER_OUT_ROUTER_LOGITS = "router_logits"  # float [T, E]
LAYER_OUT_PRESENT_KEY = "present_key"  # float [K, S, D]
LAYER_OUT_PRESENT_VALUE = "present_value"  # float [K, S, D]
LAYER_OUT_SHARED = "shared_expert"  # float [T, H]   only where the architecture has one
LAYER_OUT_ATTN_COLSUM = "attn_colsum"  # float [S]  attention probabilities summed over heads and queries
LAYER_OUT_ATTN_INPUT = "attn_input"  # float [T, H]  input RMSNorm of the layer (what attention sees)

# expert graphs
EXPERT_IN = "x"  # float [T, H]
EXPERT_OUT = "y"  # float [T, H]

# head.onnx
HEAD_IN = "hidden"  # float [T, H]
HEAD_OUT = "logits"  # float [T, V]
