"""Synthetic Mixtral- or Qwen3-MoE-layout checkpoints of any size, for benchmarks and tests.

Real checkpoints cannot be downloaded in CI, but export throughput, memory and runtime
behaviour depend on tensor shapes, not on trained values. Weights are seeded Gaussians
(std 0.02, norms 1); the tokenizer is a word-level vocabulary ``w0 .. w{V-1}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dymoe.bundle.safetensors_io import write_safetensors


def write_synthetic_checkpoint(
    folder: Path,
    *,
    hidden: int = 2048,
    intermediate: int = 5632,
    experts: int = 8,
    top_k: int = 2,
    layers: int = 4,
    heads: int = 16,
    kv_heads: int = 4,
    vocab: int = 8192,
    dtype: str = "BF16",
    seed: int = 0,
    max_position_embeddings: int = 4096,
    model_type: str = "mixtral",
    head_dim: int | None = None,
) -> Path:
    """Write config.json, one safetensors shard per layer plus the index, and tokenizer.json.
    ``model_type`` ``qwen3_moe`` adds Qwen3's per-head q/k norms and explicit ``head_dim``."""
    if model_type not in ("mixtral", "qwen3_moe"):
        raise ValueError(f"synthetic checkpoints are mixtral or qwen3_moe, not {model_type!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head_dim = head_dim or hidden // heads
    qwen = model_type == "qwen3_moe"
    moe, names = ("mlp.", ("gate_proj", "up_proj", "down_proj")) if qwen else ("block_sparse_moe.", ("w1", "w3", "w2"))

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, np.ndarray]) -> None:  # one shard in memory at a time
        write_safetensors(folder / name, tensors, dtype=dtype)
        weight_map.update({k: name for k in tensors})

    shard("model-top.safetensors", {"model.embed_tokens.weight": w(vocab, hidden),
                                    "model.norm.weight": np.ones(hidden, np.float32),
                                    "lm_head.weight": w(vocab, hidden)})
    for layer in range(layers):
        p = f"model.layers.{layer}."
        t = {p + "input_layernorm.weight": np.ones(hidden, np.float32),
             p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
             p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
             p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
             p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
             p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
             p + moe + "gate.weight": w(experts, hidden)}
        if qwen:
            t |= {p + "self_attn.q_norm.weight": np.ones(head_dim, np.float32),
                  p + "self_attn.k_norm.weight": np.ones(head_dim, np.float32)}
        for e in range(experts):
            q = f"{p}{moe}experts.{e}."
            t[q + names[0] + ".weight"] = w(intermediate, hidden)
            t[q + names[1] + ".weight"] = w(intermediate, hidden)
            t[q + names[2] + ".weight"] = w(hidden, intermediate)
        shard(f"model-layer{layer:03d}.safetensors", t)
        del t
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": hidden,
        "intermediate_size": intermediate, "num_local_experts": experts, "num_experts_per_tok": top_k,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": vocab, "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": None,
        "bos_token_id": None, "eos_token_id": None,
        "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype],
    }
    if qwen:
        config |= {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": experts,
                   "moe_intermediate_size": intermediate, "head_dim": head_dim, "norm_topk_prob": True}
        del config["num_local_experts"]
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    write_word_tokenizer(folder / "tokenizer.json", vocab)
    return folder


def write_word_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path))
