"""Synthetic Mixtral- or Qwen3-MoE-layout checkpoints of any size, for benchmarks and tests.

Real checkpoints cannot be downloaded in CI, but export throughput, memory and runtime
behaviour depend on tensor shapes, not on trained values. Weights are seeded Gaussians
(std 0.02, norms 1); the tokenizer is a word-level vocabulary ``w0 .. w{V-1}``.

A layer's tensors go into one shard (``model-layerNNN.safetensors``) unless they pass
``SHARD_BYTES``; then its experts continue in ``model-layerNNN-MMM.safetensors``, so writing a
Qwen3-30B-A3B-sized layer (1.2 GB of bf16 experts) never holds it all as float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dymoe.bundle.safetensors_io import write_safetensors

SHARD_BYTES = 256 * 2**20  # of float32 in memory before a shard is written
LAYOUTS = ("mixtral", "qwen3_moe")


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
    """Write config.json, the safetensors shards plus their index, and tokenizer.json.

    ``model_type`` picks the tensor names and config keys (``mixtral`` or ``qwen3_moe``, which has
    q/k norms per head and may set ``head_dim`` independently of ``hidden // heads``)."""
    if model_type not in LAYOUTS:
        raise ValueError(f"model_type must be one of {LAYOUTS}, got {model_type!r}")
    qwen = model_type == "qwen3_moe"
    if head_dim is not None and not qwen:
        raise ValueError("head_dim is a qwen3_moe setting; mixtral's is hidden // heads")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head_dim = head_dim or hidden // heads

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, np.ndarray]) -> None:  # one shard in memory at a time
        write_safetensors(folder / name, tensors, dtype=dtype)
        weight_map.update({k: name for k in tensors})

    shard("model-top.safetensors", {"model.embed_tokens.weight": w(vocab, hidden),
                                    "model.norm.weight": np.ones(hidden, np.float32),
                                    "lm_head.weight": w(vocab, hidden)})
    moe, names = ("mlp", ("gate_proj", "up_proj", "down_proj")) if qwen else ("block_sparse_moe", ("w1", "w3", "w2"))
    for layer in range(layers):
        p = f"model.layers.{layer}."
        t = {p + "input_layernorm.weight": np.ones(hidden, np.float32),
             p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
             p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
             p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
             p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
             p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
             f"{p}{moe}.gate.weight": w(experts, hidden)}
        if qwen:
            t |= {p + "self_attn.q_norm.weight": np.ones(head_dim, np.float32),
                  p + "self_attn.k_norm.weight": np.ones(head_dim, np.float32)}
        name, part = f"model-layer{layer:03d}.safetensors", 0
        for e in range(experts):
            q = f"{p}{moe}.experts.{e}."
            t[q + f"{names[0]}.weight"] = w(intermediate, hidden)
            t[q + f"{names[1]}.weight"] = w(intermediate, hidden)
            t[q + f"{names[2]}.weight"] = w(hidden, intermediate)
            if e + 1 < experts and sum(a.nbytes for a in t.values()) >= SHARD_BYTES:
                shard(name, t)
                part += 1
                name, t = f"model-layer{layer:03d}-{part:03d}.safetensors", {}
        shard(name, t)
        del t
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "model_type": model_type, "architectures": ["Qwen3MoeForCausalLM" if qwen else "MixtralForCausalLM"],
        "hidden_size": hidden, "num_experts_per_tok": top_k, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-5 if not qwen else 1e-6,
        "rope_theta": 1e6, "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": None,
        "bos_token_id": None, "eos_token_id": None,
        "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype],
    }
    if qwen:
        config |= {"head_dim": head_dim,
                   "num_experts": experts, "moe_intermediate_size": intermediate,
                   "intermediate_size": 8 * intermediate, "norm_topk_prob": True, "decoder_sparse_step": 1,
                   "mlp_only_layers": [], "attention_bias": False}
    else:
        config |= {"intermediate_size": intermediate, "num_local_experts": experts}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    write_word_tokenizer(folder / "tokenizer.json", vocab)
    return folder


def write_word_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path))
